"""Reliability (issue #10): killed and pre-empted runs resume through the CLI, a non-finite loss
stops training and keeps the last good checkpoint, checkpoints are written by rank 0 alone under
DDP, and the same seed gives the same run twice."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from lightning_fabric.plugins import TorchCheckpointIO
from pytorch_lightning.callbacks import ModelCheckpoint

from simpool_lightning.callbacks import PreemptionCheckpoint, SeedEveryStep
from simpool_lightning.cli import main
from tests.isolated import ROOT, run_isolated
from tests.test_resume import assert_same_weights, classifier, classifier_data, dino, dino_data

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# The quickstart shrunk: one block, 96 training images in batches of 16 (6 steps an epoch), 2 epochs.
SHORT = [
    "--trainer.max_epochs=2",
    "--trainer.limit_val_batches=2",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_size=96",
    "--data.init_args.val_size=32",
    "--data.init_args.batch_size=16",
    "--data.init_args.num_workers=0",
    "--model.init_args.backbone_kwargs.depth=1",
]


def quickstart_config(root: Path, every_n_train_steps: int, extra_callback: str = "", name: str = "config.yaml") -> Path:
    """configs/quickstart.yaml writing under ``root``, with step checkpoints every ``every_n_train_steps``
    and ``extra_callback`` (YAML) first among the callbacks; saved as ``root / name``."""
    text = QUICKSTART.read_text()
    for old, new in [("runs/quickstart", str(root)), ("every_n_train_steps: 50", f"every_n_train_steps: {every_n_train_steps}")]:
        assert old in text, old
        text = text.replace(old, new)
    if extra_callback:
        text = text.replace("  callbacks:\n", f"  callbacks:\n{extra_callback}", 1)
    root.mkdir(parents=True, exist_ok=True)
    config = root / name
    config.write_text(text)
    return config


class PauseAt(pl.Callback):
    """After training step ``step``: write ``marker`` (``marker.<rank>`` under DDP), then wait (up to
    5 minutes) for SIGTERM."""

    def __init__(self, step: int, marker: str) -> None:
        self.step = step
        self.marker = marker

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            Path(self.marker if trainer.world_size == 1 else f"{self.marker}.{trainer.global_rank}").write_text("")
            deadline = time.monotonic() + 300
            while not trainer.received_sigterm and time.monotonic() < deadline:
                time.sleep(0.05)


def start_paused_fit(root: Path, step: int) -> subprocess.Popen:
    """``simpool fit`` on the shrunk quickstart in a new process, paused after step ``step``."""
    marker = root / "paused"
    pause = f"    - class_path: tests.test_reliability.PauseAt\n      init_args: {{step: {step}, marker: {marker}}}\n"
    config = quickstart_config(root, every_n_train_steps=2, extra_callback=pause, name="paused.yaml")
    # The same thread count as this process, so that float results match bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    log = open(root / "fit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "simpool_lightning.cli", "fit", "-c", str(config), *SHORT],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 400
    while not marker.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the fit ended or stalled before step {step}:\n{(root / 'fit.log').read_text()[-4000:]}")
        time.sleep(0.1)
    return proc


class RecordMetrics(pl.Callback):
    """Writes the metrics the fit ended with (validation included) to ``path`` as JSON."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        Path(self.path).write_text(json.dumps({k: float(v) for k, v in trainer.callback_metrics.items()}))


