"""LinearProbe: only the linear layer learns, the frozen model is bit-identical after training."""
from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from simpool_lightning.data import collate_samples
from simpool_lightning.evaluation import LinearProbe, load_feature_model
from simpool_lightning.models import DINO


class ColourClasses(Dataset):
    """Class c brightens colour channel c % 3 and darkens by c // 3: linearly separable from pixel statistics."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 4
        self.images = torch.randn(n, 3, 16, 16, generator=g) * 0.5
        for i, c in enumerate(self.labels.tolist()):
            self.images[i, c % 3] += 1.5 if c < 3 else -1.5

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "label": int(self.labels[i])}


class ConvBN(nn.Module):
    """A model with BatchNorm (whose statistics must not move) and a features method."""

    feature_dim = 16

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Dropout(0.5))

    def features(self, images: Tensor) -> Tensor:
        return self.body(images).mean((2, 3))


def fit(model: pl.LightningModule, tmp_path, epochs: int = 1, **kw) -> pl.Trainer:
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
        default_root_dir=str(tmp_path), **{"enable_checkpointing": False, **kw},
    )
    trainer.fit(model, DataLoader(ColourClasses(128, 0), 32, shuffle=True, collate_fn=collate_samples),
                DataLoader(ColourClasses(64, 1), 64, collate_fn=collate_samples))
    return trainer


@pytest.mark.parametrize("use_bn", [False, True])
def test_probe_trains_the_linear_layer_only(tmp_path, use_bn):
    torch.manual_seed(0)
    backbone = ConvBN()
    with torch.no_grad():  # non-trivial running statistics, so that a change would show
        backbone.body(torch.randn(64, 3, 16, 16) * 3 + 1)
    frozen = {k: v.clone() for k, v in backbone.state_dict().items()}
    probe = LinearProbe(backbone, num_classes=4, use_bn=use_bn, lr=0.5)
    linear = probe.head[-1] if use_bn else probe.head
    head_before = linear.weight.detach().clone()
    assert head_before.std().item() == pytest.approx(0.01, rel=0.3)  # DINO's N(0, 0.01) initialisation
    trainer = fit(probe, tmp_path, epochs=5)
    after = backbone.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())  # weights and BN statistics, bit for bit
    assert not backbone.training and all(not p.requires_grad for p in backbone.parameters())
    assert not torch.equal(linear.weight, head_before)
    assert trainer.callback_metrics["val/acc1"] > 0.6  # chance is 0.25


def test_probe_on_a_dino_checkpoint(tmp_path):
    torch.manual_seed(0)
    vit = dict(img_size=16, patch_size=8, depth=1, embed_dim=32, num_heads=2)
    dino = DINO("vit_tiny_patch16_224", vit, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, drop_path_rate=0.0)
    path = str(tmp_path / "dino.ckpt")
    # What a Trainer writes, minus the training state (tests/models/test_dino.py round-trips a real one).
    torch.save({"state_dict": dino.state_dict(), "hyper_parameters": dict(dino.hparams), "pytorch-lightning_version": pl.__version__}, path)

    probe = LinearProbe("DINO", checkpoint=path, num_classes=4, lr=0.1)
    images = ColourClasses(4, 2).images
    assert torch.equal(probe.features(images), dino.eval().features(images))
    assert probe.head.in_features == 32
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "probe", filename="probe")
    fit(probe, tmp_path, enable_checkpointing=True, callbacks=[ckpt], limit_train_batches=2)
    reloaded = LinearProbe.load_from_checkpoint(ckpt.best_model_path)  # rebuilds the DINO from its checkpoint
    assert torch.equal(reloaded(images), probe(images))


def test_load_feature_model_errors(tmp_path):
    with pytest.raises(TypeError, match="no features"):
        load_feature_model(nn.Linear(2, 2))
    with pytest.raises(FileNotFoundError, match="missing.ckpt"):
        load_feature_model("DINO", checkpoint=str(tmp_path / "missing.ckpt"))
    with pytest.raises(ValueError, match="NoSuchModel"):
        load_feature_model("NoSuchModel")
    with pytest.raises(ValueError, match="feature width"):
        LinearProbe(type("F", (nn.Module,), {"features": lambda self, x: x})(), num_classes=4)


def test_load_feature_model_keeps_its_own_hyperparameters_under_the_cli_context():
    # LightningCLI builds an evaluator inside a context that would hand the evaluator's arguments to
    # every nested save_hyperparameters; the loaded model must record its own.
    from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters_context

    with _given_hyperparameters_context({"k": 20, "checkpoint": None}, "jsonargparse"):
        model = load_feature_model("ImageClassifier", model_kwargs=dict(backbone="resnet18", num_classes=3))
    assert model.hparams.backbone == "resnet18" and model.hparams.num_classes == 3
    assert "k" not in model.hparams and "_instantiator" not in model.hparams
