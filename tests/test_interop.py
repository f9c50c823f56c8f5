"""Official checkpoints in and out: every layout built here from its official key names and shapes.

Supervised: each official state dict is assembled the way the authors' timm fork names it (timm's
model with the fork's pool wrapper), and the reference outputs come from the official SimPool
formula (tests/reference/official_simpool.py) on the timm model holding the same weights.
DINO: the fork's own networks, re-implemented in tests/reference/official_dino.py (ViT with its
position-embedding resampling, torchvision's ResNet, the ConvNeXt repo's ConvNeXt, DINOHead),
build the checkpoint main_dino.py saves and compute the reference outputs. Every parameter and
batch-norm statistic is perturbed so that any mix-up shows.
"""
from __future__ import annotations

import argparse
import math
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
from simpool_lightning.models import ImageClassifier, PooledBackbone
from simpool_lightning.models.dino import DINO
from tests.reference.official_dino import OfficialViT, main_dino_checkpoint, main_dino_networks
from tests.reference.official_simpool import OfficialSimPool

NUM_CLASSES = 5
VIT = "vit_tiny_patch16_224"
VIT_KWARGS: dict[str, Any] = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)
# batch mode reproduces the official batch-wide minimum of the gamma path at any batch size
BATCH_MIN = {"min_mode": "batch"}


def _perturb(module: nn.Module, seed: int) -> nn.Module:
    """Move every parameter and batch-norm statistic off its initial value (LayerNorm ones, zero biases ...).

    Matrices and kernels move by half their fan-in scale (``0.5 / sqrt(fan_in)``), as trained
    weights stay near it: larger, and a wide SimPool's attention logits reach the hundreds, where
    float32 rounding alone moves the output by 1e-4 in any implementation. Vectors and tables
    (norms, biases, position embeddings, tokens) move by 0.1.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            scale = 0.5 / math.sqrt(p[0].numel()) if p.dim() >= 2 and p.shape[0] > 1 else 0.1
            p.add_(torch.randn(p.shape, generator=gen) * scale)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.add_(torch.randn(b.shape, generator=gen) * 0.1)
            elif name.endswith("running_var"):
                b.mul_(torch.rand(b.shape, generator=gen) + 0.5)
    return module.eval()


def _seeded(seed: int, factory: Any, *args: Any, **kwargs: Any) -> Any:
    """``factory(*args, **kwargs)`` with the global RNG seeded (initialisation), its state restored after."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return factory(*args, **kwargs)


def _official_pool(dim: int, gamma: Optional[float], use_beta: bool = False, seed: int = 1) -> OfficialSimPool:
    return _perturb(_seeded(seed, OfficialSimPool, dim, gamma=gamma, use_beta=use_beta), seed)


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
    vit = _perturb(_seeded(0, timm.create_model, VIT, class_token=False, global_pool="", num_classes=NUM_CLASSES, **VIT_KWARGS), 0)
    pool = _official_pool(64, gamma)

    def forward(x: Tensor) -> Tensor:
        return vit.head(pool(vit.forward_features(x))[0])

    return {**vit.state_dict(), **_with_prefix("gp.pool.", pool)}, forward


def _supervised_resnet(gamma: Optional[float], name: str = "resnet18", **sizes: Any) -> tuple[dict[str, Tensor], Any]:
    """resnet.py: global_pool = SelectAdaptivePool2d(pool_type='simpool'), then fc."""
    resnet = _perturb(_seeded(0, timm.create_model, name, num_classes=NUM_CLASSES, **sizes), 0)
    pool = _official_pool(resnet.num_features, gamma)

    def forward(x: Tensor) -> Tensor:
        return resnet.fc(pool(resnet.forward_features(x))[0])

    return {**resnet.state_dict(), **_with_prefix("global_pool.pool.", pool)}, forward


def _supervised_convnext(gamma: Optional[float], name: str = "convnext_atto", **sizes: Any) -> tuple[dict[str, Tensor], Any]:
    """convnext.py: head = (global_pool, norm, flatten, drop, fc); the norm follows the pool."""
    convnext = _perturb(_seeded(0, timm.create_model, name, num_classes=NUM_CLASSES, **sizes), 0)
    pool = _official_pool(convnext.num_features, gamma)

    def forward(x: Tensor) -> Tensor:
        pooled = pool(convnext.forward_features(x))[0]
        return convnext.head.fc(convnext.head.norm(pooled[:, :, None, None]).flatten(1))

    return {**convnext.state_dict(), **_with_prefix("head.global_pool.pool.", pool)}, forward


