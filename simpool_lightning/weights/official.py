"""Official SimPool checkpoints (the authors' repository, billpsomas/simpool) under our names.

Each official layout maps name by name onto our modules; no tensor is reshaped or converted.
Everything here is a pure function on dicts: reading a file never builds a model.

``supervised``: the authors' timm fork (``supervised/train.py``). timm's ``CheckpointSaver``
writes a ``.pth.tar`` dict with ``state_dict`` (and ``state_dict_ema`` with ``--model-ema``),
``epoch``, ``version`` and ``arch``. Names are timm's; SimPool sits inside timm's
``SelectAdaptivePool2d`` as its ``.pool``:

- ViT (``vision_transformer.py``): SimPool ``gp.pool.*`` on the tokens after ``norm``, no
  ``cls_token``; classifier ``head.*``.
- ResNet (``resnet.py``): SimPool ``global_pool.pool.*``; classifier ``fc.*``.
- ConvNeXt (``convnext.py``): SimPool ``head.global_pool.pool.*``, then ``head.norm`` (a
  LayerNorm of the pooled vector); classifier ``head.fc.*``.

Ours (``ImageClassifier.net``): ``backbone.model.<name>`` <-> ``<name>``; ``backbone.pool.*`` <->
the SimPool prefix; ``head.1.*`` <-> the classifier (``head.0`` is the dropout).

``timm``: a bare timm state dict (``.pth`` or ``.safetensors``) with the same names: the
default-pooling baselines, a ViT's [CLS] token (``pool="token"``) or a CNN's average (``"avg"``).

``dino``: the authors' DINO fork (``self_supervised/main_dino.py``), ViT only: a dict with
``student``, ``teacher``, ``optimizer``, ``epoch``, ``args`` and ``dino_loss`` (the center).
Student keys are ``module.backbone.*`` / ``module.head.*`` (DDP); the teacher carries ``module.``
only when the network has batch norms (only then does main_dino wrap it in DDP). The ViT
(``vision_transformer.py``, mode ``simpool``) has no ``cls_token`` and pools the tokens with
``backbone.simpool.*`` (``use_beta=True``) before ``backbone.norm``; the head is DINOHead with
the old ``nn.utils.weight_norm`` (``head.last_layer.weight_g`` / ``weight_v``). Ours: DINO's
``student`` / ``teacher`` (MultiCropNet) with ``backbone.model.*`` <-> ``backbone.*``,
``backbone.pool.*`` <-> ``backbone.simpool.*``, ``backbone.final_norm.*`` <-> ``backbone.norm.*``,
``head.last_layer.parametrizations.weight.original0/1`` <-> ``head.last_layer.weight_g/v``, and
``criterion.center`` <-> ``dino_loss.center``.

Official SimPool hyper-parameters live in code, not in the weights: ``gamma`` (a constructor
argument; ``--gamma`` of the training scripts), one head, no ``qkv_bias``, and the minimum of
the gamma path taken over the whole batch (ours: ``min_mode="batch"``; the default ``"sample"``
equals it at batch size 1).
"""
from __future__ import annotations

import argparse
import math
import re
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional

from torch import Tensor

from .io import StateDict, strip_prefix

__all__ = [
    "DINO_ARGS",
    "KINDS",
    "Kind",
    "OFFICIAL_DINO_HEAD",
    "OfficialCheckpoint",
    "Rules",
    "SUPERVISED_LAYOUTS",
    "TOKEN_POOL",
    "classifier_kwargs",
    "classifier_rules",
    "detect_kind",
    "dino_kwargs",
    "dino_rules",
    "family_of_keys",
    "from_official",
    "parse_official",
    "to_official",
]

Kind = Literal["supervised", "timm", "dino"]
KINDS: tuple[str, ...] = ("supervised", "timm", "dino")
TOKEN_POOL = "token"  # a ViT's own [CLS] token, as PooledBackbone names it

Rules = tuple[tuple[str, str], ...]  # (our prefix, official prefix)


# ---------------------------------------------------------------------- renaming


def _rename(key: str, rules: Rules, src: int) -> str:
    """``key`` under the other naming: the rule whose ``src`` prefix is the longest match wins."""
    best = max((r for r in rules if key.startswith(r[src])), key=lambda r: len(r[src]), default=None)
    if best is None:
        side = "our parameter" if src == 0 else "official key"
        raise ValueError(f"{side} {key!r} has no counterpart in the {'official' if src == 0 else 'our'} layout")
    return best[1 - src] + key[len(best[src]) :]


