"""Exact resumption (issue #10): a fit resumed from a checkpoint saved at any step, mid-epoch or at
an epoch's end, or on SIGTERM, ends with the same weights and metrics as the uninterrupted fit.

Tolerance: none. On CPU, with in-process loading, the resumed fit is bit-identical (``torch.equal``
on every weight and buffer, ``==`` on the validation metrics). The models here use dropout,
stochastic depth, mixup, random flips (classifier) and random multi-crops, an EMA teacher and a
center (DINO): every piece of state a resume has to get right.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any, Callable

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint

from simpool_lightning.callbacks import PreemptionCheckpoint, SeedEveryStep
from simpool_lightning.data import MultiCropTransform, SyntheticShapesDataModule
from simpool_lightning.models import DINO, ImageClassifier

VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2))
STEPS_PER_EPOCH = 4  # 64 training images in batches of 16
EPOCHS = 2


def classifier() -> ImageClassifier:
    return ImageClassifier(
        *VIT, pool="simpool", num_classes=4, lr=1e-3, warmup_epochs=0, drop_rate=0.3, drop_path_rate=0.2, mixup_alpha=0.2
    )


def classifier_data() -> SyntheticShapesDataModule:
    return SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=64, val_size=16, batch_size=16, hflip=0.5)


def dino() -> DINO:
    return DINO(
        backbone=VIT[0], backbone_kwargs=VIT[1], out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, drop_path_rate=0.2,
        lr=1e-3, min_lr=1e-4, warmup_epochs=0.5, momentum_teacher=0.9,
    )


def dino_data() -> SyntheticShapesDataModule:
    crops = MultiCropTransform(local_crops_number=2, global_size=32, local_size=16)
    return SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=64, val_size=16, batch_size=16, multi_crop=crops)


MODELS: dict[str, tuple[Callable[[], pl.LightningModule], Callable[[], pl.LightningDataModule]]] = {
    "classifier": (classifier, classifier_data),
    "dino": (dino, dino_data),
}


def fit(
    kind: str, root: Path, callbacks: list[pl.Callback], ckpt_path: str | None = None, seed: int = 0
) -> tuple[dict[str, torch.Tensor], dict[str, float], pl.Trainer]:
    """Fit ``kind`` for two epochs; returns its final state dict, its last metrics and the trainer."""
    pl.seed_everything(seed, verbose=False)
    make_model, make_data = MODELS[kind]
    model = make_model()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=EPOCHS,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=1,
        default_root_dir=str(root),
        callbacks=[SeedEveryStep(), *callbacks],
    )
    trainer.fit(model, make_data(), ckpt_path=ckpt_path)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return state, {k: float(v) for k, v in trainer.callback_metrics.items()}, trainer


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


class StrayTrainLoader(pl.Callback):
    """Asks the DataModule for a new training loader and leaves it unused, as KNNCallback does."""

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        trainer.datamodule.train_dataloader()


@pytest.fixture(scope="module", params=list(MODELS))
def reference(request, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted fit, with a checkpoint after every step and at the end of every epoch."""
    root = tmp_path_factory.mktemp(f"reference_{request.param}")
    every_step = ModelCheckpoint(dirpath=root / "steps", filename="{step}", every_n_train_steps=1, save_top_k=-1)
    every_epoch = ModelCheckpoint(dirpath=root / "epochs", filename="{epoch}", save_top_k=-1)
    state, metrics, _ = fit(request.param, root, [every_step, every_epoch, StrayTrainLoader()])
    return {"kind": request.param, "root": root, "state": state, "metrics": metrics}


@pytest.mark.parametrize(
    "checkpoint",
    [
        "steps/step=2.ckpt",  # mid-epoch
        "steps/step=4.ckpt",  # after the epoch's last batch, before its validation
        "epochs/epoch=0.ckpt",  # after the epoch's validation
        "steps/step=7.ckpt",  # mid-epoch, second epoch
    ],
)
def test_resumed_fit_matches_the_uninterrupted_fit(reference, checkpoint, tmp_path):
    # A different seed for the resumed process: the checkpoint's seed must win.
    state, metrics, _ = fit(reference["kind"], tmp_path, [], ckpt_path=str(reference["root"] / checkpoint), seed=123)
    assert_same_weights(state, reference["state"])
    assert metrics == reference["metrics"]


