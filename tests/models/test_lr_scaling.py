"""A learning rate that follows the global batch (issue #22): timm's ``--lr-base`` rule, resolved by
both models in ``configure_optimizers`` from the Trainer's world size, the training loader's batch
size and gradient accumulation; an explicit ``lr`` wins.

The rule is compared with a transcription of timm's ``train.py`` (``tests/reference/timm_lr_base.py``)
for exact equality: the same float operations in the same order. Against the formula as written,
``base * global / reference``, the tolerance is a few ulps (the division happens first in timm).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import pytorch_lightning as pl
import yaml
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger

from simpool_lightning.data import MultiCropTransform, SyntheticShapesDataModule
from simpool_lightning.models import DINO, ImageClassifier
from simpool_lightning.models.lr_scaling import default_lr_scale, scale_lr
from simpool_lightning.models.schedules import cosine_schedule
from tests.isolated import run_isolated
from tests.reference.timm_lr_base import timm_lr
from tests.trainers import trainer

VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
WORLD_SIZES = (1, 2, 8)
BATCH_SIZES = (32, 74)
ULPS = 4 * 2.0**-52  # relative: base * (global / reference) against (base * global) / reference


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("batch_size", BATCH_SIZES)
@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("optimizer", ["adamw", "sgd", "lamb", "lars", "nadam", "momentum"])
@pytest.mark.parametrize("scale", [None, "linear", "sqrt"])
def test_rule_equals_timm_train_py(world_size, batch_size, accumulate, optimizer, scale):
    global_batch = batch_size * world_size * accumulate
    chosen = scale or default_lr_scale(optimizer)
    ours = scale_lr(5e-4, 592, global_batch, chosen)
    assert ours == timm_lr(batch_size, world_size, accumulate, optimizer, None, 5e-4, 592, scale or "")
    ratio = global_batch / 592 if chosen == "linear" else math.sqrt(global_batch / 592)
    assert ours == pytest.approx(5e-4 * ratio, rel=ULPS)


def test_timm_picks_sqrt_for_adaptive_optimizers_and_linear_for_the_rest():
    assert {name: default_lr_scale(name) for name in ["adamw", "AdamW", "adam", "lamb", "adafactor", "sgd", "lars", "rmsprop"]} == {
        "adamw": "sqrt", "AdamW": "sqrt", "adam": "sqrt", "lamb": "sqrt", "adafactor": "sqrt",
        "sgd": "linear", "lars": "linear", "rmsprop": "linear",
    }


# ---------------------------------------------------------------------- in the models, in a real fit

def classifier(**kwargs: Any) -> ImageClassifier:
    return ImageClassifier(*VIT, pool="avg", num_classes=4, **{"warmup_epochs": 0, **kwargs})


def dino(**kwargs: Any) -> DINO:
    return DINO(backbone=VIT[0], backbone_kwargs=VIT[1], out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16,
                **{"warmup_epochs": 0, **kwargs})


# name -> (model, optimizer, the timm settings it stands for: lr, lr_base, lr_base_size, lr_base_scale)
VARIANTS: dict[str, tuple[Callable[[], pl.LightningModule], str, tuple[Any, float, int, str]]] = {
    "classifier_linear": (lambda: classifier(lr_base=5e-4, lr_base_size=592, lr_base_scale="linear"), "adamw", (None, 5e-4, 592, "linear")),
    "classifier_adamw_as_timm": (lambda: classifier(lr_base=5e-4, lr_base_size=592), "adamw", (None, 5e-4, 592, "")),
    "classifier_sgd_as_timm": (lambda: classifier(optimizer="sgd", lr_base=0.4, lr_base_size=1024), "sgd", (None, 0.4, 1024, "")),
    "classifier_explicit_lr": (lambda: classifier(lr=1e-3, lr_base=5e-4, lr_base_size=592, lr_base_scale="linear"), "adamw", (1e-3, 5e-4, 592, "linear")),
    "dino_linear": (lambda: dino(lr_base=5e-4, lr_base_size=256, lr_base_scale="linear"), "adamw", (None, 5e-4, 256, "linear")),
    "dino_lars_as_timm": (lambda: dino(optimizer="lars", lr_base=0.3, lr_base_size=256), "lars", (None, 0.3, 256, "")),
    "dino_sqrt": (lambda: dino(lr_base=5e-4, lr_base_size=256, lr_base_scale="sqrt"), "adamw", (None, 5e-4, 256, "sqrt")),
    "dino_explicit_lr": (lambda: dino(lr=2e-3, lr_base=5e-4, lr_base_size=256), "adamw", (2e-3, 5e-4, 256, "")),
}


def peak_lrs(optimizer: Any) -> list[float]:
    """Each group's peak learning rate: what a scheduler starts from (``initial_lr``), else its ``lr``."""
    return [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]


