"""ImageClassifier and PooledBackbone: every pool trains, checkpoints reload, fine-tuning starts from any checkpoint kind, DDP and bf16 run."""
from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import pytest
import pytorch_lightning as pl
import timm
import torch

from simpool_lightning.data import SyntheticShapesDataModule
from simpool_lightning.models import DINO, ImageClassifier, PooledBackbone
from simpool_lightning.models.backbone import WeightsMismatchError
from simpool_lightning.pooling import list_pools
from simpool_lightning.weights.pos_embed import simpool_forward_table
from tests.isolated import run_isolated
from tests.trainers import trainer

VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2))
CNN = ("resnet18", {})


def tiny_data(**kw) -> SyntheticShapesDataModule:
    args = dict(num_classes=4, image_size=32, train_size=64, val_size=40, seed=0, batch_size=16, num_workers=0)
    args.update(kw)
    return SyntheticShapesDataModule(**args)


@pytest.mark.parametrize("arch", ["vit", "cnn"])
@pytest.mark.parametrize("pool", list_pools() + ["token"])
def test_every_pool_trains_a_step(pool, arch):
    name, kwargs = VIT if arch == "vit" else CNN
    if pool == "token" and arch == "cnn":
        with pytest.raises(ValueError, match="needs a model with a class token"):
            ImageClassifier(name, kwargs, pool=pool, num_classes=4)
        return
    torch.manual_seed(0)
    model = ImageClassifier(name, kwargs, pool=pool, num_classes=4, lr=1e-3, warmup_epochs=0)
    # resnet18 downsamples 32x: 96 px gives a 3 x 3 map, where every pool's parameters matter.
    batch = next(iter(tiny_data(image_size=32 if arch == "vit" else 96).train_dataloader()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.net.named_parameters()}
    loss = torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"])
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert model.features(batch["image"]).shape == (16, model.backbone.out_dim)
    changed = [n for n, p in model.net.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.startswith("backbone.model") for n in changed) and "head.1.weight" in changed
    if pool not in ("token", "avg", "max", "avgmax", "catavgmax"):
        assert any(n.startswith("backbone.pool") for n in changed), f"no pool parameter of {pool} moved"


def test_vit_with_simpool_has_no_class_token_and_token_pool_has_one():
    simpool = PooledBackbone(VIT[0], "simpool", **VIT[1])
    assert simpool.model.cls_token is None and simpool.num_prefix_tokens == 0
    assert simpool.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 16, 64)
    token = PooledBackbone(VIT[0], "token", **VIT[1])
    assert token.model.cls_token is not None
    assert token.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 17, 64)


def test_before_norm_placement_pools_then_applies_the_final_norm():
    backbone = PooledBackbone(VIT[0], "simpool", placement="before_norm", **VIT[1])
    images = torch.randn(2, 3, 32, 32)
    tokens = backbone.forward_features(images)
    expected = backbone.final_norm(backbone.pool(tokens))
    torch.testing.assert_close(backbone(images), expected)
    assert isinstance(backbone.model.norm, torch.nn.Identity)


def save_lightning_checkpoint(model: pl.LightningModule, path: Path) -> Path:
    """What ModelCheckpoint writes, for a model that has not trained."""
    t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    t.strategy.connect(model)
    t.save_checkpoint(path)
    return path


def assert_backbone_equal(loaded: PooledBackbone, source: PooledBackbone) -> None:
    theirs = source.state_dict()
    assert sorted(loaded.state_dict()) == sorted(theirs)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, theirs[name]), name


