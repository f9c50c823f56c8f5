"""ImageClassifier: supervised training and fine-tuning of any timm backbone with any pooling."""
from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import Tensor, nn
from torchmetrics import MetricCollection

from ..metrics.accuracy import topk_accuracy
from ..metrics.localization import CorLoc, MaskIoU
from .backbone import PooledBackbone, PoolPlacement
from .lr_scaling import LRScale, check_lr_settings, resolve_lr
from .optim import create_optimizer
from .schedules import cosine_schedule

__all__ = ["ImageClassifier", "attention_to_maps", "describe_attention"]


def attention_to_maps(attn: Tensor, size: Optional[tuple[int, int]] = None, per_head: bool = False) -> Tensor:
    """Pool attention ``(B, heads, h, w)`` -> maps ``(B, h, w)`` (mean over heads) or per head.

    With ``size`` the maps are upsampled bilinearly and renormalised to sum to 1 again.
    """
    maps = attn.float() if per_head else attn.float().mean(1, keepdim=True)
    if size is not None and tuple(maps.shape[-2:]) != tuple(size):
        maps = F.interpolate(maps, size=size, mode="bilinear", align_corners=False).clamp_min(0)
        maps = maps / maps.flatten(-2).sum(-1)[..., None, None].clamp_min(1e-12)
    return maps if per_head else maps[:, 0]


def describe_attention(backbone: PooledBackbone) -> Optional[str]:
    """Which attention map ``attention_maps`` shows, in words; ``None`` for a pool without one."""
    if not backbone.has_attention:
        return None
    if backbone.pool is None:
        heads = backbone.model.blocks[-1].attn.num_heads
        return f"the last block's [CLS] attention, averaged over its {heads} heads"
    what = "SimPool's attention" if backbone.pool_name == "simpool" else f"the {backbone.pool_name!r} pool's attention"
    heads = getattr(backbone.pool, "num_heads", 1)
    return what if heads == 1 else f"{what}, averaged over its {heads} heads"


class _Net(nn.Module):
    """Backbone + pool + linear head: what the optimizer trains and EMA averages."""

    def __init__(self, backbone: PooledBackbone, num_classes: int, drop_rate: float) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(backbone.out_dim, num_classes))

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))