def to_official(state: Mapping[str, Tensor], rules: Rules) -> StateDict:
    """Our names -> the official ones, tensors detached onto the CPU."""
    return {_rename(k, rules, 0): v.detach().cpu() for k, v in state.items()}


def from_official(state: Mapping[str, Tensor], rules: Rules) -> StateDict:
    """Official names -> ours (the inverse of :func:`to_official`)."""
    return {_rename(k, rules, 1): v for k, v in state.items()}


@dataclass(frozen=True)
class _Layout:
    """Where a supervised model keeps its pool and classifier (official prefixes)."""

    pool: str
    head: str
    extra: Rules = ()

    def rules(self) -> Rules:
        # Keys relative to ImageClassifier.net; the timm model's own names pass through unchanged.
        return (("backbone.pool.", self.pool), ("head.1.", self.head), *self.extra, ("backbone.model.", ""))


SUPERVISED_LAYOUTS: dict[str, _Layout] = {
    # vision_transformer.py: self.gp = SelectAdaptivePool2d(...); self.head = nn.Linear(...)
    "vit": _Layout(pool="gp.pool.", head="head."),
    # resnet.py: self.global_pool, self.fc = create_classifier(...)
    "resnet": _Layout(pool="global_pool.pool.", head="fc."),
    # convnext.py: self.head = Sequential(global_pool, norm, flatten, drop, fc). Our backbone applies
    # timm's head.norm after the pool as backbone.final_norm.
    "convnext": _Layout(pool="head.global_pool.pool.", head="head.fc.", extra=(("backbone.final_norm.", "head.norm."),)),
}


def classifier_rules(family: str) -> Rules:
    """Rules between ``ImageClassifier.net`` and a supervised checkpoint of ``family``."""
    return SUPERVISED_LAYOUTS[family].rules()


def dino_rules(simpool: bool) -> Rules:
    """Rules between DINO's ``MultiCropNet`` and the DINO fork's ViT (mode ``simpool`` or ``official``)."""
    backbone: Rules = (
        (("backbone.pool.", "backbone.simpool."), ("backbone.final_norm.", "backbone.norm.")) if simpool else ()
    )
    return (
        *backbone,
        ("backbone.model.", "backbone."),
        # The official head uses the old nn.utils.weight_norm (weight_g, weight_v); ours the parametrization.
        ("head.last_layer.parametrizations.weight.original0", "head.last_layer.weight_g"),
        ("head.last_layer.parametrizations.weight.original1", "head.last_layer.weight_v"),
        ("head.", "head."),
    )


# ---------------------------------------------------------------------- what a file holds


def detect_kind(checkpoint: Any) -> str:
    """``"dino"``, ``"supervised"`` or ``"timm"`` from a checkpoint's entries."""
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    if "student" in checkpoint or "teacher" in checkpoint:
        return "dino"
    if "state_dict" in checkpoint or "state_dict_ema" in checkpoint:
        return "supervised"
    return "timm"


def family_of_keys(state: Mapping[str, Tensor]) -> str:
    """``"vit"``, ``"resnet"`` or ``"convnext"`` from timm parameter names."""
    if "patch_embed.proj.weight" in state:
        return "vit"
    if any(k.startswith("layer1.") for k in state) and any(k.startswith("layer4.") for k in state):
        return "resnet"
    if "stem.0.weight" in state and any(k.startswith("stages.") for k in state):
        return "convnext"
    raise ValueError(
        "cannot tell the architecture from the keys: expected a timm ViT (patch_embed.proj.weight), "
        f"ResNet (layer1.* .. layer4.*) or ConvNeXt (stem.0.weight, stages.*); first keys: {list(state)[:8]}"
    )


def _args_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def _supervised_states(checkpoint: Mapping[str, Any]) -> tuple[Optional[StateDict], Optional[StateDict]]:
    """``(state_dict, state_dict_ema)`` of a supervised or bare timm checkpoint, ``module.`` dropped."""
    if "state_dict" in checkpoint or "state_dict_ema" in checkpoint:
        state, ema_state = checkpoint.get("state_dict"), checkpoint.get("state_dict_ema")
    elif "model" in checkpoint and isinstance(checkpoint["model"], Mapping):  # DeiT-style files
        state, ema_state = checkpoint["model"], None
    else:
        state, ema_state = checkpoint, None
    for entry in (state, ema_state):
        bad = [k for k, v in (entry or {}).items() if not isinstance(v, Tensor)]
        if bad:
            raise ValueError(f"not a state dict: entries {bad[:5]} are not tensors")
    return (None if state is None else strip_prefix(state, "module."), None if ema_state is None else strip_prefix(ema_state, "module."))


