"""Localization quality of any checkpoint's attention maps, for the CLI.

:class:`LocalizationEvaluator` loads a trained model (``ImageClassifier`` or ``DINO``, the
teacher) and scores ``model.attention_maps`` on whatever the batches carry:

- ``boxes``: MaxBoxAccV2 (``BoxAcc`` at IoU 0.3, 0.5, 0.7 and their mean; the paper's CUB and
  ImageNet protocol) and CorLoc (the object-discovery protocol on VOC07 / VOC12);
- ``mask``: mask IoU (Jaccard) of the thresholded map with the foreground mask.

::

    simpool test -c configs/downstream/loc_cub.yaml --data.init_args.root /data \\
        --model.init_args.checkpoint runs/supervised/vit_s_simpool/checkpoints/last.ckpt

The maps are upsampled to the batch's image size, the frame its boxes and masks are given in.
Every metric is a torchmetrics object that sums its counts, so under DDP each process scores its
shard (the evaluation sampler does not pad) and the logged numbers cover the whole dataset.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torchmetrics import Metric

from ..models.backbone import PooledBackbone
from .frozen import FrozenEvaluator, load_feature_model
from ..metrics.localization import CorLoc, MaskIoU, MaxBoxAccV2

__all__ = ["LocalizationEvaluator"]


class LocalizationEvaluator(FrozenEvaluator):
    """Scores a frozen model's attention maps against ground-truth boxes and masks.

    ``validate`` logs under ``val/``, ``test`` under ``test/``: ``MaxBoxAccV2`` and
    ``BoxAcc@{iou}`` and ``corloc`` where batches have ``boxes``, ``mask_iou`` where they have
    ``mask`` (all in ``[0, 1]``).

    Args:
        model, checkpoint, model_kwargs: the model, as for
            :func:`~simpool_lightning.evaluation.load_feature_model`: a class path
            (``"simpool_lightning.models.ImageClassifier"``, ``"DINO"``) and its Lightning
            checkpoint, or a built module. It needs ``attention_maps(images, size) -> (B, H, W)``.
        iou_thresholds: MaxBoxAccV2's IoU thresholds (wsolevaluation: 0.3, 0.5, 0.7).
        num_thresholds: MaxBoxAccV2's CAM thresholds swept over ``[0, 1)`` (wsolevaluation: 100).
        corloc_iou: IoU a CorLoc box needs with some ground-truth box (LOST: 0.5).
        mass: attention mass kept when thresholding maps for CorLoc and mask IoU (DINO: 0.6).

    Raises:
        ValueError: the model's pool has no spatial attention (e.g. ``avg``); the message names it.
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "simpool_lightning.models.ImageClassifier",
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
        num_thresholds: int = 100,
        corloc_iou: float = 0.5,
        mass: float = 0.6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[] if isinstance(model, str) else ["model"])
        self.model = load_feature_model(model, checkpoint, model_kwargs).eval().requires_grad_(False)
        if not callable(getattr(self.model, "attention_maps", None)):
            raise TypeError(f"{type(self.model).__name__} has no attention_maps(images, size) to evaluate")
        silent = sorted({m.pool_name for m in self.model.modules() if isinstance(m, PooledBackbone) and not m.has_attention})
        if silent:
            source = f"the checkpoint {checkpoint!r}" if checkpoint else f"the {type(self.model).__name__}"
            raise ValueError(
                f"{source} pools with {silent[0]!r}, which has no spatial attention to localize with; "
                f"evaluate a model whose pool has attention (simpool, token, ...)"
            )
        self.box_acc = MaxBoxAccV2(iou_thresholds=iou_thresholds, num_thresholds=num_thresholds)
        self.corloc = CorLoc(iou_threshold=corloc_iou, mass=mass)
        self.mask_iou = MaskIoU(mass=mass)

    def attention_maps(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> the model's attention maps upsampled to the images, ``(B, H, W)`` float32."""
        return self.model.attention_maps(images, size=tuple(images.shape[-2:])).float()

    def _step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        if "boxes" not in batch and "mask" not in batch:
            raise ValueError(f"localization needs batches with 'boxes' or 'mask'; this batch has {sorted(batch)}")
        maps = self.attention_maps(batch["image"])
        if "boxes" in batch:
            self.box_acc.update(maps, batch["boxes"])
            self.corloc.update(maps, batch["boxes"])
        if "mask" in batch:
            self.mask_iou.update(maps, batch["mask"])

    def _end(self, stage: str) -> None:
        scores: dict[str, Tensor] = {}
        metrics: dict[str, Metric] = {"box_acc": self.box_acc, "corloc": self.corloc, "mask_iou": self.mask_iou}
        for name, metric in metrics.items():
            if metric.update_called:  # only what the data carries
                value = metric.compute()  # MaxBoxAccV2 gives its own names: MaxBoxAccV2, BoxAcc@0.3 ...
                scores.update(value if isinstance(value, dict) else {name: value})
            metric.reset()
        self.log_dict({f"{stage}/{name}": value for name, value in scores.items()}, prog_bar=True)