class RecordLearningRates(pl.Callback):
    """Once the fit's optimizers exist: the fitted model's peak LRs, and those every variant's
    ``configure_optimizers`` gives under this same Trainer; to ``<folder>/rank<r>.json``."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        record = {"fitted": peak_lrs(trainer.optimizers[0]), "fitted_lr_scaled": pl_module.lr_scaled}
        for name, (make, _, _) in VARIANTS.items():
            model = make()
            model.trainer = trainer
            configured = model.configure_optimizers()
            record[name] = peak_lrs(configured["optimizer"] if isinstance(configured, dict) else configured)
            record[f"{name}_lr_scaled"] = model.lr_scaled
        Path(self.folder, f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


def fit_and_record(folder: str, world_size: str, batch_size: str, accumulate: str = "1") -> None:
    """One optimizer step of a classifier scaled from 5e-4 at 592 on ``world_size`` CPU processes."""
    world, batch = int(world_size), int(batch_size)
    pl.seed_everything(0, verbose=False)
    model = classifier(lr_base=5e-4, lr_base_size=592, lr_base_scale="linear")
    data = SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=batch * world * int(accumulate), val_size=8,
                                     batch_size=batch)
    t = trainer(folder, devices=world, strategy="ddp_fork" if world > 1 else "auto", max_steps=1, limit_val_batches=0,
                accumulate_grad_batches=int(accumulate), callbacks=[RecordLearningRates(folder)])
    t.fit(model, data)


def check_records(folder: Path, world: int, batch: int, accumulate: int = 1) -> None:
    records = [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]
    assert all(record == records[0] for record in records[1:])  # every rank trains at the same rate
    record = records[0]
    global_batch = batch * world * accumulate
    expected = timm_lr(batch, world, accumulate, "adamw", None, 5e-4, 592, "linear")
    assert record["fitted"] == [expected, expected] and record["fitted_lr_scaled"] == expected
    assert expected == pytest.approx(5e-4 * global_batch / 592, rel=ULPS)
    for name, (_, optimizer, (lr, base, size, scale)) in VARIANTS.items():
        want = timm_lr(batch, world, accumulate, optimizer, lr, base, size, scale)
        assert record[name] == [want, want], name  # both parameter groups (with and without weight decay)
        assert record[f"{name}_lr_scaled"] == want, name
        if lr is not None:
            assert want == lr  # an explicit lr is left alone
        else:
            chosen = scale or default_lr_scale(optimizer)
            ratio = global_batch / size if chosen == "linear" else math.sqrt(global_batch / size)
            assert want == pytest.approx(base * ratio, rel=ULPS), name


@pytest.mark.parametrize("batch", BATCH_SIZES)
def test_one_process(batch, tmp_path):
    fit_and_record(str(tmp_path), "1", str(batch))
    check_records(tmp_path, 1, batch)


def test_one_process_with_gradient_accumulation(tmp_path):
    fit_and_record(str(tmp_path), "1", "32", "3")
    check_records(tmp_path, 1, 32, accumulate=3)


# Each takes 20 to 30 s on 2 cores (a fresh interpreter, forked ranks): one runs by default.
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize(
    "world, batch",
    [(8, 74), pytest.param(8, 32, marks=pytest.mark.slow), pytest.param(2, 32, marks=pytest.mark.slow),
     pytest.param(2, 74, marks=pytest.mark.slow)],
)
def test_several_processes(world, batch, tmp_path):
    run_isolated("tests.models.test_lr_scaling:fit_and_record", str(tmp_path), str(world), str(batch))
    check_records(tmp_path, world, batch)


def test_the_peak_lr_drives_the_schedules_and_is_logged(tmp_path):
    logger = CSVLogger(str(tmp_path), name="", version="")
    data = SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=96, val_size=8, batch_size=48)
    model = classifier(lr_base=4e-3, lr_base_size=64, lr_base_scale="linear", warmup_lr=1e-5, warmup_epochs=0.5)
    trainer(tmp_path, max_epochs=1, limit_val_batches=0, logger=logger).fit(model, data)
    assert model.lr_scaled == 4e-3 * (48 / 64)  # 3e-3
    hparams = yaml.safe_load((tmp_path / "hparams.yaml").read_text())
    assert hparams["lr_scaled"] == model.lr_scaled and hparams["global_batch_size"] == 48
    assert hparams["lr_base_scale"] == "linear" and hparams["lr"] is None

    # DINO's per-step schedule peaks at the scaled rate (no warm-up here) and ends at min_lr, unscaled.
    model = dino(lr_base=1e-3, lr_base_size=256, lr_base_scale="linear", min_lr=1e-5)
    crops = MultiCropTransform(local_crops_number=2, global_size=32, local_size=16)
    data = SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=64, val_size=8, batch_size=32, multi_crop=crops)
    trainer(tmp_path, max_epochs=1, limit_val_batches=0).fit(model, data)
    assert model.lr_scaled == 1e-3 * (32 / 256)
    # cosine_schedule's step 0 is min_lr + (peak - min_lr): the peak within an ulp.
    assert model.schedules(0, 0)["lr"] == pytest.approx(model.lr_scaled, rel=ULPS) and model.schedules(2, 0)["lr"] == 1e-5


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(lr=0.0), "lr must be a positive number or None"),
        (dict(lr=-1e-3), "lr must be a positive number or None"),
        (dict(lr_base=0.0), "lr_base must be a positive number"),
        (dict(lr_base_size=0), "lr_base_size must be a positive whole number"),
        (dict(lr_base_size=1.5), "lr_base_size must be a positive whole number"),
        (dict(lr_base_scale="log"), "lr_base_scale must be 'linear', 'sqrt' or None"),
    ],
)
@pytest.mark.parametrize("make", [classifier, dino], ids=["classifier", "dino"])
def test_bad_settings_name_the_setting(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_without_a_reference_batch_lr_base_is_the_rate_and_the_default_is_unchanged(tmp_path):
    data = SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=32, val_size=8, batch_size=16)
    for model, want in [(classifier(), 5e-4), (classifier(lr_base=2e-3), 2e-3), (classifier(lr=3e-3), 3e-3)]:
        trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, data)
        assert model.lr_scaled == want


class LookAtTheStart(pl.Callback):
    """The optimizer's rates and the scheduler's step at the first batch a fit trains on."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if not self.lrs:
            self.lrs = [group["lr"] for group in trainer.optimizers[0].param_groups]
            self.step = trainer.lr_scheduler_configs[0].scheduler.last_epoch


