"""DINO: self-distillation with no labels, a student and an EMA teacher over multi-crop views.

The training story follows DINO's ``main_dino.py`` (and the SimPool fork of it): per-iteration
schedules for learning rate, weight decay and teacher momentum, the teacher temperature warmed
up per epoch, DINO's per-parameter gradient clipping, and the head's last layer frozen for the
first epoch. Lightning runs the loop, devices and precision.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Literal, Optional, Sequence

import pytorch_lightning as pl
import torch
from timm.optim import Lars
from torch import Tensor, nn
from torch.optim import Optimizer

from .backbone import TOKEN_POOL, PooledBackbone, PoolPlacement, _create_timm_model
from .classifier import attention_to_maps, describe_attention
from .dino_head import DINOHead, DINOLoss, MultiCropNet
from .lr_scaling import LRScale, check_lr_settings, resolve_lr
from .optim import fused_supported
from .schedules import cosine_schedule

__all__ = ["DINO", "clip_gradients_per_parameter", "dino_param_groups"]

NUM_GLOBAL_CROPS = 2  # the teacher sees the two global crops; the student sees all of them


def clip_gradients_per_parameter(parameters: Iterable[nn.Parameter], max_norm: float) -> None:
    """DINO's clipping: scale each parameter's gradient to norm at most ``max_norm``, independently.

    Unlike ``clip_grad_norm_`` (one norm over all gradients), a large gradient in one layer does
    not shrink the others.
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))
    # DINO's coefficient max_norm / (norm + 1e-6), applied only where it is below 1.
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    torch._foreach_mul_(grads, list(scale.to(grads[0].dtype).unbind()))


def dino_param_groups(module: nn.Module) -> list[dict[str, Any]]:
    """Trainable parameters in two groups: regularised, and biases and norms without weight decay.

    The first group carries ``regularized=True``: the weight-decay schedule applies to it only.
    """
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if name.endswith(".bias") or param.dim() == 1 else decay).append(param)
    return [
        {"params": decay, "regularized": True},
        {"params": no_decay, "weight_decay": 0.0, "regularized": False},
    ]


def _probe_timm_model(name: str, model_kwargs: dict[str, Any]) -> nn.Module:
    """Build timm model ``name`` on the meta device (no memory, no initialisation) to read its structure."""
    with torch.device("meta"):
        return _create_timm_model(name, False, None, num_classes=0, global_pool="", **model_kwargs)