@dataclass(frozen=True)
class OfficialCheckpoint:
    """An official file's weights (official names) and training args.

    Attributes:
        kind: ``"supervised"``, ``"timm"`` or ``"dino"``.
        args: the recorded training args (empty when the file has none).
        state: supervised / timm: the model's ``state_dict`` (``None`` when the file holds only an EMA).
        ema_state: supervised: ``state_dict_ema``, where present.
        student, teacher: DINO: the two networks, ``module.`` dropped.
        center: DINO: the loss's center, where saved.
    """

    kind: str
    args: dict[str, Any] = field(default_factory=dict)
    state: Optional[StateDict] = None
    ema_state: Optional[StateDict] = None
    student: Optional[StateDict] = None
    teacher: Optional[StateDict] = None
    center: Optional[Tensor] = None


def parse_official(checkpoint: Any, kind: Optional[str] = None) -> OfficialCheckpoint:
    """Split what ``torch.load`` returned for an official file into an :class:`OfficialCheckpoint`.

    Args:
        checkpoint: the loaded object.
        kind: ``"supervised"``, ``"timm"`` or ``"dino"``; ``None`` tells them apart by the entries.
    """
    detected = detect_kind(checkpoint)
    kind = kind or detected
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (kind == "dino") != (detected == "dino"):
        raise ValueError(f"kind={kind!r}, but the file looks like a {detected!r} checkpoint (entries: {list(checkpoint)[:10]})")
    args = _args_dict(checkpoint)
    if kind == "dino":
        missing = [k for k in ("student", "teacher") if k not in checkpoint]
        if missing:
            raise ValueError(f"a DINO checkpoint needs 'student' and 'teacher'; missing {missing}")
        center = (checkpoint.get("dino_loss") or {}).get("center")
        return OfficialCheckpoint(
            kind, args, student=strip_prefix(checkpoint["student"], "module."),
            teacher=strip_prefix(checkpoint["teacher"], "module."), center=center,
        )
    state, ema_state = _supervised_states(checkpoint)
    return OfficialCheckpoint(kind, args, state=state, ema_state=ema_state)


# ---------------------------------------------------------------------- what the weights tell


