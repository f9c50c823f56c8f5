"""Official SimPool checkpoints (the authors' repository, billpsomas/simpool) under our names.

Each official layout maps name by name onto our modules; no tensor is reshaped or converted,
except the DINO fork's SimPool-mode ViT position embedding, resampled once as its forward does
(:mod:`.pos_embed`). Everything here is a pure function on dicts: reading a file never builds a model.

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

``dino``: the authors' DINO fork (``self_supervised/main_dino.py``, read at commit fac2263): a
dict with ``student``, ``teacher``, ``optimizer``, ``epoch``, ``args`` (an ``argparse.Namespace``)
and ``dino_loss`` (the center). Student keys are ``module.backbone.*`` / ``module.head.*`` (DDP);
the teacher carries ``module.`` only when the network has batch norms (only then does main_dino
wrap it in DDP: the ResNet with its BatchNorm, or any network with ``--use_bn_in_head``). The
head is DINOHead with the old ``nn.utils.weight_norm`` (``head.last_layer.weight_g`` /
``weight_v``; ours ``head.last_layer.parametrizations.weight.original0/1``); MultiCropWrapper
replaced the backbone's ``fc`` / ``head`` by ``nn.Identity()``, so neither is saved. Backbones,
``--mode simpool`` or ``official``:

- ViT (``vision_transformer.py``): timm's names. SimPool mode: no ``cls_token``; the tokens are
  pooled by ``backbone.simpool.*`` (``use_beta=True``: a ``beta`` with a gamma) before
  ``backbone.norm``, and the position embedding is resampled at every forward
  (:mod:`.pos_embed`: the import resamples it once). Official mode: ``norm(x)[:, 0]``.
- ResNet-50 (``resnet.py``, torchvision's names, which are timm's): ``backbone.simpool.*`` (no
  beta) on the last map, or the average.
- ConvNeXt (``convnext.py``, the ConvNeXt repo's names: ``downsample_layers.i.j``, ``stages.i.j``,
  ``dwconv``, ``pwconv1/2``, renamed by timm's own ``checkpoint_filter_fn``): ``backbone.norm``
  after the pool in both modes, ``norm(simpool(x))`` or ``norm(x.mean((-2, -1)))``.

Ours: DINO's ``student`` / ``teacher`` (MultiCropNet) with ``backbone.model.*`` <-> ``backbone.*``,
``backbone.pool.*`` <-> ``backbone.simpool.*``, ``backbone.final_norm.*`` <-> ``backbone.norm.*``
(SimPool-mode ViT, ConvNeXt), and ``criterion.center`` <-> ``dino_loss.center``. A file with one
network, or a bare backbone (DINO's ``*_pretrain.pth``, a stripped teacher), reads as that
network, with or without its head (:func:`dino_network_of_bare`).

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
from typing import Any, Iterable, Literal, Mapping, Optional

import torch
from timm.models.convnext import checkpoint_filter_fn as convnext_checkpoint_filter
from torch import Tensor

from .io import StateDict, strip_prefix
from .pos_embed import simpool_forward_table, simpool_stored_table

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
    "convnext_timm_names",
    "detect_kind",
    "dino_family",
    "dino_from_official",
    "dino_kwargs",
    "dino_network_of_bare",
    "dino_official_names",
    "dino_rules",
    "dino_to_official",
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


def dino_rules(simpool: bool, family: str = "vit") -> Rules:
    """Rules between DINO's ``MultiCropNet`` and a network of the DINO fork (mode ``simpool`` or ``official``).

    ``family``: ``"vit"``, ``"resnet"`` or ``"convnext"``. The final norm that follows the pool is
    ``backbone.norm`` for the SimPool-mode ViT and for ConvNeXt in both modes (ours:
    ``backbone.final_norm``); the official-mode ViT keeps it inside the timm model. ConvNeXt's own
    names differ from timm's beyond these prefixes: :func:`dino_official_names` renames them.
    """
    backbone: Rules = (("backbone.pool.", "backbone.simpool."),) if simpool else ()
    if family == "convnext" or (family == "vit" and simpool):
        backbone += (("backbone.final_norm.", "backbone.norm."),)
    return (
        *backbone,
        ("backbone.model.", "backbone."),
        # The official head uses the old nn.utils.weight_norm (weight_g, weight_v); ours the parametrization.
        ("head.last_layer.parametrizations.weight.original0", "head.last_layer.weight_g"),
        ("head.last_layer.parametrizations.weight.original1", "head.last_layer.weight_v"),
        ("head.", "head."),
    )


# ---------------------------------------------------------------------- the DINO fork's ConvNeXt names

# The DINO fork's convnext.py keeps the ConvNeXt repo's names (downsample_layers.i.j, stages.i.j,
# dwconv, pwconv1/2); timm's checkpoint_filter_fn renames them to timm's. Written out here is only
# the way back, for export, and every use of it is checked against timm's filter.
_CONVNEXT_REPO_NAMES = (
    (r"^stem\.", "downsample_layers.0."),
    (r"^stages\.(\d+)\.downsample\.(\d+)\.", r"downsample_layers.\1.\2."),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.", r"stages.\1.\2."),
    (r"\.conv_dw\.", ".dwconv."),
    (r"\.mlp\.fc(\d)\.", r".pwconv\1."),
)


def convnext_timm_names(keys: Iterable[str]) -> dict[str, str]:
    """ConvNeXt repo name -> timm name for each of ``keys``, as ``timm.models.convnext.checkpoint_filter_fn`` renames.

    The filter also reshapes 2-d weights to a model's shapes; handed one-element tags instead of
    tensors it renames only (and needs no model), and the tags tell which name became which.
    """
    keys = list(keys)
    tags = {k: torch.tensor([float(i)]) for i, k in enumerate(keys)}
    renamed = convnext_checkpoint_filter(tags, None)
    if len(renamed) != len(keys):
        raise ValueError(f"timm's ConvNeXt filter does not rename these keys one to one: {keys[:8]} ...")
    return {keys[int(tag.item())]: new for new, tag in renamed.items()}


def _convnext_repo_names(keys: Iterable[str]) -> dict[str, str]:
    """timm name -> ConvNeXt repo name; the inverse of :func:`convnext_timm_names`, checked against it."""
    out = {}
    for key in keys:
        name = key
        for pattern, repl in _CONVNEXT_REPO_NAMES:
            name = re.sub(pattern, repl, name)
        out[key] = name
    back = convnext_timm_names(out.values())
    wrong = [k for k, v in out.items() if back[v] != k]
    if wrong:
        raise ValueError(f"timm ConvNeXt parameters with no name in the DINO fork's convnext.py: {wrong[:8]}")
    return out


# ---------------------------------------------------------------------- DINO networks both ways


def dino_family(network: Mapping[str, Tensor]) -> str:
    """``"vit"``, ``"resnet"`` or ``"convnext"`` from a DINO fork network's keys (``backbone.*``)."""
    if "backbone.patch_embed.proj.weight" in network:
        return "vit"
    if any(k.startswith("backbone.layer1.") for k in network) and any(k.startswith("backbone.layer4.") for k in network):
        return "resnet"
    if "backbone.downsample_layers.0.0.weight" in network:
        return "convnext"
    raise ValueError(
        "cannot tell the DINO fork's architecture from the keys: expected backbone.patch_embed.proj.weight (ViT), "
        f"backbone.layer1.* .. layer4.* (ResNet) or backbone.downsample_layers.0.0.weight (ConvNeXt); first keys: "
        f"{list(network)[:8]}"
    )