class ImageClassifier(pl.LightningModule):
    """Supervised image classification: timm backbone -> pool -> linear head.

    Args:
        backbone: any timm model name.
        backbone_kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``, ``depth`` ...).
        pool: a name from ``list_pools()``, or ``"token"`` for a ViT's own [CLS] token. For a ViT with
            any other pool the [CLS] token is dropped (the model is built without one).
        pool_kwargs: passed to ``create_pool`` (``gamma``, ``num_heads``, ``use_beta`` ...).
        placement: pool ``"after_norm"`` (supervised default) or ``"before_norm"`` (the DINO variant).
        num_classes: classes of the head, which always starts fresh.
        pretrained: load timm's pretrained backbone weights.
        pretrained_path: fine-tune from this file (instead of ``pretrained``): a checkpoint of an
            ``ImageClassifier`` (its backbone and pool) or of ``DINO`` (its teacher's), an official
            SimPool checkpoint (``.pth.tar`` of the timm fork, or the DINO fork's file: the teacher),
            or a plain timm state dict (the timm model only; the pool starts fresh). Backbone and
            pool load strictly and the head never does; a mismatch lists the missing, unexpected
            and mis-shaped keys and names the file. See :mod:`simpool_lightning.models.backbone`.
        pretrained_weights_only: read ``pretrained_path`` with ``torch.load(weights_only=True)``
            (tensors, plain containers and ``argparse.Namespace``: official checkpoints read with
            it); ``False`` only for a file you trust that holds other objects.
        drop_rate: dropout before the head. ``drop_path_rate``: stochastic depth of the backbone.
        label_smoothing: of the cross-entropy (and of the mixed targets with mixup/cutmix).
        mixup_alpha, cutmix_alpha, mixup_prob, mixup_switch_prob: timm's ``Mixup``; off when both
            alphas are 0. Needs an even batch size.
        optimizer: a ``timm.optim`` name: ``adamw``, ``sgd``, ``lamb``, ``lars`` ...
        lr: peak learning rate, used as given whatever the batch. None (default): from ``lr_base``.
        lr_base, lr_base_size, lr_base_scale: peak learning rate ``lr_base`` at the global batch
            ``lr_base_size``, scaled in ``configure_optimizers`` to this run's global batch (the
            training loader's batch size x ``trainer.world_size`` x gradient-accumulation steps),
            ``"linear"`` or ``"sqrt"`` in the ratio; ``lr_base_scale=None`` picks as timm's
            ``train.py`` does (sqrt for adaptive optimizers such as AdamW, linear for SGD and LARS).
            ``lr_base_size=None`` uses ``lr_base`` unscaled (5e-4 with nothing set). See
            :mod:`simpool_lightning.models.lr_scaling`; the result is ``lr_scaled``, also logged
            as a hyperparameter.
        weight_decay, momentum: optimizer settings (no weight decay on biases and norms).
        warmup_epochs, warmup_lr, min_lr: per-step linear warm-up from ``warmup_lr`` to the peak
            learning rate, then cosine to ``min_lr`` at the end of training (neither is scaled).
        ema_decay: keep a model EMA (timm's ``ModelEmaV3``) with this decay and validate it as
            ``val_ema/*``; ``None`` for none.
        attention_mass: attention mass kept when thresholding maps for mask IoU and CorLoc.

    A checkpoint of this model holds every weight, so it records ``pretrained=False`` and
    ``pretrained_path=None``: reloading it never reads (or downloads) the starting weights again.
    It also keeps :attr:`classes`, the class names of the DataModule it was fitted on (its
    ``classes``, when it has one per output), which ``predict`` names its classes by.
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        pool: str = "simpool",
        pool_kwargs: Optional[dict[str, Any]] = None,
        placement: PoolPlacement = "after_norm",
        num_classes: int = 1000,
        pretrained: bool = False,
        pretrained_path: Optional[str] = None,
        pretrained_weights_only: bool = True,
        drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        label_smoothing: float = 0.0,
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        optimizer: str = "adamw",
        lr: Optional[float] = None,
        lr_base: float = 5e-4,
        lr_base_size: Optional[int] = None,
        lr_base_scale: Optional[LRScale] = None,
        weight_decay: float = 0.05,
        momentum: float = 0.9,
        warmup_epochs: float = 5.0,
        warmup_lr: float = 1e-6,
        min_lr: float = 1e-5,
        ema_decay: Optional[float] = None,
        attention_mass: float = 0.6,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        check_lr_settings(lr, lr_base, lr_base_size, lr_base_scale)
        self.lr_scaled: Optional[float] = None  # the peak learning rate, resolved in configure_optimizers
        model_kwargs = dict(backbone_kwargs or {})
        if drop_path_rate:
            model_kwargs["drop_path_rate"] = drop_path_rate
        self.net = _Net(
            PooledBackbone(
                backbone, pool, pool_kwargs, placement, pretrained, pretrained_path,
                weights_only=pretrained_weights_only, **model_kwargs,
            ),
            num_classes,
            drop_rate,
        )
        self.ema = ModelEmaV3(self.net, decay=ema_decay) if ema_decay is not None else None

        self.mixup = None
        if mixup_alpha > 0 or cutmix_alpha > 0:
            self.mixup = Mixup(
                mixup_alpha=mixup_alpha,
                cutmix_alpha=cutmix_alpha,
                prob=mixup_prob,
                switch_prob=mixup_switch_prob,
                label_smoothing=label_smoothing,
                num_classes=num_classes,
            )
        self.soft_loss = SoftTargetCrossEntropy()

        self.val_metrics = topk_accuracy(num_classes, "val/")
        self.val_ema_metrics = topk_accuracy(num_classes, "val_ema/")
        self.test_metrics = topk_accuracy(num_classes, "test/")
        self.val_localization = MetricCollection(
            {"mask_iou": MaskIoU(mass=attention_mass), "corloc": CorLoc(mass=attention_mass)},
            prefix="val/",
            compute_groups=False,
        )
        self.test_localization = self.val_localization.clone(prefix="test/")
        self.classes: Optional[list[str]] = None  # set at fit from the DataModule; kept in checkpoints

    # ------------------------------------------------------------------ the model

    @property
    def backbone(self) -> PooledBackbone:
        return self.net.backbone

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> logits ``(B, num_classes)``."""
        return self.net(images)

    def features(self, images: Tensor) -> Tensor:
        """The pooled representation the head sees: ``(B, 3, H, W)`` -> ``(B, D)``."""
        return self.backbone(images)

    def attention_maps(
        self, images: Tensor, size: Optional[tuple[int, int]] = None, per_head: bool = False
    ) -> Tensor:
        """Spatial attention of the pool (``token``: the last block's [CLS] attention).

        Args:
            images: ``(B, 3, H, W)``.
            size: upsample to this ``(H, W)`` (renormalised); the feature grid when ``None``.
            per_head: keep heads: ``(B, heads, h, w)`` instead of their mean ``(B, h, w)``.

        Raises:
            ValueError: the pool has no spatial attention (e.g. ``avg``); the message names it.
        """
        if not self.backbone.has_attention:
            raise ValueError(f"pool {self.hparams.pool!r} has no spatial attention to show as a map")
        _, attn = self.backbone.forward_with_attention(images)
        return attention_to_maps(attn, size, per_head)

    @property
    def attention_source(self) -> Optional[str]:
        """Which map :meth:`attention_maps` shows, in words (``None`` for a pool without attention)."""
        return describe_attention(self.backbone)

    # ------------------------------------------------------------------ training

    def setup(self, stage: str) -> None:
        data_classes = getattr(self.trainer.datamodule, "num_classes", None) if self.trainer.datamodule else None
        if data_classes is not None and data_classes != self.hparams.num_classes:
            raise ValueError(
                f"model.num_classes ({self.hparams.num_classes}) != the data's num_classes ({data_classes}); "
                "set them equal (configs interpolate ${data.init_args.num_classes})"
            )
        data_names = getattr(self.trainer.datamodule, "classes", None) if self.trainer.datamodule else None
        if stage == "fit" and data_names is not None and len(data_names) == self.hparams.num_classes:
            self.classes = [str(name) for name in data_names]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["hyper_parameters"].update(pretrained=False, pretrained_path=None)
        if self.classes is not None:
            checkpoint["classes"] = list(self.classes)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The names of the fit's own DataModule, when this is a resumed fit, come first.
        if self.classes is None and checkpoint.get("classes") is not None:
            self.classes = [str(name) for name in checkpoint["classes"]]

    def on_train_start(self) -> None:
        # A resumed fit gets the scheduler's base rate back from the checkpoint, the rate of the run
        # that saved it; the rate follows this run's global batch instead (the same number when world
        # size and batch are unchanged: base * factor(step) is what the scheduler computed, bit for bit).
        scheduler = self.lr_schedulers()
        scheduler.base_lrs = [self.lr_scaled for _ in scheduler.base_lrs]
        for group, base, factor in zip(scheduler.optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
            group["initial_lr"], group["lr"] = base, base * factor(scheduler.last_epoch)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        images, labels = batch["image"], batch["label"]
        if self.mixup is not None:
            if images.shape[0] % 2:
                raise ValueError(f"mixup/cutmix needs an even batch size, got {images.shape[0]}")
            images, targets = self.mixup(images, labels)
            loss = self.soft_loss(self(images), targets)
        else:
            loss = F.cross_entropy(self(images), labels, label_smoothing=self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite training loss ({loss.item()}) at global step {self.global_step}, epoch {self.current_epoch}; "
                "the last checkpoint saved before this step is intact"
            )
        self.log("train/loss", loss, prog_bar=True, batch_size=images.shape[0])
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.net, step=self.global_step)

    def _evaluate(self, batch: dict[str, Any], metrics: MetricCollection, localization: MetricCollection, stage: str) -> None:
        images, labels = batch["image"], batch["label"]
        wants_maps = self.backbone.has_attention and ("mask" in batch or "boxes" in batch)
        if wants_maps:
            pooled, attn = self.backbone.forward_with_attention(images)
            logits = self.net.head(pooled)
            maps = attention_to_maps(attn, tuple(images.shape[-2:]))
            if "mask" in batch:
                localization["mask_iou"].update(maps, batch["mask"])
            if "boxes" in batch:
                localization["corloc"].update(maps, batch["boxes"])
        else:
            logits = self(images)
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), sync_dist=True, batch_size=images.shape[0])
        metrics.update(logits, labels)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.val_metrics, self.val_localization, "val")
        if self.ema is not None:
            self.val_ema_metrics.update(self.ema.module(batch["image"]), batch["label"])

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, self.test_metrics, self.test_localization, "test")

    def _log_epoch(self, *collections: MetricCollection) -> None:
        for collection in collections:
            for name, metric in collection.items():
                if metric.update_called:  # localization only runs where batches carry masks or boxes
                    self.log(name, metric.compute(), prog_bar=name.endswith("acc1"))
            collection.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_epoch(self.val_metrics, self.val_ema_metrics, self.val_localization)

    def on_test_epoch_end(self) -> None:
        self._log_epoch(self.test_metrics, self.test_localization)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """Top-k probabilities and classes, and the attention map at image size where the pool has one."""
        images = batch["image"]
        out: dict[str, Tensor] = {}
        if self.backbone.has_attention:
            pooled, attn = self.backbone.forward_with_attention(images)
            logits = self.net.head(pooled)
            out["attention"] = attention_to_maps(attn, tuple(images.shape[-2:]))
        else:
            logits = self(images)
        probs, classes = logits.softmax(-1).topk(min(5, logits.shape[-1]), dim=-1)
        out.update(topk_probs=probs, topk_classes=classes)
        if "label" in batch:
            out["label"] = batch["label"]
        return out

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        total = int(self.trainer.estimated_stepping_batches)
        lr = self.lr_scaled = resolve_lr(self.trainer, hp.optimizer, hp.lr, hp.lr_base, hp.lr_base_size, hp.lr_base_scale)
        optimizer = create_optimizer(self.net, hp.optimizer, lr, hp.weight_decay, hp.momentum)
        epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 1
        warmup = min(total, round(hp.warmup_epochs * total / epochs))

        def factor(step: int) -> float:
            return cosine_schedule(step, total, 1.0, hp.min_lr / lr, warmup, hp.warmup_lr / lr)

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