def fit_to_the_end(root: Path, *args: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """``simpool fit`` (in this process) on the shrunk quickstart under ``root``; the weights of its
    final last.ckpt and the metrics it ended with."""
    record = f"    - class_path: tests.test_reliability.RecordMetrics\n      init_args: {{path: {root / 'metrics.json'}}}\n"
    main(["fit", "-c", str(quickstart_config(root, every_n_train_steps=2, extra_callback=record)), *SHORT, *args])
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 12  # last.ckpt is the end of training (2 epochs of 6 steps)
    return last["state_dict"], json.loads((root / "metrics.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    return fit_to_the_end(tmp_path_factory.mktemp("uninterrupted"))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigkill_mid_epoch_then_ckpt_path_last_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    proc = start_paused_fit(tmp_path, step=9)  # epoch 2, batch 3; checkpoints every 2 steps
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    checkpoints = tmp_path / "checkpoints"
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 8  # mid-epoch

    weights, metrics = fit_to_the_end(tmp_path, "--ckpt_path=last")
    assert_same_weights(weights, uninterrupted[0])
    assert metrics == uninterrupted[1] and "val/acc1" in metrics


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sigterm_saves_then_ckpt_path_last_matches_the_uninterrupted_run(uninterrupted, tmp_path):
    proc = start_paused_fit(tmp_path, step=9)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    checkpoints = tmp_path / "checkpoints"
    log = (tmp_path / "fit.log").read_text()
    assert "SIGTERM at global step 9" in log, log[-4000:]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 9  # not 8

    weights, metrics = fit_to_the_end(tmp_path, "--ckpt_path=last")
    assert_same_weights(weights, uninterrupted[0])
    assert metrics == uninterrupted[1]


# ---------------------------------------------------------------------- non-finite loss


class PoisonAt(pl.Callback):
    """Turns the input of training step ``step`` into NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            images = batch["image"]
            for crops in images if isinstance(images, list) else [images]:
                crops[:] = float("nan")


@pytest.mark.parametrize(
    "kind, make_model, make_data, message",
    [
        ("classifier", classifier, classifier_data, "non-finite training loss (nan) at global step 5"),
        ("dino", dino, dino_data, "non-finite DINO loss (nan) at step 5"),
    ],
)
def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(kind, make_model, make_data, message, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    callbacks = [
        ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=2, save_top_k=0, save_last=True),
        PreemptionCheckpoint(),
        SeedEveryStep(),
    ]
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[*callbacks, PoisonAt(step=5)],
    )
    with pytest.raises(FloatingPointError) as error:
        trainer.fit(make_model(), make_data())
    assert message in str(error.value)
    # The checkpoint of step 4 is the newest, intact and finite; nothing was saved on the error.
    assert sorted(os.listdir(checkpoints)) == ["last.ckpt"]
    ckpt = torch.load(checkpoints / "last.ckpt", weights_only=False)
    assert ckpt["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values() if v.is_floating_point())
    # ... and training goes on from it.
    steps: list[int] = []

    class Steps(pl.Callback):
        def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
            steps.append(trainer.global_step)

    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, default_root_dir=str(tmp_path), callbacks=[*callbacks, Steps()],
    )
    trainer.fit(make_model(), make_data(), ckpt_path="last")
    assert steps == [4, 5, 6, 7]


# ---------------------------------------------------------------------- reproducibility


def test_same_seed_same_run_twice(tmp_path):
    def run(seed: int) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        pl.seed_everything(seed, verbose=False)
        model = classifier()
        trainer = pl.Trainer(
            accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
            enable_model_summary=False, default_root_dir=str(tmp_path), callbacks=[SeedEveryStep()],
        )
        trainer.fit(model, classifier_data())
        return model.state_dict(), {k: float(v) for k, v in trainer.callback_metrics.items()}

    first, again, other = run(0), run(0), run(1)
    assert_same_weights(first[0], again[0])
    assert first[1] == again[1] and "val/acc1" in first[1]
    assert first[1] != other[1]


# ---------------------------------------------------------------------- DDP: rank 0 writes


class RecordingCheckpointIO(TorchCheckpointIO):
    """Torch checkpoint I/O that appends ``<rank> <file name>`` to ``log`` for every file it writes."""

    def __init__(self, log: str) -> None:
        self.log = log

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        with open(self.log, "a") as f:
            f.write(f"{dist.get_rank()} {Path(path).name}\n")
        super().save_checkpoint(checkpoint, path, storage_options)


def two_process_checkpoints_are_written_by_rank_zero_only(tmp_dir: str) -> None:
    tmp_path = Path(tmp_dir)
    checkpoints, log = tmp_path / "checkpoints", tmp_path / "saves.log"
    pl.seed_everything(0, verbose=False)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_fork", max_epochs=2, logger=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=1, default_root_dir=str(tmp_path),
        plugins=[RecordingCheckpointIO(str(log))],
        callbacks=[
            ModelCheckpoint(dirpath=checkpoints, filename="{step}", every_n_train_steps=1, save_top_k=-1, save_last=True),
            SeedEveryStep(),
        ],
    )
    # 64 images over 2 ranks in batches of 16: 2 steps an epoch, 4 in all.
    trainer.fit(classifier(), classifier_data())
    saves = log.read_text().split()
    ranks, names = saves[0::2], saves[1::2]
    assert set(ranks) == {"0"}, saves
    assert names.pop() == ".temp.ckpt"  # how the fork launcher hands the weights back to this process
    expected = ["step=1.ckpt", "last.ckpt", "step=2.ckpt", "last.ckpt", "step=3.ckpt", "last.ckpt", "step=4.ckpt", "last.ckpt"]
    assert names == expected, names
    assert sorted(os.listdir(checkpoints)) == sorted(set(expected))  # no copies written beside them
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 4  # a whole file


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_process_checkpoints_are_written_by_rank_zero_only(tmp_path):
    run_isolated("tests.test_reliability:two_process_checkpoints_are_written_by_rank_zero_only", str(tmp_path))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_process_sigterm_saves_last_from_rank_zero(tmp_path):
    """Two `simpool fit` processes started as a cluster scheduler starts them (one per rank, rank in
    the environment), both sent SIGTERM: one last.ckpt of the step they stopped at, written by rank 0."""
    log = tmp_path / "saves.log"
    markers = tmp_path / "paused"
    pause = f"    - class_path: tests.test_reliability.PauseAt\n      init_args: {{step: 5, marker: {markers}}}\n"
    config = quickstart_config(tmp_path, every_n_train_steps=2, extra_callback=pause)
    text = config.read_text().replace(
        "trainer:\n",
        f"trainer:\n  plugins:\n    - class_path: tests.test_reliability.RecordingCheckpointIO\n      init_args: {{log: {log}}}\n",
        1,
    )
    config.write_text(text)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(2):
        env = {
            **os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0",
            "RANK": str(rank), "LOCAL_RANK": str(rank), "OMP_NUM_THREADS": "1",
        }
        out = open(tmp_path / f"rank{rank}.log", "w")
        command = [sys.executable, "-m", "simpool_lightning.cli", "fit", "-c", str(config), *SHORT,
                   "--trainer.devices=2", "--trainer.strategy=ddp"]
        procs.append(subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + 600
    while not all(Path(f"{markers}.{rank}").exists() for rank in range(2)):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError((tmp_path / "rank0.log").read_text()[-3000:] + (tmp_path / "rank1.log").read_text()[-3000:])
        time.sleep(0.1)
    for p in procs:
        p.send_signal(signal.SIGTERM)
    assert [p.wait(timeout=120) for p in procs] == [128 + signal.SIGTERM] * 2
    saves = log.read_text().split()
    assert set(saves[0::2]) == {"0"}, saves
    # Step 2, the end of epoch 1 (step 3: best and last), step 4, and SIGTERM after step 5.
    assert saves[1::2] == ["last.ckpt", "epoch=0-step=3.ckpt", "last.ckpt", "last.ckpt", "last.ckpt"], saves
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
