"""What ``pretrained_path`` reads: a backbone and pool under ``PooledBackbone``'s names, from any file kind.

- a Lightning checkpoint of ``ImageClassifier`` (its ``net.backbone``) or of ``DINO`` (its
  teacher's backbone, as DINO's evaluations take it);
- an official SimPool checkpoint (the authors' timm fork's ``.pth.tar`` with ``state_dict``, or
  their DINO fork's ``student`` / ``teacher`` file: the teacher's backbone; or that backbone alone,
  DINO's ``*_pretrain.pth`` format), renamed by :mod:`simpool_lightning.weights.official`, with the
  SimPool-mode ViT's position embedding resampled as the fork's forward does (:mod:`.pos_embed`);
- a plain timm state dict (``.pth`` / ``.safetensors``, optionally under ``model``): the timm
  model's own names; the pool starts fresh.

Classification and DINO heads are never part of it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from torch import Tensor

from .io import StateDict, read_file, strip_prefix
from .official import (
    TOKEN_POOL,
    classifier_rules,
    dino_family,
    dino_from_official,
    dino_network_of_bare,
    family_of_keys,
    from_official,
    parse_official,
)

__all__ = ["PretrainedWeights", "read_pretrained"]

# Where each of our LightningModules keeps the backbone that fine-tuning starts from.
_LIGHTNING_BACKBONES = (("net.backbone.", "ImageClassifier checkpoint"), ("teacher.backbone.", "DINO checkpoint (teacher)"))
_OFFICIAL_ENTRIES = ("student", "teacher", "state_dict", "state_dict_ema")
_RECORDED = ("backbone", "backbone_kwargs", "pool", "pool_kwargs", "placement")


@dataclass(frozen=True)
class PretrainedWeights:
    """A backbone's weights read from ``path``.

    Attributes:
        path: the file.
        source: what the file is, for messages (``"ImageClassifier checkpoint"``, ...).
        state: ``PooledBackbone`` state (``model.*``, ``pool.*``, ``final_norm.*``); for a plain
            timm file (``timm_only``) the timm model's state under timm's names.
        timm_only: the file holds a timm model only: no pool, classifier keys still in it.
        recorded: what the file says of the model that is not a weight (``pool``,
            ``pool_kwargs``, ``placement``, ``backbone``, ``backbone_kwargs``, ``gamma``), where known.
        official: an official SimPool checkpoint.
    """

    path: str
    source: str
    state: StateDict
    timm_only: bool = False
    official: bool = False
    recorded: dict[str, Any] = field(default_factory=dict)


def _from_lightning(checkpoint: Mapping[str, Any], path: str) -> PretrainedWeights:
    state = checkpoint.get("state_dict") or {}
    for prefix, source in _LIGHTNING_BACKBONES:
        backbone = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if backbone:
            break
    else:
        raise ValueError(
            f"pretrained_path {path!r} is a Lightning checkpoint with no backbone under "
            f"{[p for p, _ in _LIGHTNING_BACKBONES]}; its modules: {sorted({k.split('.')[0] for k in state})}"
        )
    hp = checkpoint.get("hyper_parameters") or {}
    return PretrainedWeights(path, source, backbone, recorded={k: hp[k] for k in _RECORDED if k in hp})


def _from_official(checkpoint: Mapping[str, Any], path: str) -> PretrainedWeights:
    parsed = parse_official(checkpoint)
    if parsed.kind == "dino":
        teacher = {k: v for k, v in parsed.teacher.items() if k.startswith("backbone.")}
        family = dino_family(teacher)
        simpool = any(k.startswith("backbone.simpool.") for k in teacher)
        ours = dino_from_official(teacher, family, simpool)
        recorded: dict[str, Any] = {"pool": "simpool" if simpool else (TOKEN_POOL if family == "vit" else "avg")}
        if simpool and family == "vit":
            recorded["placement"] = "before_norm"
    else:
        if parsed.state is None:
            raise ValueError(f"the checkpoint has no 'state_dict'; its entries: {list(checkpoint)[:10]}")
        family = family_of_keys(parsed.state)
        ours = from_official(parsed.state, classifier_rules(family))
        pool_prefix = "backbone.pool."
        recorded = {"pool": "simpool" if any(k.startswith(pool_prefix) for k in ours) else None}
    if "gamma" in parsed.args:
        recorded["gamma"] = parsed.args["gamma"]
    backbone = {k[len("backbone.") :]: v for k, v in ours.items() if k.startswith("backbone.")}
    return PretrainedWeights(path, "an official SimPool checkpoint", backbone, official=True, recorded=recorded)


def _from_timm(checkpoint: Any, path: str) -> PretrainedWeights:
    """A plain timm file: bare, or under ``model`` (DeiT-style); DDP's ``module.`` dropped."""
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, Mapping) else checkpoint
    if not isinstance(state, Mapping) or not all(isinstance(v, Tensor) for v in state.values()):
        entries = list(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint).__name__
        raise ValueError(
            f"pretrained_path {path!r} is none of: a Lightning checkpoint ('pytorch-lightning_version', 'state_dict'), "
            f"an official SimPool checkpoint (one of {_OFFICIAL_ENTRIES}), a plain state dict of tensors; it holds {entries}"
        )
    return PretrainedWeights(path, "a plain timm state dict", strip_prefix(state, "module."), timm_only=True)


def read_pretrained(path: Union[str, os.PathLike], weights_only: bool, opt_out: str) -> PretrainedWeights:
    """Read ``path`` (any kind in the module docstring) into backbone weights under our names.

    Args:
        path: the file.
        weights_only: unpickle tensors and plain containers only.
        opt_out: how the caller turns ``weights_only`` off, for the refusal's message.

    Raises:
        FileNotFoundError, pickle.UnpicklingError: see :func:`~simpool_lightning.weights.read_file`.
        ValueError: the file is none of the kinds, or a Lightning checkpoint without a backbone.
    """
    path = os.fspath(path)
    checkpoint = read_file(path, weights_only, f"pretrained_path {path!r}", opt_out)
    if isinstance(checkpoint, Mapping) and "pytorch-lightning_version" in checkpoint:
        return _from_lightning(checkpoint, path)
    # DINO's *_pretrain.pth: a backbone alone, official when its names are the fork's own (SimPool,
    # ConvNeXt); a ViT or ResNet in timm's names reads as a plain timm file, whose pool may start fresh.
    official = isinstance(checkpoint, Mapping) and (
        any(k in checkpoint for k in _OFFICIAL_ENTRIES) or dino_network_of_bare(checkpoint, headless_timm=False) is not None
    )
    if official:
        try:
            return _from_official(checkpoint, path)
        except (ValueError, NotImplementedError) as err:
            raise type(err)(f"pretrained_path {path!r} (an official SimPool checkpoint): {err}") from err
    return _from_timm(checkpoint, path)
