"""Official SimPool checkpoints in and out (the authors' repository, billpsomas/simpool).

Each official layout maps name by name onto our modules; no tensor is reshaped or converted.

``supervised``: the authors' timm fork (``supervised/train.py``). timm's ``CheckpointSaver``
writes a ``.pth.tar`` dict with ``state_dict`` (and ``state_dict_ema`` with ``--model-ema``),
``epoch``, ``version`` and ``arch``. Names are timm's; SimPool sits inside timm's
``SelectAdaptivePool2d`` as its ``.pool``:

- ViT (``vision_transformer.py``): SimPool ``gp.pool.*`` on the tokens after ``norm``, no
  ``cls_token``; classifier ``head.*``.
- ResNet (``resnet.py``): SimPool ``global_pool.pool.*``; classifier ``fc.*``.
- ConvNeXt (``convnext.py``): SimPool ``head.global_pool.pool.*``, then ``head.norm`` (a
  LayerNorm of the pooled vector); classifier ``head.fc.*``.

Ours: ``net.backbone.model.<name>`` <-> ``<name>``; ``net.backbone.pool.*`` <-> the SimPool
prefix; ``net.head.1.*`` <-> the classifier (``net.head.0`` is the dropout).

``timm``: a bare timm state dict (``.pth`` or ``.safetensors``) with the same names: the
default-pooling baselines, a ViT's [CLS] token (``pool="token"``) or a CNN's average (``"avg"``).

Official SimPool hyper-parameters live in code, not in the weights: ``gamma`` (a constructor
argument; ``--gamma`` of the training scripts), one head, no ``qkv_bias``, and the minimum of
the gamma path taken over the whole batch (ours: ``min_mode="batch"``; the default ``"sample"``
equals it at batch size 1).

Official checkpoints store the training ``args`` as an ``argparse.Namespace``, which
``torch.load(weights_only=True)`` refuses; :func:`load_official` then says so and names the
opt-out, ``weights_only=False`` (only for files you trust). Files written by
:func:`export_official` hold tensors, numbers and strings only.
"""
from __future__ import annotations

import argparse
import math
import os
import pickle
import re
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

import timm
import torch
from safetensors.torch import load_file as load_safetensors
from timm.models import ConvNeXt, ResNet, VisionTransformer
from torch import Tensor, nn

from .models.backbone import TOKEN_POOL, PooledBackbone
from .models.classifier import ImageClassifier
from .pooling import SimPool

__all__ = ["CheckpointMismatchError", "Kind", "KINDS", "export_official", "load_official"]

Kind = Literal["supervised", "timm", "dino"]
KINDS: tuple[str, ...] = ("supervised", "timm", "dino")

StateDict = dict[str, Tensor]
_Rules = tuple[tuple[str, str], ...]  # (our prefix, official prefix), most specific first


class CheckpointMismatchError(RuntimeError):
    """The checkpoint's keys or shapes differ from the model's.

    Attributes:
        missing: official keys the model needs that the checkpoint lacks.
        unexpected: checkpoint keys the model has no place for.
        mismatched: ``(key, checkpoint shape, model shape)`` for keys present in both.
    """

    _SHOWN = 20  # per list in the message; the attributes keep everything

    def __init__(
        self,
        what: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        hint: str = "",
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"{what} does not fit the model (official key names):"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped (checkpoint vs model)", [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched]),
        ):
            if items:
                more = f" ... and {len(items) - self._SHOWN} more" if len(items) > self._SHOWN else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[: self._SHOWN])}{more}")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


# ---------------------------------------------------------------------- layouts


@dataclass(frozen=True)
class _Layout:
    """Where a supervised model keeps its pool and classifier (official prefixes)."""

    pool: str
    head: str
    extra: _Rules = ()

    def rules(self) -> _Rules:
        # Keys relative to ImageClassifier.net; the timm model's own names pass through unchanged.
        return (("backbone.pool.", self.pool), ("head.1.", self.head), *self.extra, ("backbone.model.", ""))