TINY_VIT = ("vit_tiny_patch16_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2))


def test_pretrained_path_from_a_classifier_checkpoint_loads_backbone_and_pool_not_the_head(tmp_path):
    torch.manual_seed(0)
    source = ImageClassifier(*TINY_VIT, pool="simpool", num_classes=4)
    path = save_lightning_checkpoint(source, tmp_path / "source.ckpt")
    tuned = ImageClassifier(*TINY_VIT, pool="simpool", num_classes=7, pretrained_path=str(path), ema_decay=0.9)
    assert_backbone_equal(tuned.backbone, source.backbone)
    assert_backbone_equal(tuned.ema.module.backbone, source.backbone)  # the EMA starts from the loaded weights
    assert tuned.net.head[1].weight.shape == (7, 32)
    # gamma is no weight, so the strict load cannot catch it: a warning says the pools differ.
    with pytest.warns(UserWarning, match="trained with pool='simpool', pool_kwargs=None"):
        ImageClassifier(*TINY_VIT, pool="simpool", pool_kwargs={"gamma": 2.0}, num_classes=7, pretrained_path=str(path))

    # The fine-tuned model's own checkpoint rebuilds without the starting file.
    saved = save_lightning_checkpoint(tuned, tmp_path / "tuned.ckpt")
    path.unlink()
    hp = torch.load(saved, weights_only=True)["hyper_parameters"]
    assert hp["pretrained_path"] is None and hp["pretrained"] is False
    reloaded = ImageClassifier.load_from_checkpoint(saved)
    assert_backbone_equal(reloaded.backbone, tuned.backbone)


def test_pretrained_path_from_a_dino_checkpoint_takes_the_teacher(tmp_path):
    torch.manual_seed(0)
    dino = DINO(*TINY_VIT, pool="simpool", out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8)
    with torch.no_grad():  # make teacher and student differ, as after training
        for p in dino.student.parameters():
            p.add_(1.0)
    path = save_lightning_checkpoint(dino, tmp_path / "dino.ckpt")
    # DINO pools a ViT's tokens before the final norm: the classifier must too, else the keys say so.
    with pytest.raises(WeightsMismatchError, match="placement") as info:
        ImageClassifier(*TINY_VIT, pool="simpool", num_classes=3, pretrained_path=str(path))
    assert info.value.missing == ["model.norm.weight", "model.norm.bias"]
    assert info.value.unexpected == ["final_norm.weight", "final_norm.bias"]
    tuned = ImageClassifier(*TINY_VIT, pool="simpool", placement="before_norm", num_classes=3, pretrained_path=str(path))
    assert_backbone_equal(tuned.backbone, dino.teacher.backbone)


def test_pretrained_path_from_official_checkpoints(tmp_path):
    from tests.test_interop import VIT_KWARGS, _official_dino_vit, _supervised_vit

    vit = ("vit_tiny_patch16_224", VIT_KWARGS)
    state, _ = _supervised_vit(gamma=None)
    torch.save({"state_dict": state, "epoch": 3, "version": 2}, tmp_path / "supervised.pth.tar")
    tuned = ImageClassifier(*vit, pool="simpool", num_classes=3, pretrained_path=str(tmp_path / "supervised.pth.tar"))
    for name, value in tuned.backbone.state_dict().items():
        official = "gp.pool." + name[len("pool."):] if name.startswith("pool.") else name[len("model."):]
        assert torch.equal(value, state[official]), name
    assert tuned.net.head[1].weight.shape == (3, 64)

    # The DINO fork's file: its args (an argparse.Namespace) read with weights_only=True; the teacher is taken.
    student, _, _ = _official_dino_vit(seed=0)
    teacher, _, _ = _official_dino_vit(seed=10)
    args = argparse.Namespace(arch="vit_tiny", mode="simpool", gamma=1.25, patch_size=8, out_dim=32, use_bn_in_head=False)
    path = tmp_path / "checkpoint.pth"
    torch.save({"student": {"module." + k: v for k, v in student.items()}, "teacher": teacher, "args": args}, path)
    kwargs = dict(pool="simpool", placement="before_norm", num_classes=3, pretrained_path=str(path))
    with pytest.raises(ValueError, match="gamma=1.25, this model has gamma=2.0"):  # gamma is no weight: the args tell
        ImageClassifier(*vit, pool_kwargs={"gamma": 2.0, "use_beta": True}, **kwargs)
    tuned = ImageClassifier(*vit, pool_kwargs={"gamma": 1.25, "use_beta": True}, **kwargs)
    official = {"final_norm.": "backbone.norm.", "pool.": "backbone.simpool.", "model.": "backbone."}
    # the fork's SimPool-mode forward resamples its position embedding at every forward; the import does it once
    teacher["backbone.pos_embed"] = simpool_forward_table(teacher["backbone.pos_embed"])
    for name, value in tuned.backbone.state_dict().items():
        prefix = next(p for p in official if name.startswith(p))
        assert torch.equal(value, teacher[official[prefix] + name[len(prefix):]]), name


@pytest.mark.parametrize("layout", ["bare", "deit", "safetensors"])
def test_pretrained_path_from_a_plain_timm_state_dict(tmp_path, layout):
    from safetensors.torch import save_file

    source = timm.create_model("resnet18", num_classes=10)  # with its classifier fc
    path = tmp_path / ("resnet18.safetensors" if layout == "safetensors" else "resnet18.pth")
    if layout == "safetensors":
        save_file(source.state_dict(), path)
    elif layout == "deit":  # DeiT-style: under 'model', keys from a DDP-wrapped module
        torch.save({"model": {"module." + k: v for k, v in source.state_dict().items()}}, path)
    else:
        torch.save(source.state_dict(), path)
    loaded = PooledBackbone("resnet18", "gem", pretrained_path=str(path))
    ours = loaded.model.state_dict()
    assert sorted(ours) == sorted(k for k in source.state_dict() if not k.startswith("fc."))
    for name, value in ours.items():
        assert torch.equal(value, source.state_dict()[name]), name
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        PooledBackbone("resnet18", "avg", pretrained_path=str(tmp_path / "missing.pth"))


def test_mismatched_checkpoints_list_the_keys_and_name_the_file(tmp_path):
    path = save_lightning_checkpoint(ImageClassifier(*TINY_VIT, pool="simpool", num_classes=4), tmp_path / "depth1.ckpt")
    deeper = dict(TINY_VIT[1], depth=2, embed_dim=48)
    with pytest.raises(WeightsMismatchError) as info:
        ImageClassifier(TINY_VIT[0], deeper, pool="simpool", num_classes=4, pretrained_path=str(path))
    err = info.value
    assert err.path == str(path) and str(path) in str(err) and "ImageClassifier checkpoint" in str(err)
    assert "model.blocks.1.attn.qkv.weight" in err.missing and not err.unexpected
    assert ("pool.wq.weight", (32, 32), (48, 48)) in err.mismatched
    assert "pool.wq.weight: (32, 32) vs (48, 48)" in str(err)

    resnet = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18").state_dict(), resnet)
    with pytest.raises(WeightsMismatchError, match="plain timm state dict") as info:
        PooledBackbone("resnet34", "avg", pretrained_path=str(resnet))
    assert "layer1.2.conv1.weight" in info.value.missing

    torch.save({"epoch": 1}, tmp_path / "odd.pt")
    with pytest.raises(ValueError, match="odd.pt.*is none of"):
        PooledBackbone("resnet18", "avg", pretrained_path=str(tmp_path / "odd.pt"))
    with pytest.raises(ValueError, match="not both"):
        PooledBackbone("resnet18", "avg", pretrained=True, pretrained_path=str(resnet))


def test_pretrained_offline_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import time
    with pytest.raises(RuntimeError, match="pretrained_path"):
        PooledBackbone("resnet18", "avg", pretrained=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(backbone="resnet_does_not_exist"), "unknown timm backbone 'resnet_does_not_exist'"),
        (dict(pool="simpoool"), "unknown pool 'simpoool'"),
        (dict(num_classes=1), "num_classes must be >= 2"),
    ],
)
def test_bad_model_arguments(kwargs, match):
    args = dict(backbone="resnet18", pool="avg", num_classes=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ImageClassifier(**args)


def test_short_fit_beats_chance_and_checkpoint_reloads_identically(tmp_path):
    pl.seed_everything(0)
    data = tiny_data(train_size=256, val_size=64, batch_size=32)
    model = ImageClassifier(*VIT, pool="simpool", num_classes=4, lr=2e-3, warmup_epochs=0.5, ema_decay=0.9)
    t = trainer(tmp_path, max_epochs=3)
    t.fit(model, data)
    path = tmp_path / "model.ckpt"
    t.save_checkpoint(path)
    metrics = t.validate(model, data, verbose=False)[0]
    assert {"val/acc1", "val_ema/acc1", "val/mask_iou", "val/corloc"} <= set(metrics)

    reloaded = ImageClassifier.load_from_checkpoint(path)
    images = next(iter(data.val_dataloader()))["image"]
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), model(images), rtol=0, atol=0)
        torch.testing.assert_close(reloaded.ema.module(images), model.ema.module(images), rtol=0, atol=0)


