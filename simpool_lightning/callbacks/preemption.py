"""Bring ``last.ckpt`` up to date when a fit is stopped with SIGTERM (cluster pre-emption)."""
from __future__ import annotations

import signal

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

__all__ = ["PreemptionCheckpoint"]


class PreemptionCheckpoint(pl.Callback):
    """On SIGTERM during ``fit``, save the ``last.ckpt`` of every ``ModelCheckpoint(save_last=True)``
    before the process exits, so ``--ckpt_path last`` continues from the step it was stopped at.

    Lightning turns SIGTERM into a flag, finishes the current batch and raises
    ``SIGTERMException`` at the next batch boundary (on every rank under DDP, where every rank
    must get the signal, as cluster schedulers send it), so the state saved here is consistent:
    weights, optimizer, loop position and the training loader's position. The process then exits
    with status 143 (128 + SIGTERM).

    Only SIGTERM: a non-finite loss or a crash saves nothing, so the newest checkpoint is the last
    good one. Lightning's ``OnExceptionCheckpoint`` saves on every exception and, once configured,
    makes every plain ``fit`` resume from the newest checkpoint it finds; hence this callback.
    """

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit" and not self._last_checkpoints(trainer):
            raise ValueError("PreemptionCheckpoint saves ModelCheckpoint's last.ckpt: add a ModelCheckpoint with save_last=True")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        for path in sorted({self._last_path(callback, trainer) for callback in self._last_checkpoints(trainer)}):
            trainer.save_checkpoint(path)
            rank_zero_info(f"SIGTERM at global step {trainer.global_step}: saved {path}")
        # Lightning's SIGTERMException exits with status 0, as if the fit had finished; exit as a
        # process ended by SIGTERM does (128 + 15), so a job chain or scheduler sees it did not.
        exception.code = 128 + signal.SIGTERM

    @staticmethod
    def _last_checkpoints(trainer: pl.Trainer) -> list[ModelCheckpoint]:
        return [c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint) and c.save_last]

    @staticmethod
    def _last_path(callback: ModelCheckpoint, trainer: pl.Trainer) -> str:
        """The file the callback writes as its last checkpoint: the one it wrote already in this
        run, else its ``last`` name in its folder (what it would write next)."""
        if callback.last_model_path:
            return callback.last_model_path
        metrics = {**trainer.callback_metrics, "epoch": trainer.current_epoch, "step": trainer.global_step}
        return callback.format_checkpoint_name(metrics, callback.CHECKPOINT_NAME_LAST)
