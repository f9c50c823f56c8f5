"""Linear probe: a linear classifier trained on the frozen features of any model (DINO's ``eval_linear.py``)."""
from __future__ import annotations

from typing import Any, Optional, Union

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics.accuracy import topk_accuracy
from ..models.schedules import cosine_schedule
from .frozen import FrozenFeatures, load_feature_model

__all__ = ["LinearProbe"]


class LinearProbe(pl.LightningModule):
    """Linear classification on frozen features: the backbone is fixed, only the linear layer learns.

    Args:
        model: the feature model: a LightningModule class path (``"simpool_lightning.models.DINO"``,
            ``"simpool_lightning.models.ImageClassifier"``, or just ``"DINO"``) or a built module;
            anything with ``features(images) -> (B, D)``.
        checkpoint: its Lightning checkpoint (see :func:`~simpool_lightning.evaluation.load_feature_model`);
            ``None`` probes the freshly initialised model.
        model_kwargs: constructor arguments without a checkpoint, overrides with one.
        num_classes: classes of the linear layer.
        use_bn: a BatchNorm without affine parameters before the linear layer (MAE's probe):
            normalises the features, which makes one learning rate fit any backbone.
        lr: SGD learning rate at the start, for the global batch. DINO: ``0.001 * batch / 256``.
        momentum, weight_decay: SGD settings (DINO: 0.9, 0).
        min_lr: the per-step cosine ends here (DINO: 0).

    The backbone stays in eval mode (BatchNorm statistics unchanged) and gets no gradients; the
    linear layer starts from N(0, 0.01) weights and zero bias, as DINO's. Logs ``val/acc1`` and
    ``val/acc5`` (``test/...`` under test).
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "simpool_lightning.models.DINO",
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        num_classes: int = 1000,
        use_bn: bool = False,
        lr: float = 1e-3,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        min_lr: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[] if isinstance(model, str) else ["model"])
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        self.encoder = FrozenFeatures(load_feature_model(model, checkpoint, model_kwargs))
        dim = self.encoder.out_dim
        linear = nn.Linear(dim, num_classes)
        nn.init.normal_(linear.weight, std=0.01)
        nn.init.zeros_(linear.bias)
        self.head = nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear) if use_bn else linear

        self.val_metrics = topk_accuracy(num_classes, "val/")
        self.test_metrics = topk_accuracy(num_classes, "test/")

    def features(self, images: Tensor) -> Tensor:
        """The frozen model's features: ``(B, 3, H, W)`` -> ``(B, D)``."""
        return self.encoder(images)

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        return self.head(self.encoder(images))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = F.cross_entropy(self(batch["image"]), batch["label"])
        self.log("train/loss", loss, prog_bar=True, batch_size=batch["label"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.val_metrics.update(self(batch["image"]), batch["label"])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.test_metrics.update(self(batch["image"]), batch["label"])

    def on_validation_epoch_end(self) -> None:
        self.log_dict(self.val_metrics.compute(), prog_bar=True)
        self.val_metrics.reset()

    def on_test_epoch_end(self) -> None:
        self.log_dict(self.test_metrics.compute())
        self.test_metrics.reset()

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        optimizer = torch.optim.SGD(self.head.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: cosine_schedule(step, total, 1.0, hp.min_lr / hp.lr))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