class DINO(pl.LightningModule):
    """DINO self-supervised training of any timm backbone with any pooling.

    A batch is a dict whose ``image`` is a list of crops: 2 global ``(B, 3, G, G)`` then N local
    ``(B, 3, L, L)``, as :class:`~simpool_lightning.data.MultiCropTransform` and
    :func:`~simpool_lightning.data.collate_samples` make them. Labels, if any, are not used.

    Args:
        backbone: any timm model name.
        backbone_kwargs: passed to ``timm.create_model`` for student and teacher (``img_size``,
            ``patch_size``, ``depth`` ...). Stochastic depth goes in ``drop_path_rate`` instead.
            A ViT gets ``dynamic_img_size=True`` unless given, so local crops of another size
            resample its position embeddings.
        pool: a name from ``list_pools()``, or ``"token"`` for a ViT's own [CLS] token.
        pool_kwargs: passed to ``create_pool`` (``gamma``, ``num_heads`` ...).
        placement: where the pool reads a ViT's tokens. ``None`` picks ``"before_norm"`` (pool the
            tokens, then the final norm, as the official DINO fork) for a model with a final norm
            and a pool other than ``token``, and ``"after_norm"`` otherwise (CNNs).
        pretrained: initialise both networks from timm's pretrained weights.
        pretrained_path: initialise both networks' backbone and pool from this file instead: an
            ``ImageClassifier`` or ``DINO`` checkpoint, an official SimPool checkpoint or a plain
            timm state dict, loaded strictly (see :class:`~simpool_lightning.models.PooledBackbone`).
        pretrained_weights_only: read ``pretrained_path`` with ``torch.load(weights_only=True)``
            (tensors, plain containers and ``argparse.Namespace``: official checkpoints read with
            it); ``False`` only for a file you trust that holds other objects.
        drop_path_rate: the student's stochastic depth; the teacher has none, as in DINO.
        out_dim: prototypes ``K`` of the head (65536 for ViT-S, 60000 for ResNet-50 in the paper).
        use_bn_in_head: BatchNorm in the head's MLP (DINO's ResNet-50 recipe).
        norm_last_layer: fix the magnitude of the prototypes to 1 (see :class:`DINOHead`).
        head_layers, head_hidden_dim, head_bottleneck_dim: the head's MLP (3, 2048, 256 in DINO).
        student_temp: student softmax temperature (0.1).
        center_momentum: EMA momentum of the teacher's center (0.9).
        teacher_temp: teacher softmax temperature after the warm-up.
        warmup_teacher_temp: teacher temperature in epoch 0; it rises linearly per epoch to
            ``teacher_temp`` at epoch ``warmup_teacher_temp_epochs - 1`` and stays there.
        warmup_teacher_temp_epochs: epochs of that warm-up.
        momentum_teacher: teacher EMA momentum at step 0; it rises to 1 with a per-step cosine.
        optimizer: ``"adamw"`` (ViTs), ``"sgd"`` (momentum 0.9) or ``"lars"`` (timm's LARS,
            momentum 0.9; for CNNs and large batches).
        lr: peak learning rate after warm-up, used as given whatever the batch. None (default):
            from ``lr_base``.
        lr_base, lr_base_size, lr_base_scale: peak learning rate ``lr_base`` at the global batch
            ``lr_base_size``, scaled in ``configure_optimizers`` to this run's global batch (images,
            not crops: the training loader's batch size x ``trainer.world_size`` x accumulation
            steps). DINO's rule is linear per 256 images (``lr_base_size=256``,
            ``lr_base_scale="linear"``, as the recipes set it); ``lr_base_scale=None`` picks as
            timm's ``train.py`` (sqrt for AdamW, linear for SGD and LARS) and ``lr_base_size=None``
            uses ``lr_base`` unscaled (5e-4 with nothing set). See
            :mod:`simpool_lightning.models.lr_scaling`; the result is ``lr_scaled``, also logged
            as a hyperparameter.
        min_lr: learning rate at the end of the cosine (not scaled, as in DINO).
        warmup_epochs: epochs of linear learning-rate warm-up from 0 (per step).
        weight_decay, weight_decay_end: cosine weight-decay schedule per step (biases and norm
            parameters get none).
        freeze_last_layer: epochs during which the head's last layer is not updated (its
            gradients are dropped before the optimizer step).
        clip_grad: DINO's per-parameter gradient-norm clipping (see
            :func:`clip_gradients_per_parameter`); 0 disables it. Leave the Trainer's
            ``gradient_clip_val`` unset: that one clips the global norm, which DINO does not do.

    Attributes:
        student, teacher: :class:`MultiCropNet` (backbone, pool and head); the teacher gets no
            gradients and is not in the optimizer: it moves only by the EMA after each step.
        criterion: :class:`DINOLoss`, which holds the center.
    """

    def __init__(
        self,
        backbone: str = "vit_small_patch16_224",
        backbone_kwargs: Optional[dict[str, Any]] = None,
        pool: str = "simpool",
        pool_kwargs: Optional[dict[str, Any]] = None,
        placement: Optional[PoolPlacement] = None,
        pretrained: bool = False,
        pretrained_path: Optional[str] = None,
        pretrained_weights_only: bool = True,
        drop_path_rate: float = 0.1,
        out_dim: int = 65536,
        use_bn_in_head: bool = False,
        norm_last_layer: bool = True,
        head_layers: int = 3,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        student_temp: float = 0.1,
        center_momentum: float = 0.9,
        teacher_temp: float = 0.04,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 0,
        momentum_teacher: float = 0.996,
        optimizer: Literal["adamw", "sgd", "lars"] = "adamw",
        lr: Optional[float] = None,
        lr_base: float = 5e-4,
        lr_base_size: Optional[int] = None,
        lr_base_scale: Optional[LRScale] = None,
        min_lr: float = 1e-6,
        warmup_epochs: float = 10,
        weight_decay: float = 0.04,
        weight_decay_end: float = 0.4,
        freeze_last_layer: int = 1,
        clip_grad: float = 3.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        model_kwargs = dict(backbone_kwargs or {})
        if "drop_path_rate" in model_kwargs:
            raise ValueError("set DINO's drop_path_rate, not backbone_kwargs['drop_path_rate']: the teacher has none")
        if optimizer not in ("adamw", "sgd", "lars"):
            raise ValueError(f"optimizer must be 'adamw', 'sgd' or 'lars', got {optimizer!r}")
        check_lr_settings(lr, lr_base, lr_base_size, lr_base_scale)
        if not 0 <= momentum_teacher <= 1:
            raise ValueError(f"momentum_teacher must be in [0, 1], got {momentum_teacher}")
        if min(teacher_temp, warmup_teacher_temp) <= 0 or warmup_teacher_temp_epochs < 0:
            raise ValueError(
                f"teacher temperatures must be > 0 and warmup_teacher_temp_epochs >= 0, got "
                f"{teacher_temp=}, {warmup_teacher_temp=}, {warmup_teacher_temp_epochs=}"
            )
        probe = _probe_timm_model(backbone, model_kwargs)
        if placement is None:
            norm = getattr(probe, "norm", None)
            has_final_norm = isinstance(norm, nn.Module) and not isinstance(norm, nn.Identity)
            placement = "before_norm" if pool != TOKEN_POOL and has_final_norm else "after_norm"
        if hasattr(probe, "dynamic_img_size") and "dynamic_img_size" not in model_kwargs:
            # Local crops are smaller than global ones: a ViT resamples its position embeddings, as DINO's does.
            model_kwargs["dynamic_img_size"] = True

        def network(**extra: Any) -> MultiCropNet:
            net = PooledBackbone(
                backbone, pool, pool_kwargs, placement, pretrained, pretrained_path,
                weights_only=pretrained_weights_only, **model_kwargs, **extra,
            )
            head = DINOHead(
                net.out_dim, out_dim, use_bn_in_head, norm_last_layer, head_layers, head_hidden_dim, head_bottleneck_dim
            )
            return MultiCropNet(net, head)

        self.student = network(**({"drop_path_rate": drop_path_rate} if drop_path_rate else {}))
        self.teacher = network()
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.criterion = DINOLoss(out_dim, student_temp, center_momentum)
        self.feature_dim: int = self.teacher.backbone.out_dim
        self._total_steps = 0
        self._steps_per_epoch = 0
        self.lr_scaled: Optional[float] = None  # the peak learning rate, resolved in configure_optimizers

    # ------------------------------------------------------------------ representations

    def features(self, images: Tensor) -> Tensor:
        """The teacher's pooled representation (what k-NN and linear probes read): ``(B, 3, H, W)`` -> ``(B, D)``."""
        return self.teacher.backbone(images)

    def attention_maps(self, images: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        """The teacher pool's attention, averaged over heads: ``(B, 3, H, W)`` -> ``(B, h, w)``.

        ``size`` upsamples to ``(H, W)`` (renormalised to sum to 1). Raises ``ValueError`` for a
        pool without spatial attention (e.g. ``avg``).
        """
        backbone = self.teacher.backbone
        if not backbone.has_attention:
            raise ValueError(f"pool {self.hparams.pool!r} has no spatial attention to show as a map")
        return attention_to_maps(backbone.forward_with_attention(images)[1], size)

    @property
    def attention_source(self) -> Optional[str]:
        """Which map :meth:`attention_maps` shows, in words (``None`` for a pool without attention)."""
        what = describe_attention(self.teacher.backbone)
        return None if what is None else f"{what}, of the teacher"

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Tensor]:
        """``attention``: the teacher's map at the images' size, ``(B, H, W)`` (see :meth:`attention_maps`).

        Raises ``ValueError`` for a pool without spatial attention: DINO predicts no classes.
        """
        images = batch["image"]
        return {"attention": self.attention_maps(images, size=tuple(images.shape[-2:]))}

    # ------------------------------------------------------------------ schedules

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The weights are in the checkpoint: reloading it must not read the starting file again.
        checkpoint["hyper_parameters"].update(pretrained=False, pretrained_path=None)

    def on_train_start(self) -> None:
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total) or self.trainer.num_training_batches == float("inf"):
            raise ValueError("DINO's schedules need a finite run over a sized loader: set trainer.max_epochs or max_steps")
        self._total_steps = max(int(total), 1)
        self._steps_per_epoch = max(math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches), 1)

    def schedules(self, step: int, epoch: int) -> dict[str, float]:
        """Learning rate, weight decay and teacher momentum at optimizer step ``step``, teacher
        temperature at ``epoch`` (valid once training has started)."""
        hp = self.hparams
        total = self._total_steps
        warmup = min(round(hp.warmup_epochs * self._steps_per_epoch), total)
        warm = hp.warmup_teacher_temp_epochs
        progress = 1.0 if epoch >= warm else epoch / max(warm - 1, 1)
        return {
            "lr": cosine_schedule(step, total, self.lr_scaled, hp.min_lr, warmup),
            "wd": cosine_schedule(step, total, hp.weight_decay, hp.weight_decay_end),
            "momentum": cosine_schedule(step, total, hp.momentum_teacher, 1.0),
            "teacher_temp": hp.warmup_teacher_temp + progress * (hp.teacher_temp - hp.warmup_teacher_temp),
        }

    # ------------------------------------------------------------------ training

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        crops = self._crops(batch)
        sched = self.schedules(self.global_step, self.current_epoch)
        for group in self.trainer.optimizers[0].param_groups:
            group["lr"] = sched["lr"]
            if group["regularized"]:
                group["weight_decay"] = sched["wd"]
        batch_size = crops[0].shape[0]
        teacher_out = self.teacher(crops[:NUM_GLOBAL_CROPS])  # only the global crops pass through the teacher
        student_out = self.student(crops)
        loss = self.criterion(
            student_out.unflatten(0, (len(crops), batch_size)),
            teacher_out.unflatten(0, (NUM_GLOBAL_CROPS, batch_size)),
            sched["teacher_temp"],
        )
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite DINO loss ({loss.item()}) at step {self.global_step}, epoch {self.current_epoch}")
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self.log_dict({f"train/{name}": value for name, value in sched.items()}, batch_size=batch_size)
        return loss

    def on_before_optimizer_step(self, optimizer: Optimizer) -> None:
        # Gradients are unscaled here under fp16, as DINO clips them.
        if self.hparams.clip_grad > 0:
            clip_gradients_per_parameter(self.student.parameters(), self.hparams.clip_grad)
        if self.current_epoch < self.hparams.freeze_last_layer:
            # No gradient at all (not a zero one), so AdamW neither moves nor decays the prototypes.
            for param in self.student.head.last_layer.parameters():
                param.grad = None

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        step = self.global_step  # the step this update belongs to; the optimizer step advances it
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)
        self.update_teacher(self.schedules(step, epoch)["momentum"])

    @torch.no_grad()
    def update_teacher(self, momentum: float) -> None:
        """EMA of every teacher parameter towards the student's: ``t <- m t + (1 - m) s``."""
        teacher = list(self.teacher.parameters())
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, list(self.student.parameters()), alpha=1.0 - momentum)

    def configure_optimizers(self) -> Optimizer:
        # lr and weight decay are set every step by training_step from the schedules.
        hp = self.hparams
        trainer = self._trainer  # None outside a fit (a unit test): an unscaled rate needs no Trainer
        lr = self.lr_scaled = resolve_lr(trainer, hp.optimizer, hp.lr, hp.lr_base, hp.lr_base_size, hp.lr_base_scale)
        groups = dino_param_groups(self.student)
        fused = fused_supported(self.student.parameters())
        if hp.optimizer == "adamw":
            return torch.optim.AdamW(groups, lr=lr, weight_decay=hp.weight_decay, fused=fused)
        if hp.optimizer == "sgd":
            return torch.optim.SGD(groups, lr=lr, momentum=0.9, weight_decay=hp.weight_decay, fused=fused)
        # DINO's LARS adapts the regularised weights only, whatever their weight decay.
        groups[0]["always_adapt"] = True
        return Lars(groups, lr=lr, momentum=0.9, weight_decay=hp.weight_decay)

    @staticmethod
    def _crops(batch: dict[str, Any]) -> Sequence[Tensor]:
        crops = batch.get("image") if isinstance(batch, dict) else None
        if not isinstance(crops, (list, tuple)) or len(crops) < NUM_GLOBAL_CROPS:
            got = f"a tensor of shape {tuple(crops.shape)}" if isinstance(crops, Tensor) else type(crops).__name__
            raise ValueError(
                f"DINO needs batch['image'] to be a list of crops ({NUM_GLOBAL_CROPS} global, then local) as "
                f"MultiCropTransform and collate_samples make it; got {got}"
            )
        return crops
