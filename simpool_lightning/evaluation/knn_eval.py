"""Weighted k-NN evaluation of any model on a DataModule (DINO's ``eval_knn.py`` protocol).

The reference set is the DataModule's training split without its augmentation (no random crops,
flips or multi-crop: the validation transform), as DINO extracts it; the queries are the
validation split. Each
query takes a vote of its ``k`` most cosine-similar references weighted by ``exp(cos / T)``.

Two entry points share this:

- :class:`KNNEvaluator`, a LightningModule around any checkpoint, for the CLI::

      simpool validate -c configs/dino/knn.yaml --model.init_args.checkpoint <run>/checkpoints/last.ckpt

- :class:`KNNCallback`, which scores the model being trained every few epochs (DINO's
  ``--eval_every``).

Under DDP each process extracts a shard of the reference set and the shards are all-gathered, so
every process votes against the whole set.
"""
from __future__ import annotations

import copy
from typing import Any, Callable, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..metrics.accuracy import topk_values
from .frozen import FrozenFeatures, load_feature_model
from ..metrics.knn import KNNAccuracy, gather_features, knn_classify, knn_topk_correct

__all__ = ["AUGMENTATION_ATTRIBUTES", "KNNCallback", "KNNEvaluator", "extract_features", "reference_split"]


def _single_loader(loaders: Any, name: str) -> DataLoader:
    loader = loaders[0] if isinstance(loaders, (list, tuple)) else loaders
    if not isinstance(loader, DataLoader):
        raise TypeError(f"k-NN needs the DataModule's {name} to return a DataLoader, got {type(loader).__name__}")
    return loader


# Dataset attributes that carry training augmentation in this package: a generic transform, the
# synthetic data's flip, and the multi-crop of self-supervised training.
AUGMENTATION_ATTRIBUTES = ("transform", "hflip", "multi_crop")


def reference_split(datamodule: pl.LightningDataModule) -> tuple[Dataset, DataLoader]:
    """The training split without its augmentation, and the validation loader (for its settings).

    The training dataset is copied and each of its :data:`AUGMENTATION_ATTRIBUTES` that the
    validation dataset also has is set to the validation dataset's value, so training
    augmentation and multi-crop do not reach the reference features. A training dataset without
    any of them is used as it is, with a warning.
    """
    train = _single_loader(datamodule.train_dataloader(), "train_dataloader()").dataset
    val_loader = _single_loader(datamodule.val_dataloader(), "val_dataloader()")
    shared = [a for a in AUGMENTATION_ATTRIBUTES if hasattr(train, a) and hasattr(val_loader.dataset, a)]
    if shared:
        train = copy.copy(train)
        for attribute in shared:
            setattr(train, attribute, getattr(val_loader.dataset, attribute))
    else:
        rank_zero_warn(
            f"{type(train).__name__} has none of {AUGMENTATION_ATTRIBUTES}: k-NN references keep its training augmentation"
        )
    return train, val_loader


@torch.no_grad()
def extract_features(
    features: Callable[[Tensor], Tensor], dataset: Dataset, like: DataLoader, device: torch.device, rank: int = 0, world_size: int = 1
) -> tuple[Tensor, Tensor]:
    """Features and labels of every sample of ``dataset``: this process extracts samples
    ``rank, rank + world_size, ...`` and the shards are gathered in rank order.

    Args:
        features: ``(B, 3, H, W)`` -> ``(B, D)``.
        dataset: dict samples with ``image`` and ``label``.
        like: a loader whose batch size, workers and collate function to use.

    Returns:
        ``(features (N, D) float32, labels (N,))`` on ``device``, N the length of ``dataset``.
    """
    shard = Subset(dataset, range(rank, len(dataset), world_size))  # type: ignore[arg-type]
    loader = DataLoader(shard, batch_size=like.batch_size or 256, num_workers=like.num_workers, collate_fn=like.collate_fn)
    feats, labels = [], []
    for batch in loader:
        feats.append(features(batch["image"].to(device)).float())
        labels.append(torch.as_tensor(batch["label"]).to(device))
    if not feats:
        raise ValueError("the k-NN reference shard is empty: the training split has fewer samples than processes")
    return gather_features(torch.cat(feats), torch.cat(labels))


