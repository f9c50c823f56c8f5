"""Beyond one machine (issue #22): `simpool fit` under torchrun and under SLURM, and the requeue on
SLURM's time-limit signal.

What runs here, on CPU with gloo and no cluster:
- SLURM in one process (quick): the ``SLURM_*`` variables of a one-task job; Lightning picks its
  ``SLURMEnvironment``; SIGUSR1 after a step saves ``last.ckpt`` and calls ``scontrol requeue <job>``
  (a mock ``scontrol`` on ``PATH`` records its arguments); the rerun with ``--ckpt_path last``
  ends bit-identical to the uninterrupted fit. SIGTERM saves and does not requeue.
- SLURM with two tasks (slow): two `simpool fit` processes with the variables ``srun`` gives the
  tasks of a one-node, two-task job, the command of ``scripts/slurm/simpool.sbatch``; both get
  SIGUSR1 mid-epoch, rank 0 requeues once, and the same command run again (the requeued job)
  ends with the weights and metrics of an uninterrupted two-process fit.
- torchrun (slow): ``torchrun --standalone --nproc-per-node 2 -m simpool_lightning.cli fit`` on the
  shortened quickstart ends with one ``last.ckpt`` and the weights and metrics of the same fit
  launched by Lightning's own ``ddp`` launcher.

Tolerance: none; two-process runs use one thread per process, so their float results repeat bit
for bit.
"""
from __future__ import annotations

import json
import os
import shlex
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
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.callbacks import ModelCheckpoint

from simpool_lightning.callbacks import PreemptionCheckpoint
from simpool_lightning.cli import main
from tests.isolated import ROOT
from tests.test_reliability import SHORT, quickstart_config
from simpool_lightning.models import DINO, ImageClassifier
from tests.test_resume import MODELS, VIT, assert_same_weights, classifier, classifier_data, dino_data, fit
from tests.trainers import trainer

SBATCH = ROOT / "scripts" / "slurm" / "simpool.sbatch"
JOB_ID = "4242"


def mock_scontrol(folder: Path, status: int = 0) -> Path:
    """A ``scontrol`` in ``folder/bin`` that appends its arguments to ``folder/scontrol.log`` and exits
    with ``status``; returns the log's path."""
    log = folder / "scontrol.log"
    command = folder / "bin" / "scontrol"
    command.parent.mkdir(parents=True, exist_ok=True)
    command.write_text(f'#!/bin/sh\necho "$@" >> {shlex.quote(str(log))}\nexit {status}\n')
    command.chmod(0o755)
    return log


def slurm_variables(tasks: int, rank: int, port: int) -> dict[str, str]:
    """What ``srun`` sets for task ``rank`` of a one-node job of ``tasks`` tasks (those Lightning reads),
    with the rendezvous on this machine."""
    return {
        "SLURM_JOB_ID": JOB_ID, "SLURM_JOB_NAME": "simpool", "SLURM_NTASKS": str(tasks),
        "SLURM_NTASKS_PER_NODE": str(tasks), "SLURM_NNODES": "1", "SLURM_NODEID": "0", "SLURM_PROCID": str(rank),
        "SLURM_LOCALID": str(rank), "SLURM_NODELIST": "127.0.0.1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
    }


@pytest.fixture
def slurm_job(tmp_path, monkeypatch) -> Path:
    """This process as the single task of SLURM job 4242, with a mock scontrol; the scontrol log."""
    for name, value in slurm_variables(tasks=1, rank=0, port=free_port()).items():
        monkeypatch.setenv(name, value)
    log = mock_scontrol(tmp_path / "slurm")
    monkeypatch.setenv("PATH", f"{tmp_path / 'slurm' / 'bin'}{os.pathsep}{os.environ['PATH']}")
    return log


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SignalAt(pl.Callback):
    """Sends this process ``signum`` after training step ``step``; records the cluster environment."""

    def __init__(self, step: int, signum: int) -> None:
        self.step = step
        self.signum = signum
        self.environment: Any = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.environment = trainer._accelerator_connector.cluster_environment

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)