def test_bf16_mixed_precision_runs_on_cpu(tmp_path):
    model = ImageClassifier(*VIT, pool="simpool", pool_kwargs={"gamma": 1.25}, num_classes=4, warmup_epochs=0)
    t = trainer(tmp_path, precision="bf16-mixed", max_steps=2, limit_val_batches=1)
    t.fit(model, tiny_data())
    assert t.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_mixup_cutmix_and_each_optimizer_train(tmp_path):
    for opt in ("adamw", "sgd", "lamb", "lars"):
        model = ImageClassifier(
            *CNN, pool="gem", num_classes=4, optimizer=opt, lr=1e-3, mixup_alpha=0.2, cutmix_alpha=1.0,
            label_smoothing=0.1, warmup_epochs=0,
        )
        t = trainer(tmp_path, max_steps=2, limit_val_batches=0)
        t.fit(model, tiny_data())
        assert t.global_step == 2, opt


def test_schedule_warms_up_then_decays(tmp_path):
    model = ImageClassifier(*VIT, pool="avg", num_classes=4, lr=1e-2, warmup_lr=1e-4, min_lr=1e-3, warmup_epochs=1)
    lrs = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    t = trainer(tmp_path, max_epochs=4, limit_val_batches=0, callbacks=[Record()])
    t.fit(model, tiny_data())  # 4 steps per epoch: 4 warm-up steps, 12 cosine steps
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[4] == pytest.approx(1e-2)
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5]))
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    assert lrs[-1] == pytest.approx(1e-3 + 0.5 * 9e-3 * (1 + math.cos(math.pi * 11 / 12)))  # step 15 of 16