# The released architectures (ViT-S, ResNet-50, ConvNeXt-S) at test sizes: fewer blocks, narrower.
RESNET50_SIZES: dict[str, Any] = dict(layers=(1, 1, 1, 1), base_width=16)  # timm's names
RESNET50_REFERENCE: dict[str, Any] = dict(layers=(1, 1, 1, 1), width_per_group=16)  # torchvision's
CONVNEXT_S_SIZES: dict[str, Any] = dict(depths=(1, 1, 2, 1), dims=(16, 24, 32, 48))

# builder, timm name, backbone_kwargs (sizes the weights do not tell to ImageClassifier), the paper's
# gamma, image side (CNNs: a 2 x 2 map)
SUPERVISED = {
    "vit_small": (_supervised_vit, VIT, {"num_heads": 2}, 1.25, 32),
    "resnet50": (lambda g: _supervised_resnet(g, "resnet50", **RESNET50_SIZES), "resnet50", RESNET50_SIZES, 2.0, 64),
    "convnext_small": (
        lambda g: _supervised_convnext(g, "convnext_small", **CONVNEXT_S_SIZES), "convnext_small", CONVNEXT_S_SIZES, 2.0, 64
    ),
}


# ---------------------------------------------------------------------- supervised


@pytest.mark.parametrize("with_gamma", [True, False], ids=["gamma", "no-gamma"])
@pytest.mark.parametrize("family", sorted(SUPERVISED))
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
        torch.testing.assert_close(model(x), official_forward(x), atol=1e-5, rtol=1e-5)


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
    timm_model = _perturb(_seeded(0, timm.create_model, name, num_classes=NUM_CLASSES, **kwargs), 0)
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


class _NotAllowed:
    """A class of this test module: nothing weights_only=True may rebuild."""


def test_namespace_args_load_with_weights_only_and_other_objects_are_refused(tmp_path: Path) -> None:
    state, official_forward = _supervised_vit(1.25)
    args = argparse.Namespace(model=VIT, gp="simpool", gamma=1.25, num_classes=NUM_CLASSES)
    path = tmp_path / "with_args.pth.tar"
    torch.save({"state_dict": state, "args": args, "epoch": 0}, path)
    # backbone and gamma come from the Namespace; only the head count is not recorded anywhere
    model = load_official(path, backbone_kwargs={"num_heads": 2})
    assert model.hparams.backbone == VIT and model.hparams.pool_kwargs["gamma"] == 1.25
    x = _images(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), official_forward(x), atol=1e-5, rtol=1e-5)

    # anything else is refused, naming the opt-out, by load_official and by pretrained_path
    torch.save({"state_dict": state, "args": args, "extra": _NotAllowed()}, tmp_path / "other.pth.tar")
    with pytest.raises(pickle.UnpicklingError, match="weights_only=False"):
        load_official(tmp_path / "other.pth.tar", backbone_kwargs={"num_heads": 2})
    with pytest.raises(pickle.UnpicklingError, match="pretrained_weights_only=False"):
        ImageClassifier(VIT, VIT_KWARGS, pool_kwargs={"gamma": 1.25}, pretrained_path=str(tmp_path / "other.pth.tar"))
    trusted = load_official(tmp_path / "other.pth.tar", weights_only=False, backbone_kwargs={"num_heads": 2})
    torch.testing.assert_close(trusted.net.head[1].weight, state["head.weight"])


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


# ---------------------------------------------------------------------- DINO: the fork's networks

DINO_HEAD = dict(out_dim=32, hidden_dim=48, bottleneck_dim=16)
VIT_SIZES = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)

# family, the fork's --arch, --mode, --gamma, the reference's sizes, backbone_kwargs the weights do
# not tell, image side (the training resolution of the ViT's table; CNNs: a 2 x 2 map)
DINO_KINDS: dict[str, tuple[str, str, str, Optional[float], dict[str, Any], dict[str, Any], int]] = {
    "vit-simpool": ("vit", "vit_small", "simpool", 1.25, VIT_SIZES, {"num_heads": 2}, 32),
    "vit-official": ("vit", "vit_small", "official", 1.25, VIT_SIZES, {"num_heads": 2}, 32),
    "resnet50-simpool": ("resnet", "resnet50", "simpool", 2.0, RESNET50_REFERENCE, {}, 64),
    "resnet50-official": ("resnet", "resnet50", "official", 2.0, RESNET50_REFERENCE, {}, 64),
    "convnext_small-simpool": ("convnext", "convnext_small", "simpool", 2.0, CONVNEXT_S_SIZES, {}, 64),
    "convnext_small-official": ("convnext", "convnext_small", "official", 2.0, CONVNEXT_S_SIZES, {}, 64),
    # the released "no gamma" runs (--gamma None): the mean path, and no beta anywhere
    "convnext_small-simpool-nogamma": ("convnext", "convnext_small", "simpool", None, CONVNEXT_S_SIZES, {}, 64),
}