def stopped_fit(kind: str, root: Path, signum: int) -> tuple[int, SignalAt]:
    """``fit`` of ``kind`` under ``root``, sent ``signum`` after step 6: its exit status and probe."""
    probe = SignalAt(step=6, signum=signum)
    with pytest.raises(SystemExit) as stopped:  # Lightning's SIGTERMException
        fit(kind, root, [probe, *checkpointing(root)])
    return stopped.value.code, probe


def checkpointing(root: Path) -> list[pl.Callback]:
    # Step checkpoints too rare to help: only the one saved on the signal can carry the run over.
    return [
        ModelCheckpoint(dirpath=root / "checkpoints", every_n_train_steps=100, save_top_k=0, save_last=True),
        PreemptionCheckpoint(),
    ]


def scaled_classifier() -> ImageClassifier:
    return ImageClassifier(*VIT, pool="simpool", num_classes=4, lr_base=2e-3, lr_base_size=32, lr_base_scale="linear",
                           warmup_epochs=0, drop_rate=0.3, drop_path_rate=0.2, mixup_alpha=0.2)


def scaled_dino() -> DINO:
    return DINO(backbone=VIT[0], backbone_kwargs=VIT[1], out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                drop_path_rate=0.2, lr_base=2e-3, lr_base_size=32, lr_base_scale="linear", min_lr=1e-4,
                warmup_epochs=0.5, momentum_teacher=0.9)


SCALED = {"classifier": (scaled_classifier, classifier_data), "dino": (scaled_dino, dino_data)}


@pytest.mark.parametrize("kind", ["classifier", pytest.param("dino", marks=pytest.mark.slow)])  # 30 to 40 s each
def test_requeue_signal_under_slurm_saves_requeues_and_the_rerun_resumes_exactly(kind, slurm_job, tmp_path, monkeypatch):
    # test_resume's models with the rate scaled from a reference batch: the resumed fit resolves it again.
    monkeypatch.setitem(MODELS, kind, SCALED[kind])
    before = signal.getsignal(signal.SIGUSR1)
    reference, reference_metrics, _ = fit(kind, tmp_path / "uninterrupted", checkpointing(tmp_path / "uninterrupted"))
    assert signal.getsignal(signal.SIGUSR1) == before  # the handler is put back after a fit
    assert not slurm_job.exists()

    status, probe = stopped_fit(kind, tmp_path, signal.SIGUSR1)
    assert isinstance(probe.environment, SLURMEnvironment) and probe.environment.auto_requeue
    assert status == 128 + signal.SIGUSR1
    assert slurm_job.read_text() == f"requeue {JOB_ID}\n"
    checkpoints = tmp_path / "checkpoints"
    assert sorted(os.listdir(checkpoints)) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 6
    assert not list(tmp_path.glob("hpc_ckpt_*.ckpt"))  # Lightning's own requeue handler did not run

    state, metrics, _ = fit(kind, tmp_path, checkpointing(tmp_path), ckpt_path="last")
    assert_same_weights(state, reference)
    assert metrics == reference_metrics