def _quirk(family: str, simpool: bool) -> bool:
    """Whether the fork's forward resamples the position embedding at its training resolution (weights.pos_embed)."""
    return family == "vit" and simpool


def _convnext_inner(key: str) -> bool:
    """A key of the ConvNeXt proper (not its SimPool, final norm or the DINO head), under the fork's ``backbone.``."""
    return key.startswith("backbone.") and not key.startswith(("backbone.simpool.", "backbone.norm."))


def dino_official_names(keys: Iterable[str], family: str, simpool: bool) -> dict[str, str]:
    """Our ``MultiCropNet`` key -> the DINO fork's key, for each of ``keys`` (names only)."""
    keys = list(keys)
    names = {k: _rename(k, dino_rules(simpool, family), 0) for k in keys}
    if family == "convnext":
        inner = [v for v in names.values() if _convnext_inner(v)]
        repo = _convnext_repo_names(v[len("backbone.") :] for v in inner)
        names = {k: "backbone." + repo[v[len("backbone.") :]] if _convnext_inner(v) else v for k, v in names.items()}
    return names


def dino_from_official(network: Mapping[str, Tensor], family: str, simpool: bool) -> StateDict:
    """A DINO fork network (``backbone.*``, ``head.*`` or the backbone alone) under our ``MultiCropNet`` names.

    ConvNeXt's names go through timm's filter; the SimPool-mode ViT's position embedding is
    resampled once as the fork's forward resamples it (:mod:`.pos_embed`). Every other tensor is
    passed on as it is.
    """
    network = dict(network)
    if family == "convnext":
        timm_names = convnext_timm_names(k[len("backbone.") :] for k in network if _convnext_inner(k))
        network = {"backbone." + timm_names[k[len("backbone.") :]] if _convnext_inner(k) else k: v for k, v in network.items()}
    ours = from_official(network, dino_rules(simpool, family))
    if _quirk(family, simpool) and "backbone.model.pos_embed" in ours:
        ours["backbone.model.pos_embed"] = simpool_forward_table(ours["backbone.model.pos_embed"])
    return ours


