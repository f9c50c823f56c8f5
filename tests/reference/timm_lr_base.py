"""timm's learning-rate-from-batch rule as its ``train.py`` computes it: the test oracle for
:mod:`simpool_lightning.models.lr_scaling`.

Transcribed from huggingface/pytorch-image-models ``train.py`` at commit
``2aabaef039d918d453b58714ab84562609981112`` (Apache-2.0): the block after the model is built,
``if not args.lr: ...``, with the argument defaults of that file (``--lr None``, ``--lr-base 0.1``,
``--lr-base-size 256``, ``--lr-base-scale ''``). ``args`` becomes keyword arguments; the logging is
left out.
"""
from __future__ import annotations

from typing import Optional


def timm_lr(
    batch_size: int,
    world_size: int,
    grad_accum_steps: int = 1,
    opt: str = "sgd",
    lr: Optional[float] = None,
    lr_base: float = 0.1,
    lr_base_size: int = 256,
    lr_base_scale: str = "",
) -> float:
    if not lr:
        global_batch_size = batch_size * world_size * grad_accum_steps
        batch_ratio = global_batch_size / lr_base_size
        if not lr_base_scale:
            on = opt.lower()
            lr_base_scale = "sqrt" if any([o in on for o in ("ada", "lamb")]) else "linear"
        if lr_base_scale == "sqrt":
            batch_ratio = batch_ratio**0.5
        lr = lr_base * batch_ratio
    return lr