def test_sigterm_under_slurm_saves_and_does_not_requeue(slurm_job, tmp_path):
    status, _ = stopped_fit("classifier", tmp_path, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6
    assert not slurm_job.exists()


def test_a_failed_requeue_is_a_warning_and_the_checkpoint_is_saved(slurm_job, tmp_path):
    mock_scontrol(slurm_job.parent, status=1)
    with pytest.warns(UserWarning, match=f"`scontrol requeue {JOB_ID}` exited with 1 .*the job was not requeued"):
        status, _ = stopped_fit("classifier", tmp_path, signal.SIGUSR1)
    assert status == 128 + signal.SIGUSR1
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 6


def test_outside_slurm_the_requeue_signal_is_left_alone(tmp_path):
    before = signal.getsignal(signal.SIGUSR1)

    class Look(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            self.during = signal.getsignal(signal.SIGUSR1)

    look = Look()
    trainer(tmp_path, max_steps=1, limit_val_batches=0, enable_checkpointing=True,
            callbacks=[look, *checkpointing(tmp_path)]).fit(classifier(), classifier_data())
    assert look.during == before


# ---------------------------------------------------------------------- the sbatch script


def sbatch_command(config: str, nodes: int = 1, tasks_per_node: int = 1) -> list[str]:
    """The ``srun`` line of scripts/slurm/simpool.sbatch as the arguments after ``simpool``, for
    ``config`` and what SLURM granted, with no extra arguments."""
    text = SBATCH.read_text().replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.strip().startswith("srun ")]
    line = line.replace('"$@"', "")
    variables = {"CONFIG": config, "SLURM_NNODES": str(nodes), "SLURM_NTASKS_PER_NODE": str(tasks_per_node)}
    for name, value in variables.items():
        line = line.replace(f'"${{{name}}}"', shlex.quote(value)).replace(f"${{{name}}}", value)
    words = shlex.split(line)
    assert "$" not in " ".join(words), f"unreplaced shell variables in {words}"
    return words[words.index("simpool") + 1:]


def test_sbatch_script_asks_for_the_signal_the_fit_requeues_on():
    text = SBATCH.read_text()
    assert "#SBATCH --signal=SIGUSR1@90" in text and "#SBATCH --requeue" in text
    command = sbatch_command("configs/supervised/vit_s_simpool.yaml", nodes=4, tasks_per_node=8)
    assert command[:3] == ["fit", "-c", "configs/supervised/vit_s_simpool.yaml"] and "--ckpt_path=last" in command
    assert "--trainer.num_nodes=4" in command and "--trainer.devices=8" in command
    plugins = json.loads(next(word for word in command if word.startswith("--trainer.plugins=")).split("=", 1)[1])
    assert plugins == [{
        "class_path": "lightning_fabric.plugins.environments.SLURMEnvironment",
        "init_args": {"auto_requeue": True, "requeue_signal": "SIGUSR1"},
    }]


def test_sbatch_command_parses_with_the_recipe(slurm_job, tmp_path, capsys):
    command = sbatch_command(str(ROOT / "configs" / "supervised" / "vit_s_simpool.yaml"))
    with pytest.raises(SystemExit) as exit_info:  # --print_config prints the resolved config and exits
        main([*command, f"--data.init_args.root={tmp_path}", "--print_config"])
    assert exit_info.value.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    assert "lightning_fabric.plugins.environments.SLURMEnvironment" in out and "requeue_signal: SIGUSR1" in out


# ---------------------------------------------------------------------- two processes: SLURM, torchrun


class WaitAt(pl.Callback):
    """After training step ``step``: writes ``marker.<rank>`` and waits (up to 5 minutes) for the file ``go``."""

    def __init__(self, step: int, marker: str, go: str) -> None:
        self.step = step
        self.marker = marker
        self.go = go

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            Path(f"{self.marker}.{trainer.global_rank}").write_text("")
            deadline = time.monotonic() + 300
            while not Path(self.go).exists() and time.monotonic() < deadline:
                time.sleep(0.05)


class RecordMetrics(pl.Callback):
    """Writes the metrics the fit ended with and the cluster environment Lightning used to ``path`` (rank 0)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
            environment = type(trainer._accelerator_connector.cluster_environment).__name__
            Path(self.path).write_text(json.dumps({"metrics": metrics, "environment": environment}))


def two_process_config(root: Path, extra_callback: str = "") -> Path:
    record = f"    - class_path: tests.test_cluster.RecordMetrics\n      init_args: {{path: {root / 'metrics.json'}}}\n"
    return quickstart_config(root, every_n_train_steps=2, extra_callback=extra_callback + record)


TWO_PROCESSES = [*SHORT, "--trainer.devices=2", "--trainer.strategy=ddp"]


def run(command: list[str], root: Path, env: dict[str, str], name: str, timeout: float = 600) -> None:
    with open(root / f"{name}.log", "w") as out:
        result = subprocess.run(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout)
    assert result.returncode == 0, (root / f"{name}.log").read_text()[-5000:]


def finished(root: Path, environment: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The single last.ckpt of a finished shortened quickstart (2 epochs of 3 steps on 2 processes)
    and the metrics it ended with; checks Lightning ran it in ``environment``."""
    assert sorted(p.name for p in (root / "checkpoints").glob("last*.ckpt")) == ["last.ckpt"]
    last = torch.load(root / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["global_step"] == 6
    record = json.loads((root / "metrics.json").read_text())
    assert record["environment"] == environment
    return last["state_dict"], record["metrics"]


def one_thread() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def lightning_ddp(tmp_path_factory) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """The shortened quickstart on 2 processes, launched by Lightning's ``ddp`` (it starts rank 1)."""
    root = tmp_path_factory.mktemp("lightning_ddp")
    run([sys.executable, "-m", "simpool_lightning.cli", "fit", "-c", str(two_process_config(root)), *TWO_PROCESSES],
        root, one_thread(), "fit")
    return finished(root, "LightningEnvironment")


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_torchrun_two_processes_match_lightning_ddp(lightning_ddp, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nnodes=1", "--nproc-per-node=2", "-m", "simpool_lightning.cli",
               "fit", "-c", str(two_process_config(tmp_path)), *TWO_PROCESSES]
    run(command, tmp_path, one_thread(), "torchrun")
    state, metrics = finished(tmp_path, "TorchElasticEnvironment")
    assert_same_weights(state, lightning_ddp[0])
    assert metrics == lightning_ddp[1] and "val/acc1" in metrics


def start_slurm_tasks(root: Path, config: Path, port: int, name: str) -> list[subprocess.Popen]:
    """The two tasks ``srun`` starts for the sbatch script's command, on this machine."""
    command = sbatch_command(str(config), nodes=1, tasks_per_node=2)
    procs = []
    for rank in range(2):
        env = {**one_thread(), **slurm_variables(tasks=2, rank=rank, port=port),
               "PATH": f"{root / 'slurm' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
        out = open(root / f"{name}.rank{rank}.log", "w")
        procs.append(subprocess.Popen([sys.executable, "-m", "simpool_lightning.cli", *command, *SHORT],
                                      cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT))
    return procs


def logs(root: Path, name: str, tail: Optional[int] = 3000) -> str:
    """The two tasks' output (the last ``tail`` characters of each)."""
    return "".join((root / f"{name}.rank{rank}.log").read_text()[-(tail or 0):] for rank in range(2))


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_two_slurm_tasks_requeue_on_sigusr1_and_the_requeued_job_resumes_exactly(lightning_ddp, tmp_path):
    scontrol = mock_scontrol(tmp_path / "slurm")
    markers, go = tmp_path / "paused", tmp_path / "go"
    wait = (f"    - class_path: tests.test_cluster.WaitAt\n"
            f"      init_args: {{step: 5, marker: {markers}, go: {go}}}\n")  # epoch 2, batch 2 of 3: no step checkpoint
    config = two_process_config(tmp_path, extra_callback=wait)
    port = free_port()

    procs = start_slurm_tasks(tmp_path, config, port, "first")
    deadline = time.monotonic() + 600
    while not all(Path(f"{markers}.{rank}").exists() for rank in range(2)):
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(logs(tmp_path, "first"))
        time.sleep(0.1)
    for p in procs:  # SLURM signals every task of the step
        p.send_signal(signal.SIGUSR1)
    go.write_text("")
    statuses = [p.wait(timeout=300) for p in procs]
    assert statuses == [128 + signal.SIGUSR1] * 2, logs(tmp_path, "first")
    assert scontrol.read_text() == f"requeue {JOB_ID}\n"  # once, by rank 0
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 5
    assert "requeue signal at global step 5" in logs(tmp_path, "first", tail=None)

    # The requeued job: the same script, the same command (WaitAt's step is past).
    go.unlink()
    procs = start_slurm_tasks(tmp_path, config, free_port(), "requeued")
    assert [p.wait(timeout=600) for p in procs] == [0, 0], logs(tmp_path, "requeued")
    assert f"Restoring states from the checkpoint path at {tmp_path / 'checkpoints' / 'last.ckpt'}" in logs(
        tmp_path, "requeued", tail=None)
    state, metrics = finished(tmp_path, "SLURMEnvironment")
    assert_same_weights(state, lightning_ddp[0])
    assert metrics == lightning_ddp[1]
    assert scontrol.read_text() == f"requeue {JOB_ID}\n"