def dino_to_official(
    state: Mapping[str, Tensor], family: str, simpool: bool, stored_pos_embed: Optional[Tensor] = None
) -> StateDict:
    """Our ``MultiCropNet`` state -> the DINO fork's names and values; the inverse of :func:`dino_from_official`.

    ``stored_pos_embed``: the SimPool-mode ViT's table as the file stored it, where the model was
    imported: it is written back unchanged while the model's table is still its resampling, so an
    import exports bit for bit. Otherwise the table is the solve of :func:`~.pos_embed.simpool_stored_table`.
    """
    names = dino_official_names(state, family, simpool)
    official = {names[k]: v.detach().cpu() for k, v in state.items()}
    if _quirk(family, simpool) and "backbone.pos_embed" in official:
        table = official["backbone.pos_embed"]
        if stored_pos_embed is not None and torch.equal(simpool_forward_table(stored_pos_embed.cpu()), table):
            official["backbone.pos_embed"] = stored_pos_embed.detach().cpu()
        else:
            official["backbone.pos_embed"] = simpool_stored_table(table)
    return official


# ---------------------------------------------------------------------- what a file holds


def detect_kind(checkpoint: Any) -> str:
    """``"dino"``, ``"supervised"`` or ``"timm"`` from a checkpoint's entries.

    A bare state dict is ``"dino"`` when :func:`dino_network_of_bare` reads it as a DINO fork
    network or backbone (DINO's ``*_pretrain.pth``, a stripped teacher), else ``"timm"``.
    """
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"expected a checkpoint dict, got {type(checkpoint).__name__}")
    if "student" in checkpoint or "teacher" in checkpoint:
        return "dino"
    if "state_dict" in checkpoint or "state_dict_ema" in checkpoint:
        return "supervised"
    return "dino" if dino_network_of_bare(checkpoint) is not None else "timm"


_CLASSIFIERS = {"vit": "head.weight", "resnet": "fc.weight"}