def test_nan_loss_stops_training_naming_the_step(tmp_path):
    model = ImageClassifier(*CNN, pool="avg", num_classes=4, warmup_epochs=0)
    data = tiny_data()

    class Poison(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == 1:
                batch["image"][:] = float("nan")

    with pytest.raises(FloatingPointError, match="at global step 1"):
        trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[Poison()]).fit(model, data)


class _RecordValidation(pl.Callback):
    """On every rank: the weights it validated, its images, and each input its val metrics got.

    Written to ``out_dir/rank<r>.pt`` when validation ends, so that the parent process can redo
    the metrics from what each rank produced.
    """

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir
        self.images: list[torch.Tensor] = []
        self.updates: dict[str, list[tuple]] = {}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for collection in (pl_module.val_metrics, pl_module.val_localization):
            for name, metric in collection.items():
                self.updates[name] = []
                metric.update = self._spy(name, metric.update)

    def _spy(self, name: str, update):
        def recorded(*args):
            self.updates[name].append(tuple(_detached(a) for a in args))
            return update(*args)

        return recorded

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.images.append(batch["image"].clone())

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = {k: v.clone() for k, v in pl_module.state_dict().items()}
        record = {"state": state, "images": torch.cat(self.images), "updates": self.updates}
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


def _detached(value):
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    return [v.detach().clone() for v in value]  # CorLoc's boxes: one (K, 4) tensor per image


