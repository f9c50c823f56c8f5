"""Official checkpoints in and out: every layout built here from its official key names and shapes.

Each official state dict is assembled the way the authors' code names it (timm's model with the
fork's pool wrapper, read from billpsomas/simpool), with every parameter perturbed so that any
mix-up shows; the reference outputs come from the official formula (tests/reference) on the timm
model holding the same weights.
"""
from __future__ import annotations

import argparse
import pickle
import warnings
from pathlib import Path
from typing import Any, Optional

import pytest
import timm
import torch
from safetensors.torch import save_file as save_safetensors
from torch import Tensor, nn

from simpool_lightning.interop import CheckpointMismatchError, export_official, load_official
from simpool_lightning.models import ImageClassifier
from simpool_lightning.models.dino import DINO
from tests.reference.official_simpool import OfficialSimPool

NUM_CLASSES = 5
VIT = "vit_tiny_patch16_224"
VIT_KWARGS: dict[str, Any] = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
# batch mode reproduces the official batch-wide minimum of the gamma path at any batch size
BATCH_MIN = {"min_mode": "batch"}


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    """Move every parameter off its initial value (LayerNorm ones, zero biases ...), so mix-ups show."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return module.eval()


def _official_pool(dim: int, gamma: Optional[float], use_beta: bool = False, seed: int = 1) -> OfficialSimPool:
    return _perturb(OfficialSimPool(dim, gamma=gamma, use_beta=use_beta), seed)


def _with_prefix(prefix: str, module: nn.Module) -> dict[str, Tensor]:
    return {prefix + k: v for k, v in module.state_dict().items()}


def _images(batch: int = 3, size: int = 32) -> Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(7))


def _assert_same_state(written: dict[str, Tensor], original: dict[str, Tensor]) -> None:
    assert sorted(written) == sorted(original)
    for key, value in original.items():
        assert torch.equal(written[key], value), key


# ---------------------------------------------------------------------- official models, as the fork builds them


def _supervised_vit(gamma: Optional[float]) -> tuple[dict[str, Tensor], Any]:
    """vision_transformer.py with global_pool='simpool': no class token, gp.pool after norm, head."""
    vit = _perturb(timm.create_model(VIT, class_token=False, global_pool="", num_classes=NUM_CLASSES, **VIT_KWARGS), 0)
    pool = _official_pool(64, gamma)

    def forward(x: Tensor) -> Tensor:
        return vit.head(pool(vit.forward_features(x))[0])

    return {**vit.state_dict(), **_with_prefix("gp.pool.", pool)}, forward


def _supervised_resnet(gamma: Optional[float]) -> tuple[dict[str, Tensor], Any]:
    """resnet.py: global_pool = SelectAdaptivePool2d(pool_type='simpool'), then fc."""
    resnet = _perturb(timm.create_model("resnet18", num_classes=NUM_CLASSES), 0)
    pool = _official_pool(512, gamma)

    def forward(x: Tensor) -> Tensor:
        return resnet.fc(pool(resnet.forward_features(x))[0])

    return {**resnet.state_dict(), **_with_prefix("global_pool.pool.", pool)}, forward


def _supervised_convnext(gamma: Optional[float]) -> tuple[dict[str, Tensor], Any]:
    """convnext.py: head = (global_pool, norm, flatten, drop, fc); the norm follows the pool."""
    convnext = _perturb(timm.create_model("convnext_atto", num_classes=NUM_CLASSES), 0)
    pool = _official_pool(320, gamma)

    def forward(x: Tensor) -> Tensor:
        pooled = pool(convnext.forward_features(x))[0]
        return convnext.head.fc(convnext.head.norm(pooled[:, :, None, None]).flatten(1))

    return {**convnext.state_dict(), **_with_prefix("head.global_pool.pool.", pool)}, forward


# builder, timm name, what the weights cannot tell, the paper's gamma, image side (CNNs: a 2 x 2 map)
SUPERVISED = {
    "vit": (_supervised_vit, VIT, {"num_heads": 2}, 1.25, 32),
    "resnet": (_supervised_resnet, "resnet18", None, 2.0, 64),
    "convnext": (_supervised_convnext, "convnext_atto", None, 2.0, 64),
}


# ---------------------------------------------------------------------- supervised


# the mapping does not depend on gamma: "no gamma" only on the cheap ViT
@pytest.mark.parametrize("family,with_gamma", [("vit", True), ("vit", False), ("resnet", True), ("convnext", True)])
def test_supervised_loads_matches_official_and_exports_back(family: str, with_gamma: bool, tmp_path: Path) -> None:
    build, backbone, backbone_kwargs, gamma, size = SUPERVISED[family]
    gamma = gamma if with_gamma else None
    state, official_forward = build(gamma)
    path = tmp_path / "official.pth.tar"
    torch.save({"state_dict": state, "epoch": 9, "version": 2}, path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_official(
            path, backbone=backbone, backbone_kwargs=backbone_kwargs, pool_kwargs={"gamma": gamma, **BATCH_MIN}
        )
        export_official(model, tmp_path / "exported.pth.tar")
    assert isinstance(model, ImageClassifier) and not model.training
    assert model.hparams.pool == "simpool" and model.hparams.num_classes == NUM_CLASSES
    assert not caught

    written = torch.load(tmp_path / "exported.pth.tar", weights_only=True)
    assert set(written) == {"state_dict", "arch", "epoch", "version"} and written["arch"] == backbone
    _assert_same_state(written["state_dict"], state)

    x = _images(size=size)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(x), atol=1e-5, rtol=1e-4)


def test_default_min_mode_equals_official_at_batch_size_one(tmp_path: Path) -> None:
    state, official_forward = _supervised_vit(1.25)
    torch.save({"state_dict": state}, tmp_path / "vit.pth.tar")
    model = load_official(tmp_path / "vit.pth.tar", backbone=VIT, backbone_kwargs={"num_heads": 2}, pool_kwargs={"gamma": 1.25})
    x = _images(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(x), atol=1e-5, rtol=1e-4)


def test_ema_weights_load_and_export(tmp_path: Path) -> None:
    state, _ = _supervised_vit(None)
    ema_state = {k: v + 1 for k, v in state.items()}
    path = tmp_path / "ema.pth.tar"
    torch.save({"state_dict": state, "state_dict_ema": ema_state}, path)
    kwargs: dict[str, Any] = dict(backbone=VIT, backbone_kwargs={"num_heads": 2}, pool_kwargs={"gamma": None})

    from_ema = load_official(path, ema=True, **kwargs)
    torch.testing.assert_close(from_ema.net.head[1].weight, ema_state["head.weight"])
    torch.save({"state_dict": state}, tmp_path / "no_ema.pth.tar")
    with pytest.raises(ValueError, match="state_dict_ema"):
        load_official(tmp_path / "no_ema.pth.tar", ema=True, **kwargs)

    with_ema = load_official(path, ema_decay=0.999, **kwargs)
    torch.testing.assert_close(with_ema.net.head[1].weight, state["head.weight"])
    torch.testing.assert_close(with_ema.ema.module.head[1].weight, ema_state["head.weight"])
    export_official(with_ema, tmp_path / "out.pth.tar")
    written = torch.load(tmp_path / "out.pth.tar", weights_only=True)
    _assert_same_state(written["state_dict"], state)
    _assert_same_state(written["state_dict_ema"], ema_state)


# ---------------------------------------------------------------------- plain timm (default pooling)


@pytest.mark.parametrize(
    "name,kwargs,pool,filename",
    [(VIT, VIT_KWARGS, "token", "vit.pth"), ("resnet18", {}, "avg", "resnet.safetensors")],
    ids=["vit-cls-token", "resnet-gap"],
)
def test_plain_timm_loads_matches_timm_and_exports_back(
    name: str, kwargs: dict[str, Any], pool: str, filename: str, tmp_path: Path
) -> None:
    timm_model = _perturb(timm.create_model(name, num_classes=NUM_CLASSES, **kwargs), 0)
    state = timm_model.state_dict()
    if filename.endswith(".safetensors"):
        save_safetensors(state, tmp_path / filename)
    else:
        torch.save(state, tmp_path / filename)
    extra = {"backbone_kwargs": {"num_heads": kwargs["num_heads"]}} if "num_heads" in kwargs else {}
    model = load_official(tmp_path / filename, backbone=name, **extra)
    assert model.hparams.pool == pool
    x = _images(size=64 if pool == "avg" else 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_model(x), atol=1e-5, rtol=1e-4)
    export_official(model, tmp_path / "out.pth", kind="timm")
    _assert_same_state(torch.load(tmp_path / "out.pth", weights_only=True), state)


# ---------------------------------------------------------------------- errors


def test_wrong_keys_and_shapes_are_listed(tmp_path: Path) -> None:
    state, _ = _supervised_vit(None)
    state["gp.pool.wq_weight"] = state.pop("gp.pool.wq.weight")
    state["gp.pool.wk.weight"] = torch.zeros(64, 32)
    torch.save({"state_dict": state}, tmp_path / "bad.pth.tar")
    with pytest.raises(CheckpointMismatchError) as info:
        load_official(tmp_path / "bad.pth.tar", backbone=VIT, backbone_kwargs={"num_heads": 2}, pool_kwargs={"gamma": None})
    err = info.value
    assert err.missing == ["gp.pool.wq.weight"] and err.unexpected == ["gp.pool.wq_weight"]
    assert err.mismatched == [("gp.pool.wk.weight", (64, 32), (64, 64))]
    for key in ("gp.pool.wq.weight", "gp.pool.wq_weight", "gp.pool.wk.weight: (64, 32) vs (64, 64)"):
        assert key in str(err)


def test_pickled_args_need_the_opt_out(tmp_path: Path) -> None:
    state, official_forward = _supervised_vit(1.25)
    args = argparse.Namespace(model=VIT, gp="simpool", gamma=1.25, num_classes=NUM_CLASSES)
    path = tmp_path / "with_args.pth.tar"
    torch.save({"state_dict": state, "args": args, "epoch": 0}, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        load_official(path)
    # backbone and gamma come from the args; only the head count is not recorded anywhere
    model = load_official(path, weights_only=False, backbone_kwargs={"num_heads": 2})
    assert model.hparams.backbone == VIT and model.hparams.pool_kwargs["gamma"] == 1.25
    x = _images(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(x), atol=1e-5, rtol=1e-4)


def test_missing_architecture_or_gamma_is_asked_for(tmp_path: Path) -> None:
    state, _ = _supervised_vit(2.0)
    torch.save({"state_dict": state}, tmp_path / "v.pth.tar")
    with pytest.raises(ValueError, match="backbone="):
        load_official(tmp_path / "v.pth.tar", pool_kwargs={"gamma": 2.0})
    with pytest.raises(ValueError, match="gamma"):
        load_official(tmp_path / "v.pth.tar", backbone=VIT, backbone_kwargs={"num_heads": 2})
    with pytest.raises(ValueError, match="is a vit"):
        load_official(tmp_path / "v.pth.tar", backbone="convnext_atto", pool_kwargs={"gamma": 2.0})


@pytest.mark.parametrize(
    "pool,pool_kwargs,match",
    [("simpool", {"num_heads": 2}, "num_heads=2"), ("simpool", {"qkv_bias": True}, "qkv_bias"), ("gem", {}, "pools with")],
)
def test_export_refuses_what_the_official_code_cannot_express(pool: str, pool_kwargs: dict[str, Any], match: str, tmp_path: Path) -> None:
    model = ImageClassifier(VIT, VIT_KWARGS, pool=pool, pool_kwargs=pool_kwargs, num_classes=NUM_CLASSES)
    with pytest.raises(ValueError, match=match):
        export_official(model, tmp_path / "x.pth.tar")


# ---------------------------------------------------------------------- DINO (ViT)


class _OfficialDINOHead(nn.Module):
    """self_supervised/vision_transformer.py DINOHead: MLP, L2 norm, nn.utils.weight_norm (weight_g, weight_v)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the old weight_norm is what the official code used
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(nn.functional.normalize(self.mlp(x), dim=-1))