_SUPERVISED: dict[str, _Layout] = {
    # vision_transformer.py: self.gp = SelectAdaptivePool2d(...); self.head = nn.Linear(...)
    "vit": _Layout(pool="gp.pool.", head="head."),
    # resnet.py: self.global_pool, self.fc = create_classifier(...)
    "resnet": _Layout(pool="global_pool.pool.", head="fc."),
    # convnext.py: self.head = Sequential(global_pool, norm, flatten, drop, fc). Our backbone applies
    # timm's head.norm after the pool as backbone.final_norm.
    "convnext": _Layout(pool="head.global_pool.pool.", head="head.fc.", extra=(("backbone.final_norm.", "head.norm."),)),
}

_FAMILIES = ((VisionTransformer, "vit"), (ResNet, "resnet"), (ConvNeXt, "convnext"))


def _family_of(backbone: PooledBackbone) -> str:
    for cls, family in _FAMILIES:
        if isinstance(backbone.model, cls):
            return family
    raise NotImplementedError(
        f"official checkpoints exist for timm's VisionTransformer, ResNet and ConvNeXt; "
        f"{type(backbone.model).__name__} has no official layout"
    )


def _check_family(name: str, family: str) -> None:
    """Fail early when timm model ``name`` is not of the checkpoint's ``family`` (built on the meta device)."""
    if not timm.is_model(name):
        return  # PooledBackbone raises with suggestions
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=0, global_pool="")
    found = next((f for cls, f in _FAMILIES if isinstance(model, cls)), type(model).__name__)
    if found != family:
        raise ValueError(f"the checkpoint is a {family}, but backbone {name!r} is a {found}")


def _family_of_keys(state: Mapping[str, Tensor]) -> str:
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


def _official_name(key: str, rules: _Rules) -> str:
    for ours, theirs in rules:
        if key.startswith(ours):
            return theirs + key[len(ours) :]
    raise ValueError(f"our parameter {key!r} has no counterpart in the official layout")


def _to_official(module: nn.Module, rules: _Rules) -> StateDict:
    return {_official_name(k, rules): v.detach().cpu() for k, v in module.state_dict().items()}


