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

Official checkpoints store the training ``args`` as an ``argparse.Namespace``, which
``torch.load(weights_only=True)`` refuses; :func:`load_official` then says so and names the
opt-out, ``weights_only=False`` (only for files you trust). Files written by
:func:`export_official` hold tensors, numbers and strings only.
"""
from __future__ import annotations

import argparse
import math
import os
import re
import warnings
from dataclasses import dataclass
from typing import Any, Literal, Mapping, Optional, Union

import timm
import torch
from timm.models import ConvNeXt, ResNet, VisionTransformer
from torch import Tensor, nn

from .models.backbone import TOKEN_POOL, PooledBackbone, WeightsMismatchError, read_weights
from .models.classifier import ImageClassifier
from .models.dino import DINO
from .pooling import SimPool

__all__ = ["CheckpointMismatchError", "Kind", "KINDS", "WeightsMismatchError", "export_official", "load_official"]

Kind = Literal["supervised", "timm", "dino"]
KINDS: tuple[str, ...] = ("supervised", "timm", "dino")

StateDict = dict[str, Tensor]
_Rules = tuple[tuple[str, str], ...]  # (our prefix, official prefix), most specific first


# The name this module raised before the error class moved next to the other weight loading.
CheckpointMismatchError = WeightsMismatchError


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

# Keys relative to DINO's MultiCropNet (self_supervised/vision_transformer.py and DINOHead).
_DINO_VIT_RULES: _Rules = (
    ("backbone.pool.", "backbone.simpool."),
    ("backbone.final_norm.", "backbone.norm."),
    ("backbone.model.", "backbone."),
    # The official head uses the old nn.utils.weight_norm (weight_g, weight_v); ours the parametrization.
    ("head.last_layer.parametrizations.weight.original0", "head.last_layer.weight_g"),
    ("head.last_layer.parametrizations.weight.original1", "head.last_layer.weight_v"),
    ("head.", "head."),
)

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
        raise WeightsMismatchError(f"{what} (official key names)", missing, unexpected, mismatched, hint)
    module.load_state_dict({names[k]: state[k] for k in names})


# ---------------------------------------------------------------------- reading files


def _read(path: Union[str, os.PathLike], weights_only: bool) -> Any:
    path = os.fspath(path)
    return read_weights(path, weights_only, f"checkpoint {path!r}", "pass weights_only=False")


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


# ---------------------------------------------------------------------- DINO

# Official args with the same meaning as DINO's constructor arguments. Not lr: the official one is
# a base rate that main_dino scales by the global batch / 256, which the args do not record.
_DINO_ARGS = (
    "out_dim", "use_bn_in_head", "norm_last_layer", "drop_path_rate", "momentum_teacher", "teacher_temp",
    "warmup_teacher_temp", "warmup_teacher_temp_epochs", "optimizer", "min_lr", "warmup_epochs",
    "weight_decay", "weight_decay_end", "freeze_last_layer", "clip_grad",
)
_OFFICIAL_DINO_VITS = ("vit_tiny", "vit_small", "vit_base")  # self_supervised/vision_transformer.py
_OFFICIAL_DINO_HEAD = dict(head_layers=3, head_hidden_dim=2048, head_bottleneck_dim=256)  # main_dino: DINOHead defaults


def _dino_states(checkpoint: Mapping[str, Any]) -> tuple[StateDict, StateDict]:
    missing = [k for k in ("student", "teacher") if k not in checkpoint]
    if missing:
        raise ValueError(f"a DINO checkpoint needs 'student' and 'teacher'; missing {missing}")
    return _strip(checkpoint["student"], "module."), _strip(checkpoint["teacher"], "module.")


def _dino_kwargs(student: StateDict, args: Mapping[str, Any], model_kwargs: dict[str, Any]) -> dict[str, Any]:
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
    _check_family(kwargs["backbone"], "vit")
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
    for name in _DINO_ARGS:
        if name in args:
            kwargs.setdefault(name, args[name])
    return kwargs


def _load_dino(checkpoint: Mapping[str, Any], model_kwargs: dict[str, Any]) -> DINO:
    student, teacher = _dino_states(checkpoint)
    model = DINO(**_dino_kwargs(student, _args_dict(checkpoint), model_kwargs))
    hint = "check backbone= and backbone_kwargs (e.g. num_heads) against the checkpoint's architecture"
    _load_official_state(model.student, student, _DINO_VIT_RULES, "student", hint)
    _load_official_state(model.teacher, teacher, _DINO_VIT_RULES, "teacher", hint)
    center = (checkpoint.get("dino_loss") or {}).get("center")
    if center is not None:
        _load_official_state(model.criterion, {"center": center}, (("", ""),), "dino_loss")
    return model


def _dino_checkpoint(model: DINO) -> dict[str, Any]:
    backbone = model.student.backbone
    if _family_of(backbone) != "vit":
        raise NotImplementedError(
            "only the official DINO ViT shares timm's names; the DINO fork's ResNet-50 and ConvNeXt do not"
        )
    simpool = backbone.pool_name == "simpool"
    if simpool:
        if backbone.placement != "before_norm":
            raise ValueError("the official DINO ViT pools the tokens before its final norm: use placement='before_norm'")
        # vision_transformer.py: SimPool(embed_dim, num_heads=1, qkv_bias=False, gamma=gamma, use_beta=True);
        # sp.py creates beta only with a gamma.
        _check_simpool_exportable(backbone.pool, use_beta=backbone.pool.gamma is not None, where="backbone.simpool")
    elif backbone.pool_name != TOKEN_POOL:
        raise ValueError(f"the official DINO ViT pools with 'simpool' or its [CLS] token ('token'), not {backbone.pool_name!r}")
    hp = model.hparams
    different = {k: hp[k] for k, v in _OFFICIAL_DINO_HEAD.items() if hp[k] != v}
    if different:
        warnings.warn(
            f"main_dino.py builds DINOHead with {_OFFICIAL_DINO_HEAD}; this head has {different}: the official training "
            f"loop cannot resume from this file, though its eval scripts read the teacher's backbone",
            stacklevel=4,  # the caller of export_official
        )
    # main_dino.py wraps the student in DDP, the teacher only when the network has batch norms.
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.student.modules())
    teacher_prefix = "module." if has_batchnorm else ""
    args = {name: hp[name] for name in _DINO_ARGS}
    args.update(
        arch=hp.backbone,
        mode="simpool" if simpool else "official",
        gamma=backbone.pool.gamma if simpool else None,
        patch_size=backbone.model.patch_embed.patch_size[0],
    )
    return {
        "student": {"module." + k: v for k, v in _to_official(model.student, _DINO_VIT_RULES).items()},
        "teacher": {teacher_prefix + k: v for k, v in _to_official(model.teacher, _DINO_VIT_RULES).items()},
        # Our optimizer's groups are not the official ones: restart_from_checkpoint reports that it
        # cannot load this state and starts the optimizer afresh, as it does for any mismatch.
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": model.current_epoch,  # main_dino saves epoch + 1: the epochs done, where it resumes
        "args": args,  # a dict, not the official Namespace: nothing official reads it, and it stays weights_only-safe
        "dino_loss": {"center": model.criterion.center.detach().cpu()},
    }


# ---------------------------------------------------------------------- public API


def load_official(
    path: Union[str, os.PathLike],
    kind: Optional[Kind] = None,
    *,
    weights_only: bool = True,
    ema: bool = False,
    **model_kwargs: Any,
) -> Union[ImageClassifier, DINO]:
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
        WeightsMismatchError: keys or shapes differ; lists the missing, unexpected and
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
        if ema:
            raise ValueError("ema=True is for supervised checkpoints; a DINO checkpoint's EMA is its teacher")
        return _load_dino(checkpoint, model_kwargs).eval()
    return _load_classifier(checkpoint, ema, model_kwargs).eval()


def export_official(
    model: Union[ImageClassifier, DINO], path: Union[str, os.PathLike], kind: Optional[Kind] = None
) -> None:
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
    if isinstance(model, DINO):
        if kind not in (None, "dino"):
            raise ValueError(f"a DINO model exports as kind='dino', not {kind!r}")
        checkpoint = _dino_checkpoint(model)
    elif isinstance(model, ImageClassifier):
        kind = kind or "supervised"
        if kind not in ("supervised", "timm"):
            raise ValueError(f"an ImageClassifier exports as kind='supervised' or 'timm', not {kind!r}")
        checkpoint = _classifier_checkpoint(model, kind)
    else:
        raise TypeError(f"expected an ImageClassifier or a DINO model, got {type(model).__name__}")
    torch.save(checkpoint, path)
