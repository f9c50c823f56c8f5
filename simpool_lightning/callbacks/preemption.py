"""Bring ``last.ckpt`` up to date when a fit is told to stop: on SIGTERM (pre-emption, ``scancel``)
and, under SLURM, on the requeue signal sent ahead of the time limit, which also requeues the job."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
from types import FrameType
from typing import Any, Optional

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from pytorch_lightning.utilities.exceptions import SIGTERMException

__all__ = ["PreemptionCheckpoint", "slurm_job_id"]


def slurm_job_id() -> Optional[str]:
    """The id ``scontrol requeue`` takes: ``<array job>_<task>`` in a job array, else ``SLURM_JOB_ID``
    (Lightning's rule); None outside a SLURM job or for an id that is not ``[0-9_]+``."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job = f"{array_job}_{os.environ.get('SLURM_ARRAY_TASK_ID', '')}" if array_job else os.environ.get("SLURM_JOB_ID")
    return job if job and re.fullmatch(r"[0-9]+(_[0-9]+)?", job) else None


class PreemptionCheckpoint(pl.Callback):
    """Save the ``last.ckpt`` of every ``ModelCheckpoint(save_last=True)`` when a fit is told to stop,
    so that the same command with ``--ckpt_path last`` continues from the step it stopped at.

    ==============================  =========================================  ==============================
    signal                          sent by                                    what this callback does
    ==============================  =========================================  ==============================
    SIGTERM                         ``scancel``, pre-emption, torchrun and     finish the batch, save
                                    any scheduler stopping a job               ``last.ckpt``, exit 143
    the requeue signal (SIGUSR1;    SLURM ``--signal=SIGUSR1@90``: 90 s        finish the batch, save
    only under SLURM, with the      before the time limit, to every task       ``last.ckpt``, rank 0 runs
    ``SLURMEnvironment`` Lightning                                             ``scontrol requeue <job>``,
    picks there)                                                               exit 128 + the signal (138)
    SIGKILL                         the time limit itself; a crash             nothing: the newest step or
                                                                               epoch ``last.ckpt`` stays
    ==============================  =========================================  ==============================

    The requeued job runs its batch script again from the top; with ``--ckpt_path last`` in it, the
    fit continues from that ``last.ckpt`` (and the first run of the script, with no checkpoint yet,
    starts from scratch: Lightning only warns that there is none).

    SIGTERM: Lightning turns it into a flag, finishes the current batch and raises
    ``SIGTERMException`` at the batch boundary (on every rank under DDP, where every rank must get
    the signal, as cluster schedulers send it), so the state saved here is consistent: weights,
    optimizer, loop position and the training loader's position. Lightning's exception exits with
    status 0, as if the fit had finished; this callback makes it 128 + 15, as a process ended by
    SIGTERM, so a job chain or scheduler sees that it did not.

    The requeue signal: the ``SLURMEnvironment`` Lightning uses under SLURM (its default, or one given
    in ``trainer.plugins``) names it (``requeue_signal``) and enables it (``auto_requeue``). Lightning's
    own handler would save an ``hpc_ckpt_<n>.ckpt`` from inside the signal handler, wherever the step
    happens to be, which ``--ckpt_path last`` does not read. This callback installs its handler
    first (at ``setup``; Lightning then leaves the signal alone): the handler only notes the signal;
    after each training batch the ranks agree whether any of them got it (one boolean all-reduce
    per step under DDP, only when requeueing is on) and, if so, hand Lightning a SIGTERM at the same
    point on every rank, so the stop, the save and the exit are the SIGTERM ones above; then rank 0
    requeues. A failed ``scontrol`` is logged as a warning (``last.ckpt`` is saved; resubmit by hand).
    The signal is acted on after a training batch: SLURM's lead time (``@90``) must cover one
    validation pass, one step and the save.

    A non-finite loss or a crash saves nothing, so the newest checkpoint is the last good one.
    Lightning's ``OnExceptionCheckpoint`` saves on every exception and, once configured, makes every
    plain ``fit`` resume from the newest checkpoint it finds; hence this callback.
    """

    def __init__(self) -> None:
        self._requeue_environment: Optional[SLURMEnvironment] = None
        self._previous_handler: Any = None
        self._requeue_signal: Optional[int] = None  # the requeue signal, once this process got it
        self._requeueing = False  # the ranks agreed to stop for a requeue

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not self._last_checkpoints(trainer):
            raise ValueError("PreemptionCheckpoint saves ModelCheckpoint's last.ckpt: add a ModelCheckpoint with save_last=True")
        self._requeue_environment, self._requeue_signal, self._requeueing = None, None, False
        # Lightning's signal connector reads the cluster environment from here too.
        environment = trainer._accelerator_connector.cluster_environment
        if (
            isinstance(environment, SLURMEnvironment)
            and environment.auto_requeue
            and environment.requeue_signal is not None
            and threading.current_thread() is threading.main_thread()  # where Python allows signal handlers
        ):
            self._requeue_environment = environment
            self._previous_handler = signal.signal(environment.requeue_signal, self._note_requeue_signal)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # After an exception Lightning puts back the handlers it found (this one), and teardown is
        # not called: the handler then only notes a signal that nothing reads.
        if self._requeue_environment is not None:
            # None: the handler before was not set from Python; the default is the closest.
            signal.signal(self._requeue_environment.requeue_signal, self._previous_handler or signal.SIG_DFL)
            self._requeue_environment = None

    def _note_requeue_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        # A signal handler runs between two bytecodes of the step: it only notes the signal.
        self._requeue_signal = signum
        rank_zero_info(f"{signal.Signals(signum).name} (requeue signal): saving and requeueing after this training batch")

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self._requeue_environment is None or self._requeueing:
            return
        received = self._requeue_signal is not None
        if trainer.world_size > 1:
            received = trainer.strategy.reduce_boolean_decision(received, all=False)
        if received:
            self._requeueing = True
            self._requeue_signal = int(self._requeue_environment.requeue_signal)
            # Every rank at the same point: Lightning stops at this batch's end exactly as on SIGTERM.
            signal.raise_signal(signal.SIGTERM)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != TrainerFn.FITTING:
            return
        for path in sorted({self._last_path(callback, trainer) for callback in self._last_checkpoints(trainer)}):
            trainer.save_checkpoint(path)  # rank 0 writes; every rank waits for it
            reason = "requeue signal" if self._requeueing else "SIGTERM"
            rank_zero_info(f"{reason} at global step {trainer.global_step}: saved {path}")
        if self._requeueing and self._requeue_signal is not None:
            if trainer.is_global_zero:
                self._requeue()
            exception.code = 128 + self._requeue_signal
        else:
            # Lightning's SIGTERMException exits with status 0, as if the fit had finished.
            exception.code = 128 + signal.SIGTERM

    @staticmethod
    def _requeue() -> None:
        job = slurm_job_id()
        if job is None:
            rank_zero_warn("requeue signal under SLURM but no SLURM_JOB_ID: the job was not requeued (last.ckpt is saved)")
            return
        command = ["scontrol", "requeue", job]
        try:
            result = subprocess.run(command, capture_output=True, text=True)
        except OSError as error:
            rank_zero_warn(f"`{' '.join(command)}` failed ({error}): the job was not requeued (last.ckpt is saved)")
            return
        if result.returncode:
            rank_zero_warn(
                f"`{' '.join(command)}` exited with {result.returncode} ({(result.stderr or result.stdout).strip()}): "
                "the job was not requeued (last.ckpt is saved)"
            )
        else:
            rank_zero_info(f"requeued SLURM job {job}")

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