def _load_official_state(module: nn.Module, state: Mapping[str, Tensor], rules: _Rules, what: str, hint: str = "") -> None:
    """Load ``state`` (official names) into ``module``; every key and shape must match."""
    ours = module.state_dict()
    names = {_official_name(k, rules): k for k in ours}
    missing = [k for k in names if k not in state]
    unexpected = [k for k in state if k not in names]
    mismatched = [
        (k, tuple(state[k].shape), tuple(ours[names[k]].shape))
        for k in names
        if k in state and state[k].shape != ours[names[k]].shape
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(what, missing, unexpected, mismatched, hint)
    module.load_state_dict({names[k]: state[k] for k in names})


# ---------------------------------------------------------------------- reading files


def _read(path: Union[str, os.PathLike], weights_only: bool) -> Any:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {os.fspath(path)!r}")
    if os.fspath(path).endswith(".safetensors"):  # timm's hub format: tensors only, nothing to unpickle
        return load_safetensors(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if not weights_only:
            raise
        raise pickle.UnpicklingError(
            f"{os.fspath(path)!r} holds more than tensors and plain containers (official checkpoints store their "
            f"training args as an argparse.Namespace), which weights_only=True refuses to unpickle. Unpickling can "
            f"run arbitrary code: only if you trust this file, pass weights_only=False. torch said: "
            f"{str(err).splitlines()[0]}"
        ) from err


def _strip(state: Mapping[str, Tensor], prefix: str) -> StateDict:
    """Drop ``prefix`` when every key has it (DDP's ``module.``)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _args_dict(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, Mapping) else {}


def _detect_kind(checkpoint: Any) -> str:
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    if "student" in checkpoint or "teacher" in checkpoint:
        return "dino"
    if "state_dict" in checkpoint or "state_dict_ema" in checkpoint:
        return "supervised"
    return "timm"


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


# ---------------------------------------------------------------------- supervised and timm


def _supervised_state(checkpoint: Mapping[str, Any], ema: bool) -> tuple[StateDict, Optional[StateDict]]:
    """``(weights for the model, EMA weights or None)`` of a supervised or bare timm checkpoint."""
    if "state_dict" in checkpoint or "state_dict_ema" in checkpoint:
        state, ema_state = checkpoint.get("state_dict"), checkpoint.get("state_dict_ema")
    elif "model" in checkpoint and isinstance(checkpoint["model"], Mapping):  # DeiT-style files
        state, ema_state = checkpoint["model"], None
    else:
        state, ema_state = checkpoint, None
    if ema:
        if ema_state is None:
            raise ValueError(f"ema=True, but the checkpoint has no 'state_dict_ema'; its entries: {list(checkpoint)[:10]}")
        state = ema_state
    if state is None:
        raise ValueError(f"the checkpoint has no 'state_dict'; its entries: {list(checkpoint)[:10]}")
    bad = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if bad:
        raise ValueError(f"not a state dict: entries {bad[:5]} are not tensors")
    return _strip(state, "module."), None if ema_state is None else _strip(ema_state, "module.")


def _classifier_kwargs(state: StateDict, family: str, args: Mapping[str, Any], model_kwargs: dict[str, Any]) -> dict[str, Any]:
    layout = _SUPERVISED[family]
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
    _check_family(kwargs["backbone"], family)
    if family == "vit":
        kwargs["backbone_kwargs"] = {**_vit_kwargs(state), **(kwargs.get("backbone_kwargs") or {})}
    return kwargs


def _load_classifier(checkpoint: Mapping[str, Any], ema: bool, model_kwargs: dict[str, Any]) -> ImageClassifier:
    state, ema_state = _supervised_state(checkpoint, ema)
    family = _family_of_keys(state)
    model = ImageClassifier(**_classifier_kwargs(state, family, _args_dict(checkpoint), model_kwargs))
    rules = _SUPERVISED[family].rules()
    hint = "check backbone= and backbone_kwargs (e.g. num_heads) against the checkpoint's architecture"
    _load_official_state(model.net, state, rules, "state_dict_ema" if ema else "state_dict", hint)
    if model.ema is not None:  # the caller asked for an EMA (ema_decay): start it from the file's, if any
        _load_official_state(model.ema.module, ema_state if ema_state is not None else state, rules, "EMA weights", hint)
    return model


def _check_simpool_exportable(pool: SimPool, use_beta: bool, where: str) -> None:
    """The official SimPool at ``where`` is single-head, bias-free, default scale, beta iff ``use_beta``."""
    problems = []
    if pool.num_heads != 1:
        problems.append(f"num_heads={pool.num_heads} (official: 1)")
    if pool.wq.bias is not None:
        problems.append("qkv_bias=True (official: False)")
    if pool.scale != pool.head_dim**-0.5:
        problems.append(f"qk_scale={pool.scale} (official: head_dim ** -0.5)")
    if pool.use_beta != use_beta:
        problems.append(f"use_beta={pool.use_beta} (official here: {use_beta})")
    if problems:
        raise ValueError(f"the official SimPool at {where} cannot express this pool: {', '.join(problems)}")


def _classifier_checkpoint(model: ImageClassifier, kind: str) -> dict[str, Any]:
    backbone = model.backbone
    family = _family_of(backbone)
    layout = _SUPERVISED[family]
    allowed = ("simpool", TOKEN_POOL) if family == "vit" else ("simpool", "avg")
    if backbone.pool_name not in allowed:
        raise ValueError(f"the official {family} pools with {' or '.join(allowed)}, not {backbone.pool_name!r}")
    if backbone.pool_name == "simpool":
        _check_simpool_exportable(backbone.pool, use_beta=False, where=layout.pool[:-1])
    rules = layout.rules()
    state = _to_official(model.net, rules)
    if kind == "timm":
        return state
    checkpoint: dict[str, Any] = {
        "state_dict": state,
        "arch": model.hparams.backbone,
        # CheckpointSaver stores the index of the last finished epoch; version 2 resumes at epoch + 1.
        "epoch": model.current_epoch - 1,
        "version": 2,
    }
    if model.ema is not None:
        checkpoint["state_dict_ema"] = _to_official(model.ema.module, rules)
    return checkpoint


# ---------------------------------------------------------------------- public API


def load_official(
    path: Union[str, os.PathLike],
    kind: Optional[Kind] = None,
    *,
    weights_only: bool = True,
    ema: bool = False,
    **model_kwargs: Any,
) -> ImageClassifier:
    """A ready model (in eval mode) from an official checkpoint.

    Args:
        path: the checkpoint file.
        kind: ``"supervised"``, ``"timm"`` or ``"dino"`` (see the module docstring); ``None`` tells
            them apart by the file's entries.
        weights_only: unpickle tensors and plain containers only. Official files carry an
            ``argparse.Namespace`` and need ``False``: use it only for files you trust.
        ema: supervised: load ``state_dict_ema`` (the EMA weights) instead of ``state_dict``.
        model_kwargs: for the model's constructor (``ImageClassifier``). What the weights tell is
            filled in where not given: ``num_classes``, ``pool`` (``simpool`` where SimPool keys
            exist, else ``token`` for a ViT with a class token, else ``avg``), SimPool's
            ``qkv_bias`` and ``use_beta``, and a ViT's ``embed_dim``, ``depth``, ``patch_size``,
            ``mlp_ratio``, ``qkv_bias`` and ``img_size``. ``backbone`` (the timm name) and
            SimPool's ``gamma`` are not in the weights: they come from the caller, else from the
            checkpoint's ``args``. Give ``ema_decay`` to get a model EMA, started from the
            checkpoint's EMA weights where it has them.

    Raises:
        pickle.UnpicklingError: the file needs ``weights_only=False``.
        CheckpointMismatchError: keys or shapes differ; lists the missing, unexpected and
            mis-shaped keys.
        ValueError: the architecture or gamma cannot be determined, or the file is not a checkpoint.
    """
    checkpoint = _read(path, weights_only)
    detected = _detect_kind(checkpoint)
    kind = kind or detected
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if (kind == "dino") != (detected == "dino"):
        raise ValueError(f"kind={kind!r}, but the file looks like a {detected!r} checkpoint (entries: {list(checkpoint)[:10]})")
    if kind == "dino":
        raise NotImplementedError("official DINO checkpoints are not supported yet: they need the DINO LightningModule")
    return _load_classifier(checkpoint, ema, model_kwargs).eval()


def export_official(model: ImageClassifier, path: Union[str, os.PathLike], kind: Optional[Kind] = None) -> None:
    """Write ``model`` as an official checkpoint that the authors' code loads.

    Args:
        model: an :class:`ImageClassifier`.
        path: the file to write (``.pth.tar`` for supervised, by the official convention).
        kind: ``"supervised"`` (default): ``{'state_dict', 'state_dict_ema' (with an EMA), 'arch',
            'epoch', 'version'}``; ``"timm"``: the bare state dict.

    Raises:
        ValueError: the model has no official equivalent (another pool, a multi-head or biased
            SimPool, a pool before a ViT's norm ...); the message says which setting.
        NotImplementedError: the backbone is not a ViT, ResNet or ConvNeXt.
    """
    kind = kind or "supervised"
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if not isinstance(model, ImageClassifier):
        raise TypeError(f"expected an ImageClassifier, got {type(model).__name__}")
    if kind == "dino":
        raise ValueError("kind='dino' needs a DINO model; an ImageClassifier exports as 'supervised' or 'timm'")
    torch.save(_classifier_checkpoint(model, kind), path)