class KNNEvaluator(pl.LightningModule):
    """Weighted k-NN accuracy of a frozen model's ``features``: ``validate`` logs ``knn/acc1`` and (more than 5 classes) ``knn/acc5``.

    Top-5 counts the first ``min(5, k)`` classes by vote, as DINO's ``knn_classifier`` does (see
    :func:`~simpool_lightning.metrics.knn_topk_correct`).

    Args:
        model, checkpoint, model_kwargs: the feature model, as for
            :class:`~simpool_lightning.evaluation.LinearProbe`: a class path (``"DINO"``,
            ``"simpool_lightning.models.ImageClassifier"``) and its checkpoint, or a built module;
            without a checkpoint, the randomly initialised baseline.
        num_classes: label classes; ``None`` takes the largest reference label + 1.
        k: neighbours per query (DINO: 20).
        temperature: ``T`` of the vote weights (DINO: 0.07).

    Needs a DataModule (``trainer.validate(evaluator, datamodule=...)``): its training split is
    the reference set, extracted at the start of every validation.
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "simpool_lightning.models.DINO",
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        num_classes: Optional[int] = None,
        k: int = 20,
        temperature: float = 0.07,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[] if isinstance(model, str) else ["model"])
        if k < 1 or temperature <= 0:
            raise ValueError(f"need k >= 1 and temperature > 0, got {k=}, {temperature=}")
        self.encoder = FrozenFeatures(load_feature_model(model, checkpoint, model_kwargs))
        self._references: Optional[tuple[Tensor, Tensor]] = None
        self._num_classes = 0
        self._metrics: Optional[nn.ModuleList] = None

    def features(self, images: Tensor) -> Tensor:
        """The frozen model's features: ``(B, 3, H, W)`` -> ``(B, D)``."""
        return self.encoder(images)

    def on_validation_epoch_start(self) -> None:
        datamodule = self.trainer.datamodule
        if datamodule is None:
            raise RuntimeError("KNNEvaluator needs a DataModule: its training split is the k-NN reference set")
        dataset, like = reference_split(datamodule)
        self._references = extract_features(self.encoder, dataset, like, self.device, self.global_rank, self.trainer.world_size)
        self._num_classes = self.hparams.num_classes or int(self._references[1].max()) + 1
        voters = min(self.hparams.k, len(self._references[1]))  # knn_classify caps k the same way
        self._metrics = nn.ModuleList(KNNAccuracy(top_k, voters) for top_k in topk_values(self._num_classes)).to(self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        features, labels = self._references
        probs = knn_classify(
            features, labels, self.encoder(batch["image"]), self._num_classes, self.hparams.k, self.hparams.temperature
        )
        for metric in self._metrics:
            metric.update(probs, batch["label"])

    def on_validation_epoch_end(self) -> None:
        self.log_dict({f"knn/acc{metric.top_k}": metric.compute() for metric in self._metrics}, prog_bar=True)
        self._references = None  # the next validation extracts them again; do not hold them meanwhile


class KNNCallback(pl.Callback):
    """k-NN accuracy of the model in training (its ``features``), every ``every_n_epochs`` epochs.

    Extracts the reference set (the training split without its augmentation) and the
    validation split at the end of a training epoch, in eval mode, and logs ``knn/acc1`` and
    ``knn/acc5`` (DINO's rule: the first ``min(5, k)`` classes by vote). Needs the DataModule to
    carry labels.

    Args:
        every_n_epochs: run after every n-th epoch, and after the last one.
        k, temperature: the vote (DINO: 20, 0.07).
    """

    def __init__(self, every_n_epochs: int = 1, k: int = 20, temperature: float = 0.07) -> None:
        super().__init__()
        if every_n_epochs < 1 or k < 1 or temperature <= 0:
            raise ValueError(f"need every_n_epochs >= 1, k >= 1 and temperature > 0, got {every_n_epochs=}, {k=}, {temperature=}")
        self.every_n_epochs = every_n_epochs
        self.k = k
        self.temperature = temperature

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        if epoch % self.every_n_epochs and epoch != trainer.max_epochs:
            return
        if trainer.datamodule is None:
            raise RuntimeError("KNNCallback needs a DataModule: its training split is the k-NN reference set")
        modes = {module: module.training for module in pl_module.modules()}
        pl_module.eval()
        try:
            dataset, val_loader = reference_split(trainer.datamodule)
            where = (pl_module.device, trainer.global_rank, trainer.world_size)
            references, labels = extract_features(pl_module.features, dataset, val_loader, *where)
            queries, query_labels = extract_features(pl_module.features, val_loader.dataset, val_loader, *where)
        finally:
            for module, training in modes.items():
                module.training = training
        num_classes = int(max(labels.max(), query_labels.max())) + 1
        probs = knn_classify(references, labels, queries, num_classes, self.k, self.temperature)
        voters = min(self.k, len(labels))  # knn_classify caps k the same way
        # Every process holds all references and queries, so every process logs the same numbers.
        pl_module.log_dict(
            {
                f"knn/acc{top_k}": knn_topk_correct(probs, query_labels, top_k, voters).float().mean()
                for top_k in topk_values(num_classes)
            },
            prog_bar=True,
        )
