"""A learning rate that follows the global batch, as timm's ``train.py`` sets it.

timm's ``train.py`` (huggingface/pytorch-image-models, commit 2aabaef0) takes ``--lr``, or else
``--lr-base`` at the reference batch ``--lr-base-size`` and scales it to the global batch
(per-process batch x world size x gradient-accumulation steps), linearly or by the square root
(``--lr-base-scale``; when empty, ``sqrt`` for an optimizer whose name contains ``ada`` or
``lamb``, ``linear`` otherwise). The models take the same settings as ``lr``, ``lr_base``,
``lr_base_size`` and ``lr_base_scale`` and resolve them in ``configure_optimizers``, where the
Trainer knows the world size.

Deliberate differences from timm:
- ``lr_base_size=None`` (the default) means "no reference batch": ``lr_base`` is used as it is.
  timm always scales (from 256), so a bare ``ImageClassifier()`` would train at another rate than
  it did before these settings existed.
- ``lr=0`` is an error here; timm treats it as unset (``if not args.lr``).
- ``warmup_lr`` and ``min_lr`` are not scaled, as in timm and DINO's ``main_dino.py``.

The per-process batch is the ``batch_size`` of the training loader (the one the loop draws from),
else the DataModule's ``batch_size``. A resumed fit trains at the rate of its own global batch, not
the checkpoint's (the same number when nothing changed): DINO sets the rate at every step from its
schedule, and ``ImageClassifier`` re-bases its scheduler when training starts.
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info

__all__ = [
    "LRScale",
    "ADAPTIVE_OPTIMIZER_MARKS",
    "check_lr_settings",
    "default_lr_scale",
    "scale_lr",
    "per_device_batch_size",
    "global_batch_size",
    "resolve_lr",
]

LRScale = Literal["linear", "sqrt"]

# timm's test for an adaptive optimizer: a substring of the lower-cased name (adam, adamw, nadam,
# radam, adagrad, adafactor, lamb ...).
ADAPTIVE_OPTIMIZER_MARKS = ("ada", "lamb")


def check_lr_settings(
    lr: Optional[float], lr_base: float, lr_base_size: Optional[int], lr_base_scale: Optional[str]
) -> None:
    """Raise ``ValueError`` naming the setting when one is out of range."""
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number or None (then lr_base sets it), got {lr!r}")
    if not (math.isfinite(lr_base) and lr_base > 0):
        raise ValueError(f"lr_base must be a positive number, got {lr_base!r}")
    if lr_base_size is not None and (isinstance(lr_base_size, bool) or int(lr_base_size) != lr_base_size or lr_base_size < 1):
        raise ValueError(f"lr_base_size must be a positive whole number of images or None, got {lr_base_size!r}")
    if lr_base_scale not in (None, "linear", "sqrt"):
        raise ValueError(f"lr_base_scale must be 'linear', 'sqrt' or None (by optimizer, as timm), got {lr_base_scale!r}")


def default_lr_scale(optimizer: str) -> LRScale:
    """timm's choice when ``--lr-base-scale`` is empty: ``sqrt`` for adaptive optimizers, else ``linear``."""
    name = optimizer.lower()
    return "sqrt" if any(mark in name for mark in ADAPTIVE_OPTIMIZER_MARKS) else "linear"


def scale_lr(lr_base: float, lr_base_size: int, global_batch: int, scale: LRScale) -> float:
    """``lr_base * (global_batch / lr_base_size)``, or times its square root for ``scale="sqrt"``."""
    ratio = global_batch / lr_base_size
    if scale == "sqrt":
        ratio = ratio**0.5
    return lr_base * ratio


def per_device_batch_size(trainer: pl.Trainer) -> int:
    """Images per process in one training step: the training loader's ``batch_size``, else the DataModule's.

    Loads the training loader if Lightning has not yet (as ``trainer.estimated_stepping_batches``
    does; the loop does not load it again).

    Raises:
        ValueError: neither has an integer ``batch_size`` (a custom batch sampler, say); the message
            says to set ``lr`` instead.
    """
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()
    size = getattr(trainer.train_dataloader, "batch_size", None)
    if not isinstance(size, int):
        size = getattr(trainer.datamodule, "batch_size", None) if trainer.datamodule is not None else None
    if not isinstance(size, int) or size < 1:
        raise ValueError(
            "lr_base_size is set, so the learning rate is scaled to the global batch, but neither the training loader "
            "nor the DataModule has an integer batch_size; set the model's lr instead"
        )
    return size


def global_batch_size(trainer: pl.Trainer) -> int:
    """Images per optimizer step over all processes: per-process batch x world size x accumulation steps."""
    return per_device_batch_size(trainer) * trainer.world_size * trainer.accumulate_grad_batches


def resolve_lr(
    trainer: Optional[pl.Trainer],
    optimizer: str,
    lr: Optional[float],
    lr_base: float,
    lr_base_size: Optional[int],
    lr_base_scale: Optional[LRScale],
) -> float:
    """The peak learning rate of this run: ``lr`` if given, else ``lr_base`` scaled to the global batch.

    Says which on rank 0's log and records it with every logger as the hyperparameter
    ``lr_scaled`` (with ``global_batch_size`` and ``lr_base_scale`` when it was scaled).

    Args:
        trainer: the Trainer of the fit (world size, accumulation, the training loader); None for
            a module used outside a fit, which then resolves only an unscaled rate.
        optimizer: the optimizer's name, for timm's choice of scale when ``lr_base_scale`` is None.
        lr: an explicit learning rate: it wins, whatever the batch.
        lr_base: the learning rate at the reference batch ``lr_base_size``.
        lr_base_size: the reference global batch; None uses ``lr_base`` unscaled.
        lr_base_scale: ``"linear"`` or ``"sqrt"`` in the batch ratio; None picks as timm does.
    """
    record: dict[str, object]
    if lr is not None:
        if lr_base_size is not None:
            rank_zero_info(f"Learning rate {lr:g} as given (lr); lr_base {lr_base:g} at batch {lr_base_size} is not used")
        record = {"lr_scaled": lr}
    elif lr_base_size is None:
        lr = lr_base
        record = {"lr_scaled": lr}
    elif trainer is None:
        raise ValueError(
            f"lr_base_size={lr_base_size} scales the learning rate to the global batch, which only a Trainer knows: "
            "configure the optimizers within fit, or set lr"
        )
    else:
        batch = global_batch_size(trainer)
        scale = lr_base_scale or default_lr_scale(optimizer)
        lr = scale_lr(lr_base, lr_base_size, batch, scale)
        rank_zero_info(
            f"Learning rate {lr:g} from lr_base {lr_base:g} at batch {lr_base_size} and the global batch {batch} "
            f"({trainer.world_size} processes, {trainer.accumulate_grad_batches} accumulated steps) with {scale} scaling"
        )
        record = {"lr_scaled": lr, "global_batch_size": batch, "lr_base_scale": scale}
    for logger in trainer.loggers if trainer is not None else []:
        logger.log_hyperparams(record)
    return lr
