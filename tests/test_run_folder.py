"""One key moves a run: ``--trainer.default_root_dir`` places logs, attention images and checkpoints.

The quickstart runs for real (two short fits, the second with ``--ckpt_path last``); every other
recipe is parsed and its trainer built with the override, and the folders its logger and its
checkpoint callbacks would write to are read back from Lightning.
"""
from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint

from simpool_lightning.cli import SimPoolCLI, main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "configs").rglob("*.yaml"))
SHORT = [
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--data.init_args.train_size=64",
    "--data.init_args.val_size=16",
    "--data.init_args.batch_size=32",
    "--model.init_args.backbone_kwargs.depth=1",
]


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def test_quickstart_writes_every_file_under_the_run_folder_and_resumes_from_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cwd, run = tmp_path / "cwd", tmp_path / "elsewhere" / "run"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # where the config's own folder (runs/quickstart, relative) would land
    config = str(ROOT / "configs" / "quickstart.yaml")
    main(["fit", "-c", config, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=1", *SHORT])
    files = _files(run)
    assert {"config.yaml", "hparams.yaml", "checkpoints/last.ckpt", "attention_maps/epoch=000.png"} <= files, files
    assert any(f.startswith("events.out.tfevents.") for f in files), files
    assert any(f.startswith("checkpoints/epoch=0-step=2") for f in files), files  # the best by val/acc1
    assert _files(cwd) == set()  # nothing anywhere else
    first_epoch_image = (run / "attention_maps" / "epoch=000.png").stat().st_mtime_ns

    main(["fit", "-c", config, f"--trainer.default_root_dir={run}", "--trainer.max_epochs=2", "--ckpt_path=last", *SHORT])
    assert torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    # Continued from the first fit's last.ckpt: epoch 0 was not trained and validated again.
    assert (run / "attention_maps" / "epoch=000.png").stat().st_mtime_ns == first_epoch_image
    assert "attention_maps/epoch=001.png" in _files(run)
    assert _files(cwd) == set()


class _TrainerOnly(SimPoolCLI):
    """The CLI up to the Trainer: the recipe's logger and callbacks, not its (ImageNet-sized) model or data."""

    def instantiate_classes(self) -> None:
        config = self.config.clone()
        config.model, config.data = None, None
        self.config_init = self.parser.instantiate_classes(config)
        self.model = self.datamodule = None
        self.trainer = self.instantiate_trainer()


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_puts_logs_images_and_checkpoints_in_the_overridden_run_folder(recipe: str, tmp_path: Path) -> None:
    run = tmp_path / "moved"
    cpu = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto", "--trainer.precision=32-true"]
    cli = _TrainerOnly(
        pl.LightningModule, pl.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf"}, run=False,
        args=["-c", str(ROOT / recipe), f"--trainer.default_root_dir={run}", *cpu, *_required_data_args(recipe, tmp_path)],
    )
    trainer = cli.trainer
    assert Path(trainer.default_root_dir) == run
    # AttentionMapLogger and LightningCLI's config.yaml write to log_dir; TensorBoard to the logger's folder.
    assert Path(trainer.log_dir) == run
    for logger in trainer.loggers:
        assert Path(logger.log_dir) == run, type(logger).__name__
    for callback in trainer.callbacks:
        if isinstance(callback, ModelCheckpoint):
            callback.setup(trainer, None, stage="fit")  # where Lightning resolves its folder
            assert Path(callback.dirpath) == run / "checkpoints", recipe
    # The recipe names no folder of its own for them, which an override of the run folder would miss.
    section = yaml.safe_load((ROOT / recipe).read_text()).get("trainer", {})
    assert not _keys(section) & {"dirpath", "save_dir"}, recipe


def _required_data_args(recipe: str, folder: Path) -> list[str]:
    """A folder for each argument the recipe's DataModule requires and the user gives (``root``, ...)."""
    data = yaml.safe_load((ROOT / recipe).read_text()).get("data") or {}
    if "class_path" not in data:
        return []
    module, name = data["class_path"].rsplit(".", 1)
    parameters = inspect.signature(getattr(importlib.import_module(module), name).__init__).parameters
    given = data.get("init_args") or {}
    return [
        f"--data.init_args.{key}={folder}" for key, p in parameters.items()
        if key != "self" and p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and key not in given
    ]


def _keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _keys(v)}
    return set()