DINO_HEAD = dict(out_dim=32, hidden_dim=48, bottleneck_dim=16)


def _official_dino_vit(seed: int) -> tuple[dict[str, Tensor], Any, Any]:
    """vision_transformer.py (mode 'simpool'): no class token; blocks -> simpool (use_beta) -> norm; DINOHead."""
    vit = _perturb(timm.create_model(VIT, class_token=False, global_pool="", num_classes=0, **VIT_KWARGS), seed)
    pool = _official_pool(64, 1.25, use_beta=True, seed=seed + 1)
    head = _perturb(_OfficialDINOHead(64, **DINO_HEAD), seed + 2)
    backbone_state = {**vit.state_dict(), **_with_prefix("simpool.", pool)}
    norm, vit.norm = vit.norm, nn.Identity()

    def features(x: Tensor) -> Tensor:
        return norm(pool(vit.forward_features(x))[0])

    state = {**{"backbone." + k: v for k, v in backbone_state.items()}, **_with_prefix("head.", head)}
    return state, features, lambda x: head(features(x))


def test_dino_vit_loads_matches_official_and_exports_back(tmp_path: Path) -> None:
    student, _, student_forward = _official_dino_vit(seed=0)
    teacher, teacher_features, teacher_forward = _official_dino_vit(seed=10)
    center = torch.randn(1, DINO_HEAD["out_dim"])
    args = argparse.Namespace(arch="vit_tiny", mode="simpool", gamma=1.25, patch_size=8, out_dim=DINO_HEAD["out_dim"],
                              use_bn_in_head=False, norm_last_layer=False, momentum_teacher=0.996, lr=5e-4)
    official = {
        "student": {"module." + k: v for k, v in student.items()},  # DDP
        "teacher": teacher,  # no batch norm: main_dino leaves the teacher unwrapped
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": 3,
        "args": args,
        "dino_loss": {"center": center},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(official, path)
    with pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        load_official(path)

    model = load_official(path, weights_only=False, backbone_kwargs={"num_heads": 2}, pool_kwargs={"gamma": 1.25, **BATCH_MIN})
    assert isinstance(model, DINO) and not model.training
    hp = model.hparams
    assert (hp.backbone, hp.pool, hp.placement, hp.out_dim, hp.head_hidden_dim, hp.head_bottleneck_dim) == (
        "vit_tiny_patch16_224", "simpool", "before_norm", 32, 48, 16
    )
    assert hp.norm_last_layer is False and hp.pool_kwargs["use_beta"] is True
    torch.testing.assert_close(model.criterion.center, center)
    x = _images()
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), teacher_features(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.teacher([x]), teacher_forward(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(model.student([x]), student_forward(x), atol=1e-5, rtol=1e-4)

    with pytest.warns(UserWarning, match="DINOHead"):  # the test's head is smaller than main_dino's
        export_official(model, tmp_path / "exported.pth")
    written = torch.load(tmp_path / "exported.pth", weights_only=True)
    assert set(written) == set(official)
    _assert_same_state(written["student"], official["student"])
    _assert_same_state(written["teacher"], official["teacher"])
    _assert_same_state(written["dino_loss"], official["dino_loss"])
    assert written["args"]["gamma"] == 1.25 and written["args"]["patch_size"] == 8


def test_dino_export_refuses_an_inexpressible_pool(tmp_path: Path) -> None:
    model = DINO(VIT, VIT_KWARGS, pool="simpool", pool_kwargs={"gamma": 1.25}, out_dim=8, head_hidden_dim=8, head_bottleneck_dim=8)
    with pytest.raises(ValueError, match="use_beta"):  # the official DINO ViT adds beta whenever it has a gamma
        export_official(model, tmp_path / "x.pth")