def two_process_ddp_fit_and_validate_count_every_sample_once(tmp_dir: str) -> None:
    tmp_path = Path(tmp_dir)
    pl.seed_everything(0)
    model = ImageClassifier(*VIT, pool="simpool", num_classes=4, lr=2e-3, warmup_epochs=0)
    t = trainer(tmp_path, devices=2, strategy="ddp_fork", max_epochs=1, limit_val_batches=2)
    t.fit(model, tiny_data())
    ckpt = str(tmp_path / "ddp.ckpt")
    t.save_checkpoint(ckpt)

    # 41 validation images over 2 ranks in batches of 16: 21 and 20, an uneven last batch on each.
    data = tiny_data(val_size=41)
    model = ImageClassifier.load_from_checkpoint(ckpt)
    t = trainer(tmp_path, devices=2, strategy="ddp_fork", callbacks=[_RecordValidation(tmp_path)])
    synced = t.validate(model, data, verbose=False)[0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]

    # Every rank validated the checkpoint's weights, bit for bit.
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    for rank in ranks:
        assert rank["state"].keys() == saved.keys()
        assert all(torch.equal(rank["state"][k], saved[k]) for k in saved)

    # Together the ranks saw each validation image exactly once.
    data.setup("validate")
    expected = sorted(data.val_set[i]["image"].numpy().tobytes() for i in range(len(data.val_set)))
    seen = sorted(image.numpy().tobytes() for rank in ranks for image in rank["images"])
    assert [len(rank["images"]) for rank in ranks] == [21, 20]
    assert seen == expected

    # The synced metrics are the sums of what each rank's own metrics held, as the all-reduce
    # adds them: redone from the inputs each rank gave its metrics, they agree bit for bit, so no
    # sample was dropped, repeated or padded in. Thresholded attention maps may differ from a
    # one-process run's in a pixel (their float inputs depend on the batch composition), so that
    # comparison would not be exact; this one is, on any CPU.
    for key, metric in {**model.val_metrics, **model.val_localization}.items():
        parts = []
        for rank in ranks:
            part = metric.clone()
            part.reset()
            for args in rank["updates"][key]:
                part.update(*args)
            parts.append(part)
        assert sum(args[0].shape[0] for rank in ranks for args in rank["updates"][key]) == 41, key
        parts[0].merge_state(parts[1])
        assert parts[0].compute().item() == synced[key], key
    assert {"val/acc1", "val/mask_iou", "val/corloc"} <= set(synced)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_process_ddp_fit_and_validate_count_every_sample_once(tmp_path):
    run_isolated("tests.models.test_classifier:two_process_ddp_fit_and_validate_count_every_sample_once", str(tmp_path))


def test_num_classes_must_match_the_data(tmp_path):
    model = ImageClassifier(*CNN, pool="avg", num_classes=5)
    with pytest.raises(ValueError, match=r"model.num_classes \(5\) != the data's num_classes \(4\)"):
        trainer(tmp_path, max_steps=1).fit(model, tiny_data())


def test_python_api_test_and_predict(tmp_path):
    model = ImageClassifier(*VIT, pool="simpool", num_classes=4)
    t = trainer(tmp_path, limit_test_batches=1, limit_predict_batches=1)
    metrics = t.test(model, tiny_data(), verbose=False)[0]
    assert {"test/acc1", "test/mask_iou", "test/corloc"} <= set(metrics)
    (pred,) = t.predict(model, tiny_data())
    assert pred["topk_classes"].shape == (16, 4) and pred["attention"].shape == (16, 32, 32)