def _vit_kwargs(state: Mapping[str, Tensor]) -> dict[str, Any]:
    """ViT sizes read from the weights (the head count is not among them)."""
    proj = state["patch_embed.proj.weight"]  # (D, 3, p, p)
    embed_dim, patch = proj.shape[0], proj.shape[-1]
    depth = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    out: dict[str, Any] = dict(
        embed_dim=embed_dim, depth=depth, patch_size=patch, qkv_bias="blocks.0.attn.qkv.bias" in state
    )
    if "blocks.0.mlp.fc1.weight" in state:
        out["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim
    num_patches = state["pos_embed"].shape[1] - (1 if "cls_token" in state else 0)
    side = math.isqrt(num_patches)
    if side * side == num_patches:  # a square grid: the image side follows
        out["img_size"] = side * patch
    return out


def _simpool_kwargs(
    state: Mapping[str, Tensor], prefix: str, given: Optional[Mapping[str, Any]], args: Mapping[str, Any]
) -> dict[str, Any]:
    """``pool_kwargs`` for SimPool: bias and beta from the keys, gamma from the caller or the args."""
    kwargs = dict(given or {})
    kwargs.setdefault("qkv_bias", prefix + "wq.bias" in state)
    kwargs.setdefault("use_beta", prefix + "beta" in state)
    if "gamma" not in kwargs:
        if "gamma" not in args:
            raise ValueError(
                "SimPool's gamma is a constructor argument, not a weight, and this checkpoint carries no training "
                "args to read it from: pass pool_kwargs={'gamma': ...} as the model was trained (the paper: 1.25 "
                "for transformers, 2.0 for CNNs; None for 'no gamma')"
            )
        kwargs["gamma"] = args["gamma"]
    return kwargs


def _backbone_name(model_kwargs: Mapping[str, Any], args_name: Optional[str], family: str) -> str:
    name = model_kwargs.get("backbone") or args_name
    if not name:
        raise ValueError(
            f"the timm architecture cannot be read from the weights (this is a {family}): pass backbone=<timm name>, "
            f"e.g. backbone='vit_small_patch16_224', 'resnet50' or 'convnext_small'"
        )
    return name


def classifier_kwargs(state: Mapping[str, Tensor], args: Mapping[str, Any], model_kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """``(family, ImageClassifier kwargs)`` for a supervised or timm state dict (official names).

    What the weights tell fills in what ``model_kwargs`` leaves out: ``num_classes``, ``pool``
    (``simpool`` where SimPool keys exist, else ``token`` for a ViT with a class token, else
    ``avg``), SimPool's ``qkv_bias`` and ``use_beta``, and a ViT's sizes; ``backbone`` and
    SimPool's ``gamma`` come from ``model_kwargs``, else from the training ``args``.
    """
    family = family_of_keys(state)
    layout = SUPERVISED_LAYOUTS[family]
    kwargs = dict(model_kwargs)
    head = state.get(layout.head + "weight")
    if head is None or head.dim() != 2:
        raise ValueError(f"no classifier at '{layout.head}weight' (a {family}); ImageClassifier needs one")
    kwargs.setdefault("num_classes", head.shape[0])
    default_pool = TOKEN_POOL if family == "vit" and "cls_token" in state else "avg"
    kwargs.setdefault("pool", "simpool" if any(k.startswith(layout.pool) for k in state) else default_pool)
    if kwargs["pool"] == "simpool":
        kwargs["pool_kwargs"] = _simpool_kwargs(state, layout.pool, kwargs.get("pool_kwargs"), args)
    kwargs["backbone"] = _backbone_name(kwargs, args.get("model"), family)
    if family == "vit":
        kwargs["backbone_kwargs"] = {**_vit_kwargs(state), **(kwargs.get("backbone_kwargs") or {})}
    return family, kwargs


# Official args with the same meaning as DINO's constructor arguments. Not lr: the official one is
# a base rate that main_dino scales by the global batch / 256, which the args do not record.
DINO_ARGS = (
    "out_dim", "use_bn_in_head", "norm_last_layer", "drop_path_rate", "momentum_teacher", "teacher_temp",
    "warmup_teacher_temp", "warmup_teacher_temp_epochs", "optimizer", "min_lr", "warmup_epochs",
    "weight_decay", "weight_decay_end", "freeze_last_layer", "clip_grad",
)
_OFFICIAL_DINO_VITS = ("vit_tiny", "vit_small", "vit_base")  # self_supervised/vision_transformer.py
OFFICIAL_DINO_HEAD = dict(head_layers=3, head_hidden_dim=2048, head_bottleneck_dim=256)  # main_dino: DINOHead defaults


def dino_kwargs(student: Mapping[str, Tensor], args: Mapping[str, Any], model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``DINO`` kwargs for an official DINO student (official names), as :func:`classifier_kwargs` does."""
    if "backbone.patch_embed.proj.weight" not in student:
        raise NotImplementedError(
            "only the official DINO ViT maps onto timm: the DINO fork's ResNet-50 and ConvNeXt use torchvision's and "
            "the ConvNeXt paper's parameter names"
        )
    backbone = {k[len("backbone.") :]: v for k, v in student.items() if k.startswith("backbone.")}
    kwargs = dict(model_kwargs)
    arch = args.get("arch")
    # The fork names its ViTs vit_tiny/small/base; the patch size comes from the weights.
    kwargs["backbone"] = _backbone_name(kwargs, f"{arch}_patch16_224" if arch in _OFFICIAL_DINO_VITS else arch, "vit")
    kwargs["backbone_kwargs"] = {**_vit_kwargs(backbone), **(kwargs.get("backbone_kwargs") or {})}
    kwargs.setdefault("pool", "simpool" if any(k.startswith("simpool.") for k in backbone) else TOKEN_POOL)
    if kwargs["pool"] == "simpool":
        kwargs["pool_kwargs"] = _simpool_kwargs(backbone, "simpool.", kwargs.get("pool_kwargs"), args)
        kwargs.setdefault("placement", "before_norm")  # forward(): x = self.simpool(x); return self.norm(x)

    linears = [v for k, v in student.items() if re.fullmatch(r"head\.mlp\.\d+\.weight", k) and v.dim() == 2]
    last = student.get("head.last_layer.weight_v")  # (out_dim, bottleneck)
    if last is None or not linears:
        raise ValueError("no DINO head in the student (head.mlp.*, head.last_layer.weight_v)")
    kwargs.setdefault("out_dim", last.shape[0])
    kwargs.setdefault("head_bottleneck_dim", last.shape[1])
    kwargs.setdefault("head_layers", len(linears))
    kwargs.setdefault("head_hidden_dim", linears[0].shape[0] if len(linears) > 1 else last.shape[1])
    kwargs.setdefault("use_bn_in_head", any(k.startswith("head.mlp.") and k.endswith("running_mean") for k in student))
    for name in DINO_ARGS:
        if name in args:
            kwargs.setdefault(name, args[name])
    return kwargs