def _official_dino(kind: str, seed: int = 0) -> tuple[dict[str, Any], nn.Module, nn.Module]:
    """``(checkpoint.pth as main_dino saves it, student, teacher)`` of the fork's networks for ``kind``.

    The ResNet recipe has BatchNorm in the head (``--use_bn_in_head True``), so main_dino wraps
    the teacher in DDP too (``module.``); the ViT and ConvNeXt recipes have none.
    """
    family, arch, mode, gamma, sizes, _, _ = DINO_KINDS[kind]
    use_bn = family == "resnet"
    with torch.random.fork_rng():  # the modules' own initialisation, before the perturbation, is seeded too
        torch.manual_seed(seed)
        student, teacher = main_dino_networks(family, mode, gamma, dict(DINO_HEAD, use_bn=use_bn), **sizes)
    _perturb(student, seed)
    _perturb(teacher, seed + 10)
    args = argparse.Namespace(
        arch=arch, mode=mode, gamma=gamma, patch_size=VIT_SIZES["patch_size"], out_dim=DINO_HEAD["out_dim"],
        use_bn_in_head=use_bn, norm_last_layer=False, momentum_teacher=0.996, drop_path_rate=0.1, lr=5e-4,
        global_crops_scale=(0.25, 1.0), nb_knn=[10, 20, 100, 200],
    )
    center = torch.randn(1, DINO_HEAD["out_dim"], generator=torch.Generator().manual_seed(seed))
    return main_dino_checkpoint(student, teacher, args, center, epoch=3), student, teacher


def _load_dino_kind(path: Path, kind: str, **extra: Any) -> DINO:
    _, _, mode, _, _, backbone_kwargs, _ = DINO_KINDS[kind]
    kwargs: dict[str, Any] = dict(backbone_kwargs={**backbone_kwargs}, **extra)
    if mode == "simpool":
        kwargs["pool_kwargs"] = {**kwargs.get("pool_kwargs", {}), **BATCH_MIN}
    model = load_official(path, **kwargs)
    assert isinstance(model, DINO) and not model.training
    return model