def dino_network_of_bare(state: Mapping[str, Any], headless_timm: bool = True) -> Optional[StateDict]:
    """A bare state dict read as one DINO fork network (``backbone.*``, maybe ``head.*``), or ``None``.

    Recognised, once DDP's ``module.`` is dropped:

    - a network as saved: every key under ``backbone.`` or ``head.`` (a stripped student or teacher,
      with or without its head);
    - a backbone alone in names timm does not use: SimPool at ``simpool.*``, or the ConvNeXt repo's
      ``downsample_layers.*`` (DINO's ``*_pretrain.pth`` release format, SimPool or ConvNeXt);
    - with ``headless_timm``, a ViT or ResNet in timm's names without a classifier (DINO's
      official-mode ``*_pretrain.pth``); ``pretrained_path`` reads those as plain timm files.
    """
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        return None
    state = strip_prefix(state, "module.")
    if all(k.startswith(("backbone.", "head.")) for k in state):
        return dict(state) if any(k.startswith("backbone.") for k in state) else None
    network = {"backbone." + k: v for k, v in state.items()}
    if any(k.startswith(("simpool.", "downsample_layers.")) for k in state):
        return network
    if headless_timm:
        try:
            family = family_of_keys(state)
        except ValueError:
            return None
        if family in _CLASSIFIERS and _CLASSIFIERS[family] not in state:
            return network
    return None


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
        student, teacher: DINO: the two networks (``backbone.*``, ``head.*``), ``module.`` dropped.
            A file with one network (a teacher, a backbone alone: DINO's ``*_pretrain.pth``) has it
            as ``teacher`` and no ``student``; the head may be absent.
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
        center = (checkpoint.get("dino_loss") or {}).get("center")
        student, teacher = checkpoint.get("student"), checkpoint.get("teacher")
        if student is None and teacher is None:  # a bare network or backbone
            teacher = dino_network_of_bare(checkpoint)
            if teacher is None:
                raise ValueError(f"not a DINO fork network or backbone; first keys: {list(checkpoint)[:8]}")
        student = None if student is None else strip_prefix(student, "module.")
        teacher = student if teacher is None else strip_prefix(teacher, "module.")
        return OfficialCheckpoint(kind, args, student=student, teacher=teacher, center=center)
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


def _resnet_kwargs(backbone: Mapping[str, Tensor]) -> dict[str, Any]:
    """Blocks per stage (``layer<i>.<j>.*``) and, for bottlenecks, the width per group of a torchvision / timm ResNet."""
    counts = [1 + max((int(m.group(1)) for k in backbone if (m := re.match(rf"layer{i}\.(\d+)\.", k))), default=-1) for i in range(1, 5)]
    out: dict[str, Any] = {"layers": tuple(counts)}
    if "layer1.0.conv3.weight" in backbone:  # a bottleneck's inner width in layer1 (64 planes) is base_width
        out["base_width"] = backbone["layer1.0.conv1.weight"].shape[0]
    return out


def _convnext_kwargs(backbone: Mapping[str, Tensor]) -> dict[str, Any]:
    """``depths`` and ``dims`` of a ConvNeXt in the ConvNeXt repo's names."""
    depths = [1 + max((int(m.group(1)) for k in backbone if (m := re.match(rf"stages\.{i}\.(\d+)\.", k))), default=-1) for i in range(4)]
    dims = [backbone["downsample_layers.0.0.weight"].shape[0]]
    dims += [backbone[f"downsample_layers.{i}.1.weight"].shape[0] for i in range(1, 4) if f"downsample_layers.{i}.1.weight" in backbone]
    return {"depths": tuple(depths), "dims": tuple(dims)}


def dino_kwargs(network: Mapping[str, Tensor], args: Mapping[str, Any], model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """``DINO`` kwargs for a DINO fork network (official names), as :func:`classifier_kwargs` does.

    ``network``: the student, or the one network of a teacher-only or backbone-only file. The
    architecture comes from ``backbone`` (the timm name; else the args' ``arch``: the fork's
    ``vit_small`` is timm's ``vit_small_patch16_224``, ``resnet50`` and ``convnext_small`` are
    timm's names) and the sizes from the weights (a ViT's widths, a ResNet's ``layers``, a
    ConvNeXt's ``depths`` and ``dims``). Pool: ``simpool`` where SimPool keys exist, else the
    official mode's ``token`` (ViT) or ``avg`` (CNNs); the SimPool-mode ViT pools before its norm.
    The head's sizes come from its weights; without a head (a backbone alone) DINO's defaults or
    ``model_kwargs`` build a fresh one. Stochastic depth as main_dino sets it: none in its ResNet,
    0.4 in its ConvNeXt (hard-coded there), ``args.drop_path_rate`` in its ViT.

    The fork's SimPool-mode ViT teacher is built without ``gamma`` (``vits.__dict__[arch](mode,
    patch_size)``), so during training it ran with the default 1.25 whatever ``--gamma`` said; its
    eval scripts pass ``--gamma``. Here both networks take the args' (or the caller's) gamma, as
    the eval scripts do: the same for the released ViT-S (trained with 1.25).
    """
    family = dino_family(network)
    backbone = {k[len("backbone.") :]: v for k, v in network.items() if k.startswith("backbone.")}
    kwargs = dict(model_kwargs)
    arch = args.get("arch")
    given = kwargs.get("backbone_kwargs") or {}
    if family == "vit":
        # The fork names its ViTs vit_tiny/small/base; the patch size comes from the weights.
        kwargs["backbone"] = _backbone_name(kwargs, f"{arch}_patch16_224" if arch in _OFFICIAL_DINO_VITS else arch, family)
        kwargs["backbone_kwargs"] = {**_vit_kwargs(backbone), **given}
    else:
        kwargs["backbone"] = _backbone_name(kwargs, arch, family)
        sizes = _resnet_kwargs(backbone) if family == "resnet" else _convnext_kwargs(backbone)
        kwargs["backbone_kwargs"] = {**sizes, **given}
        kwargs.setdefault("drop_path_rate", 0.0 if family == "resnet" else 0.4)
    simpool = any(k.startswith("simpool.") for k in backbone)
    kwargs.setdefault("pool", "simpool" if simpool else (TOKEN_POOL if family == "vit" else "avg"))
    if kwargs["pool"] == "simpool":
        kwargs["pool_kwargs"] = _simpool_kwargs(backbone, "simpool.", kwargs.get("pool_kwargs"), args)
        if family == "vit":
            kwargs.setdefault("placement", "before_norm")  # forward(): x = self.simpool(x); return self.norm(x)

    linears = [v for k, v in network.items() if re.fullmatch(r"head\.mlp\.\d+\.weight", k) and v.dim() == 2]
    last = network.get("head.last_layer.weight_v")  # (out_dim, bottleneck)
    if last is not None and linears:
        kwargs.setdefault("out_dim", last.shape[0])
        kwargs.setdefault("head_bottleneck_dim", last.shape[1])
        kwargs.setdefault("head_layers", len(linears))
        kwargs.setdefault("head_hidden_dim", linears[0].shape[0] if len(linears) > 1 else last.shape[1])
        kwargs.setdefault("use_bn_in_head", any(k.startswith("head.mlp.") and k.endswith("running_mean") for k in network))
    elif any(k.startswith("head.") for k in network):
        raise ValueError("the DINO head is incomplete: expected head.mlp.<i>.weight and head.last_layer.weight_v")
    for name in DINO_ARGS:
        if name in args:
            kwargs.setdefault(name, args[name])
    return kwargs