class SigtermAt(pl.Callback):
    """Sends this process SIGTERM after training batch ``step`` (a scheduler pre-empting the job)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_saves_a_checkpoint_that_resumes_exactly(reference, tmp_path):
    checkpoints = tmp_path / "checkpoints"
    # Step checkpoints too rare to help: only the SIGTERM checkpoint can carry the run over.
    callbacks = [
        ModelCheckpoint(dirpath=checkpoints, every_n_train_steps=100, save_top_k=0, save_last=True),
        PreemptionCheckpoint(),
    ]
    with pytest.raises(SystemExit) as stopped:  # Lightning's SIGTERMException
        fit(reference["kind"], tmp_path, [*callbacks, SigtermAt(step=6)])
    assert stopped.value.code == 128 + signal.SIGTERM
    assert sorted(os.listdir(checkpoints)) == ["last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=False)["global_step"] == 6

    state, metrics, _ = fit(reference["kind"], tmp_path, callbacks, ckpt_path="last")
    assert_same_weights(state, reference["state"])
    assert metrics == reference["metrics"]


def test_preemption_checkpoint_needs_a_last_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="add a ModelCheckpoint with save_last=True"):
        fit("classifier", tmp_path, [ModelCheckpoint(dirpath=tmp_path), PreemptionCheckpoint()])


# ---------------------------------------------------------------------- the training loader alone


def batches(loader, epoch: int, count: int | None = None) -> list[dict[str, Any]]:
    loader.sampler.set_epoch(epoch)
    out = []
    for batch in loader:
        out.append(batch)
        if count is not None and len(out) == count:
            break
    return out


def assert_same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x["label"], y["label"]) and torch.equal(x["image"], y["image"])


def test_loader_continues_an_epoch_where_the_checkpoint_left_it():
    data = classifier_data()  # random flips: augmentation is part of what must repeat
    whole = batches(data.train_dataloader(), epoch=1)
    assert len(whole) == STEPS_PER_EPOCH

    loader = classifier_data().train_dataloader()
    batches(loader, epoch=1, count=1)
    position = loader.position()
    assert position == {"seed": 0, "epoch": 1, "batches": 1, "batch_size": 16, "num_replicas": 1}

    second = classifier_data()  # resumed through the DataModule's state, then interrupted again a batch later
    second.load_state_dict({"train_loader": position})
    loader = second.train_dataloader()
    assert_same_batches(batches(loader, epoch=1, count=1), whole[1:2])
    assert loader.position()["batches"] == 2

    third = classifier_data()
    third.load_state_dict({"train_loader": loader.position()})
    assert_same_batches(batches(third.train_dataloader(), epoch=1), whole[2:])
    # The position applies to its own epoch only; the next epoch starts from its first batch.
    assert len(batches(third.train_dataloader(), epoch=2)) == STEPS_PER_EPOCH


def test_order_is_a_function_of_seed_and_epoch(monkeypatch):
    def labels(seed: int, epoch: int) -> torch.Tensor:
        monkeypatch.setenv("PL_GLOBAL_SEED", str(seed))
        return torch.cat([b["label"] for b in batches(classifier_data().train_dataloader(), epoch)])

    assert torch.equal(labels(0, 0), labels(0, 0))
    assert not torch.equal(labels(0, 0), labels(0, 1))
    assert not torch.equal(labels(0, 0), labels(1, 0))


def test_loading_leaves_the_global_generators_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    batches(classifier_data().train_dataloader(), epoch=0)  # draws random flips
    assert torch.equal(torch.get_rng_state(), before)


def test_mid_epoch_position_needs_the_same_batch_size():
    loader = classifier_data().train_dataloader()
    batches(loader, epoch=0, count=1)
    other = SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=64, val_size=16, batch_size=8)
    other.load_state_dict({"train_loader": loader.position()})
    with pytest.raises(ValueError, match=r"mid-epoch with batch_size=16 and this run has batch_size=8"):
        batches(other.train_dataloader(), epoch=0)