@pytest.mark.parametrize("kind", list(DINO_KINDS))
def test_dino_loads_matches_official_and_exports_back(kind: str, tmp_path: Path) -> None:
    family, arch, mode, gamma, _, _, size = DINO_KINDS[kind]
    official, student, teacher = _official_dino(kind)
    path = tmp_path / "checkpoint.pth"
    torch.save(official, path)  # its args are an argparse.Namespace: read with the default weights_only=True

    model = _load_dino_kind(path, kind)
    hp = model.hparams
    assert hp.pool == ("simpool" if mode == "simpool" else "token" if family == "vit" else "avg")
    assert (hp.out_dim, hp.head_hidden_dim, hp.head_bottleneck_dim, hp.use_bn_in_head) == (32, 48, 16, family == "resnet")
    if mode == "simpool":
        assert hp.pool_kwargs["gamma"] == gamma and hp.pool_kwargs["use_beta"] == (family == "vit")
    torch.testing.assert_close(model.criterion.center, official["dino_loss"]["center"], atol=0, rtol=0)
    x = _images(size=size)
    with torch.no_grad():
        torch.testing.assert_close(model.features(x), teacher.backbone(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.teacher([x]), teacher([x]), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.student([x]), student([x]), atol=1e-5, rtol=1e-5)

    with pytest.warns(UserWarning, match="DINOHead"):  # the test's head is smaller than main_dino's
        export_official(model, tmp_path / "exported.pth")
    written = torch.load(tmp_path / "exported.pth", weights_only=True)
    assert set(written) == set(official)
    for network in ("student", "teacher", "dino_loss"):
        _assert_same_state(written[network], official[network])
    assert written["args"]["mode"] == mode and written["args"]["gamma"] == (gamma if mode == "simpool" else None)


def test_dino_vit_simpool_position_embedding_is_resampled_once_at_import(tmp_path: Path) -> None:
    """The fork's SimPool-mode forward resamples its table at every forward; the imported table is that resampling."""
    official, _, teacher = _official_dino("vit-simpool")
    torch.save(official, tmp_path / "checkpoint.pth")
    model = _load_dino_kind(tmp_path / "checkpoint.pth", "vit-simpool")
    stored = official["teacher"]["backbone.pos_embed"]
    imported = model.teacher.backbone.model.pos_embed.detach().clone()
    x = _images()
    with torch.no_grad():
        # the reference adds exactly the imported table at the training resolution
        tokens = teacher.backbone.patch_embed(x)
        torch.testing.assert_close(teacher.backbone.interpolate_pos_encoding(tokens, 32, 32), imported, atol=0, rtol=0)
        assert not torch.equal(imported, stored)
        # the table as stored would not give the authors' features
        as_stored = OfficialViT("simpool", 1.25, **VIT_SIZES)
        as_stored.load_state_dict({k[len("backbone.") :]: v for k, v in official["teacher"].items() if k.startswith("backbone.")})
        model.teacher.backbone.model.pos_embed.copy_(stored)
        assert (model.features(x) - teacher.backbone(x)).abs().max() > 1e-4

    # a trained table (no longer the import's) exports as the solve: the fork's forward resamples it back
    with torch.no_grad():
        model.teacher.backbone.model.pos_embed.copy_(imported + 0.01)
    with pytest.warns(UserWarning, match="DINOHead"):
        export_official(model, tmp_path / "trained.pth")
    reread = torch.load(tmp_path / "trained.pth", weights_only=True)["teacher"]["backbone.pos_embed"]
    as_stored.pos_embed.data.copy_(reread)
    with torch.no_grad():
        resampled = as_stored.interpolate_pos_encoding(as_stored.patch_embed(x), 32, 32)
    torch.testing.assert_close(resampled, imported + 0.01, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["vit-simpool", "resnet50-simpool", "convnext_small-simpool", "convnext_small-official"])
def test_dino_backbone_only_files_give_the_full_checkpoints_features(kind: str, tmp_path: Path) -> None:
    family, arch, mode, gamma, sizes, backbone_kwargs, size = DINO_KINDS[kind]
    official, _, _ = _official_dino(kind)
    torch.save(official, tmp_path / "checkpoint.pth")
    full = _load_dino_kind(tmp_path / "checkpoint.pth", kind)
    teacher = {k.removeprefix("module."): v for k, v in official["teacher"].items()}
    backbone = {k[len("backbone.") :]: v for k, v in teacher.items() if k.startswith("backbone.")}
    # DINO's *_pretrain.pth: the teacher's backbone alone, no args; and a teacher stripped of its head
    torch.save(backbone, tmp_path / "pretrain.pth")
    torch.save({"teacher": {"module.backbone." + k: v for k, v in backbone.items()}}, tmp_path / "stripped.pth")
    told = dict(backbone=timm_name_of(arch))
    if mode == "simpool":
        told["pool_kwargs"] = {"gamma": gamma}
    x = _images(size=size)
    with torch.no_grad():
        expected = full.features(x)
        for name in ("pretrain.pth", "stripped.pth"):
            cut = _load_dino_kind(tmp_path / name, kind, **told)
            torch.testing.assert_close(cut.features(x), expected, atol=0, rtol=0)
            torch.testing.assert_close(cut.student.backbone(x), expected, atol=0, rtol=0)

        # fine-tuning and evaluation start from the same file through pretrained_path
        pool_kwargs = {"gamma": gamma, "use_beta": family == "vit", **BATCH_MIN} if mode == "simpool" else None
        placement = "before_norm" if family == "vit" and mode == "simpool" else "after_norm"
        pool = "simpool" if mode == "simpool" else "avg"
        model_kwargs = {"vit": VIT_KWARGS, "resnet": RESNET50_SIZES, "convnext": CONVNEXT_S_SIZES}[family]
        for name in ("pretrain.pth", "checkpoint.pth"):
            tuned = PooledBackbone(
                timm_name_of(arch), pool, pool_kwargs, placement, pretrained_path=str(tmp_path / name), **model_kwargs
            ).eval()
            torch.testing.assert_close(tuned(x), expected, atol=0, rtol=0)


def timm_name_of(arch: str) -> str:
    """timm's name for the fork's --arch (its ViTs are vit_<size> with the patch size from the weights)."""
    return VIT if arch.startswith("vit") else arch


# The builder tests/weights and tests/models share: a SimPool-mode DINO ViT network of the fork.
def _official_dino_vit(seed: int) -> tuple[dict[str, Tensor], Any, Any]:
    """``(network state, features, forward)`` of the fork's SimPool-mode ViT (gamma 1.25) with its DINOHead."""
    student, _ = _seeded(seed, main_dino_networks, "vit", "simpool", 1.25, DINO_HEAD, **VIT_SIZES)
    _perturb(student, seed)
    return dict(student.state_dict()), student.backbone, student


def test_dino_export_refuses_an_inexpressible_pool(tmp_path: Path) -> None:
    model = DINO(VIT, VIT_KWARGS, pool="simpool", pool_kwargs={"gamma": 1.25}, out_dim=8, head_hidden_dim=8, head_bottleneck_dim=8)
    with pytest.raises(ValueError, match="use_beta"):  # the official DINO ViT adds beta whenever it has a gamma
        export_official(model, tmp_path / "x.pth")
    model = DINO("resnet18", pool="gem", out_dim=8, head_hidden_dim=8, head_bottleneck_dim=8)
    with pytest.raises(ValueError, match="'simpool' or 'avg'"):
        export_official(model, tmp_path / "x.pth")