def test_a_resumed_fit_trains_at_its_own_global_batch(tmp_path):
    # Saved at the end of an epoch with batch 16, resumed with batch 32 (allowed at an epoch's end):
    # from the resumed step on the rate is the one for 32, not the checkpoint's.
    settings = dict(lr_base=1e-3, lr_base_size=64, lr_base_scale="linear", warmup_epochs=0, min_lr=1e-5)
    epochs = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1)
    trainer(tmp_path, max_epochs=1, limit_val_batches=0, enable_checkpointing=True, callbacks=[epochs]).fit(
        classifier(**settings), SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=64, val_size=8, batch_size=16)
    )
    look, model = LookAtTheStart(), classifier(**settings)
    trainer(tmp_path, max_epochs=3, limit_val_batches=0, callbacks=[look]).fit(
        model, SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=64, val_size=8, batch_size=32),
        ckpt_path=str(tmp_path / "epoch=0.ckpt"),
    )
    assert model.lr_scaled == 1e-3 * 32 / 64 and look.step == 4  # 4 steps of 16 done
    total = 3 * 2  # what this run's schedule counts: 3 epochs of 2 steps
    want = model.lr_scaled * cosine_schedule(4, total, 1.0, 1e-5 / model.lr_scaled)
    assert look.lrs == [want, want]


def test_outside_a_fit_only_an_unscaled_rate_resolves():
    assert dino(lr=1e-3).configure_optimizers().param_groups[0]["lr"] == 1e-3
    assert dino(lr_base=2e-3).configure_optimizers().param_groups[0]["lr"] == 2e-3
    with pytest.raises(ValueError, match="lr_base_size=256 scales the learning rate to the global batch, which only a Trainer knows"):
        dino(lr_base_size=256).configure_optimizers()
