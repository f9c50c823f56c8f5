"""Seed the model's randomness per training batch, so a resumed fit repeats the uninterrupted one."""
from __future__ import annotations

from typing import Any, Optional

import pytorch_lightning as pl

from simpool_lightning.data.base import MODEL_STREAM, derive_seed, global_seed, seed_all

__all__ = ["SeedEveryStep"]


class SeedEveryStep(pl.Callback):
    """Before every training batch, seed torch, numpy and Python from ``(seed, rank, epoch, batch)``.

    Dropout, stochastic depth and mixup then draw the same numbers at the same batch however the
    run got there: straight through, or resumed from a checkpoint (which restores weights,
    optimizer and loop position but not the global generators, whose state also depends on
    everything else the process did before). Ranks draw independent streams.

    Args:
        seed: the run's seed; ``None`` takes the one ``seed_everything`` set (0 without one). The
            seed is saved in checkpoints and a resumed run continues with the saved one.
    """

    def __init__(self, seed: Optional[int] = None) -> None:
        if seed is not None and seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = seed
        self._run_seed: Optional[int] = None  # this fit's: the argument, the global seed, or the checkpoint's

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._run_seed = global_seed() if self.seed is None else self.seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        assert self._run_seed is not None  # set in setup()
        seed_all(derive_seed(self._run_seed, MODEL_STREAM, trainer.global_rank, trainer.current_epoch, batch_idx))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self._run_seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._run_seed = state_dict["seed"]  # Lightning restores callbacks after setup()
