"""Background robustness on ImageNet-9 (Xiao, Engstrom, Ilyas, Madry, "Noise or Signal: The Role of
Image Backgrounds in Object Recognition", ICLR 2021), as the authors' ``in9_eval.py`` scores it.

A classifier is scored on each background variant of ImageNet-9 (``original``, ``only_fg``,
``mixed_same``, ``mixed_rand``, ...). An ImageNet-1k classifier's prediction is the argmax over all
1,000 logits mapped to the 9 classes (:func:`~simpool_lightning.data.imagenet9.predict_in9`; a
prediction outside the 370 mapped classes is wrong); a classifier trained on the 9 classes is scored
by its own argmax (the authors' ``--in9``). The BG-gap is the accuracy on ``mixed_same`` (foreground
on a background of the same class) minus that on ``mixed_rand`` (on a random class's background):
how much the prediction leans on the background.

    simpool test -c configs/downstream/in9.yaml --data.init_args.root /data \\
        --model.init_args.checkpoint runs/supervised/vit_s_simpool/checkpoints/last.ckpt
"""
from __future__ import annotations

from typing import Any, Optional, Union

from torch import Tensor, nn
from torchmetrics import MeanMetric

from ..data.imagenet9 import IN9_CLASSES, IN9_VARIANTS, predict_in9
from .frozen import FrozenEvaluator, load_feature_model

__all__ = ["BackgroundRobustnessEvaluator"]

IN1K_CLASSES = 1000


class BackgroundRobustnessEvaluator(FrozenEvaluator):
    """Top-1 accuracy of a frozen classifier on every ImageNet-9 variant, and the BG-gap.

    ``test`` (or ``validate``) with an :class:`~simpool_lightning.data.ImageNet9DataModule` logs,
    with ``stage`` ``test`` or ``val``:

    - ``<stage>/<variant>/acc1``: top-1 accuracy in ``[0, 1]`` on each variant of the DataModule;
    - ``<stage>/bg_gap``: ``mixed_same`` minus ``mixed_rand`` accuracy, when both are evaluated.

    Args:
        model: a classifier class path (``"simpool_lightning.models.ImageClassifier"``) and its
            ``checkpoint``, or a built module; calling it on ``(B, 3, H, W)`` images gives logits
            ``(B, num_classes)``. The class count decides the scoring: 1000 maps the ImageNet-1k
            prediction to the 9 classes, 9 takes it as it is; any other count is an error at the
            first batch, naming the checkpoint.
        checkpoint: a Lightning checkpoint; ``None`` keeps the model's fresh weights.
        model_kwargs: constructor arguments without a checkpoint, overrides of its saved
            hyperparameters with one (see :func:`~simpool_lightning.evaluation.load_feature_model`).
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "simpool_lightning.models.ImageClassifier",
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[] if isinstance(model, str) else ["model"])
        self.classifier = load_feature_model(model, checkpoint, model_kwargs).requires_grad_(False).eval()
        self.source = f"checkpoint {checkpoint!r}" if checkpoint else type(self.classifier).__name__
        # One running accuracy per variant; DDP sums correct and total over processes.
        self.accuracy = nn.ModuleDict({variant: MeanMetric() for variant in IN9_VARIANTS})
        self.variants: tuple[str, ...] = ()

    def in9_predictions(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images -> ``(B,)`` ImageNet-9 predictions in ``[-1, 9)`` (-1: outside the nine)."""
        logits = self.classifier(images)
        # The class count is read from the logits: under LightningCLI a model rebuilt inside this
        # module's __init__ gets this module's hparams, so its own hparams.num_classes cannot be trusted.
        num_classes = logits.shape[1] if logits.dim() == 2 else None
        if num_classes == IN1K_CLASSES:
            return predict_in9(logits)
        if num_classes == len(IN9_CLASSES):
            return logits.argmax(dim=1)
        raise ValueError(
            f"{self.source}: ImageNet-9 evaluation needs (B, {IN1K_CLASSES}) logits of an ImageNet-1k classifier "
            f"(mapped to the 9 classes) or (B, {len(IN9_CLASSES)}) logits of one trained on ImageNet-9; "
            f"it returned {tuple(logits.shape)}"
        )

    def _start(self) -> None:
        variants = getattr(self.trainer.datamodule, "variants", None)
        if variants is None:
            raise RuntimeError(
                f"{type(self).__name__} needs an ImageNet9DataModule (a DataModule with `variants`, one loader each)"
            )
        self.variants = tuple(variants)
        for metric in self.accuracy.values():
            metric.reset()

    def _step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        correct = self.in9_predictions(batch["image"]) == batch["label"]
        self.accuracy[self.variants[dataloader_idx]].update(correct.float())

    def _end(self, stage: str) -> None:
        accuracy = {variant: self.accuracy[variant].compute() for variant in self.variants}
        metrics = {f"{stage}/{variant}/acc1": acc for variant, acc in accuracy.items()}
        if "mixed_same" in accuracy and "mixed_rand" in accuracy:
            metrics[f"{stage}/bg_gap"] = accuracy["mixed_same"] - accuracy["mixed_rand"]
        self.log_dict(metrics, add_dataloader_idx=False)
