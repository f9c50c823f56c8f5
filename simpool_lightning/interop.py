"""Official SimPool checkpoints in and out (the authors' repository, billpsomas/simpool).

The layouts, their key mapping and what the keys and args tell of the architecture are pure
functions in :mod:`simpool_lightning.weights.official` (its docstring describes each layout).
Here whole models are built on them: :func:`load_official` reads a file into an
``ImageClassifier`` or ``DINO``; :func:`export_official` writes one back as the authors' code
saves it.

Official checkpoints store the training ``args`` as an ``argparse.Namespace``; files are read with
``weights_only=True`` and that one class allowed (:mod:`simpool_lightning.weights.io`), so they
load with the defaults. A file holding any other object is refused with a message that names the
opt-out, ``weights_only=False`` (only for files you trust). Files written by
:func:`export_official` hold tensors, numbers and strings only.

The DINO fork's SimPool-mode ViT resamples its position embedding at every forward (see
:mod:`simpool_lightning.weights.pos_embed`): the imported table is that resampling, made once, so
our ViT computes the authors' features at the training resolution. The table as the file stored it
stays on the backbone as the non-persistent buffer ``official_pos_embed``, and
:func:`export_official` writes it back unchanged while the model's table is still its resampling
(bit for bit); a changed table (after training) is written as the stored table that the fork's
forward resamples into it.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Mapping, Optional, Union

import timm
import torch
from timm.models import ConvNeXt, ResNet, VisionTransformer
from torch import Tensor, nn

from .models.backbone import TOKEN_POOL, PooledBackbone
from .models.classifier import ImageClassifier
from .models.dino import DINO
from .pooling import SimPool
from .weights import WeightsMismatchError, check_fits, parse_official, read_file
from .weights.official import (
    DINO_ARGS,
    KINDS,
    OFFICIAL_DINO_HEAD,
    SUPERVISED_LAYOUTS,
    Kind,
    Rules,
    classifier_kwargs,
    classifier_rules,
    detect_kind,
    dino_family,
    dino_from_official,
    dino_kwargs,
    dino_official_names,
    dino_to_official,
    from_official,
    to_official,
)

__all__ = ["CheckpointMismatchError", "Kind", "KINDS", "WeightsMismatchError", "export_official", "load_official"]

# The name this module raised before the error class moved next to the other weight loading.
CheckpointMismatchError = WeightsMismatchError


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


def _load_official_state(module: nn.Module, state: Mapping[str, Tensor], rules: Rules, what: str, hint: str = "") -> None:
    """Load ``state`` (official names) into ``module``; every key and shape must match (reported in official names)."""
    expected = {k: tuple(v.shape) for k, v in to_official(module.state_dict(), rules).items()}
    check_fits(expected, state, f"{what} (official key names)", hint)
    module.load_state_dict(from_official(state, rules))


# ---------------------------------------------------------------------- supervised and timm


def _load_classifier(checkpoint: Any, kind: Optional[str], ema: bool, model_kwargs: dict[str, Any]) -> ImageClassifier:
    parsed = parse_official(checkpoint, kind)
    state = parsed.ema_state if ema else parsed.state
    if ema and state is None:
        raise ValueError(f"ema=True, but the checkpoint has no 'state_dict_ema'; its entries: {list(checkpoint)[:10]}")
    if state is None:
        raise ValueError(f"the checkpoint has no 'state_dict'; its entries: {list(checkpoint)[:10]}")
    family, kwargs = classifier_kwargs(state, parsed.args, model_kwargs)
    _check_family(kwargs["backbone"], family)
    model = ImageClassifier(**kwargs)
    rules = classifier_rules(family)
    hint = "check backbone= and backbone_kwargs (e.g. num_heads) against the checkpoint's architecture"
    _load_official_state(model.net, state, rules, "state_dict_ema" if ema else "state_dict", hint)
    if model.ema is not None:  # the caller asked for an EMA (ema_decay): start it from the file's, if any
        ema_state = parsed.ema_state if parsed.ema_state is not None else state
        _load_official_state(model.ema.module, ema_state, rules, "EMA weights", hint)
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
    layout = SUPERVISED_LAYOUTS[family]
    allowed = ("simpool", TOKEN_POOL) if family == "vit" else ("simpool", "avg")
    if backbone.pool_name not in allowed:
        raise ValueError(f"the official {family} pools with {' or '.join(allowed)}, not {backbone.pool_name!r}")
    if backbone.pool_name == "simpool":
        _check_simpool_exportable(backbone.pool, use_beta=False, where=layout.pool[:-1])
    rules = layout.rules()
    state = to_official(model.net.state_dict(), rules)
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
        checkpoint["state_dict_ema"] = to_official(model.ema.module.state_dict(), rules)
    return checkpoint


# ---------------------------------------------------------------------- DINO

def _load_network(net: nn.Module, network: Mapping[str, Tensor], family: str, simpool: bool, what: str) -> None:
    """Load a DINO fork network (official names) into our ``MultiCropNet``; a backbone alone into its backbone."""
    hint = "check backbone= and backbone_kwargs (e.g. num_heads) against the checkpoint's architecture"
    with_head = any(k.startswith("head.") for k in network)
    target: nn.Module = net if with_head else net.backbone
    ours = target.state_dict() if with_head else {"backbone." + k: v for k, v in target.state_dict().items()}
    names = dino_official_names(ours, family, simpool)
    check_fits({names[k]: tuple(v.shape) for k, v in ours.items()}, network, f"{what} (official key names)", hint)
    state = dino_from_official(network, family, simpool)
    target.load_state_dict(state if with_head else {k[len("backbone.") :]: v for k, v in state.items()})
    if family == "vit" and simpool:
        # What the file stored, before the resampling of weights.pos_embed: export writes it back
        # unchanged while the table is untouched (not saved in our own checkpoints).
        net.backbone.register_buffer("official_pos_embed", network["backbone.pos_embed"].clone(), persistent=False)


def _load_dino(checkpoint: Any, model_kwargs: dict[str, Any]) -> DINO:
    parsed = parse_official(checkpoint, "dino")
    student = parsed.student if parsed.student is not None else parsed.teacher
    family = dino_family(student)
    kwargs = dino_kwargs(student, parsed.args, model_kwargs)
    _check_family(kwargs["backbone"], family)
    model = DINO(**kwargs)
    simpool = kwargs["pool"] == "simpool"
    _load_network(model.student, student, family, simpool, "student" if parsed.student is not None else "teacher")
    _load_network(model.teacher, parsed.teacher, family, simpool, "teacher")
    if parsed.center is not None:
        _load_official_state(model.criterion, {"center": parsed.center}, (("", ""),), "dino_loss")
    return model


def _dino_checkpoint(model: DINO) -> dict[str, Any]:
    backbone = model.student.backbone
    family = _family_of(backbone)
    simpool = backbone.pool_name == "simpool"
    official_pools = ("simpool", TOKEN_POOL if family == "vit" else "avg")
    if backbone.pool_name not in official_pools:
        raise ValueError(f"the official DINO {family} pools with {' or '.join(map(repr, official_pools))}, not {backbone.pool_name!r}")
    if simpool:
        if family == "vit" and backbone.placement != "before_norm":
            raise ValueError("the official DINO ViT pools the tokens before its final norm: use placement='before_norm'")
        # vision_transformer.py: SimPool(embed_dim, num_heads=1, qkv_bias=False, gamma=gamma, use_beta=True), and
        # sp.py creates beta only with a gamma; resnet.py and convnext.py: SimPool(dim, gamma=gamma), no beta.
        _check_simpool_exportable(
            backbone.pool, use_beta=family == "vit" and backbone.pool.gamma is not None, where="backbone.simpool"
        )
    hp = model.hparams
    different = {k: hp[k] for k, v in OFFICIAL_DINO_HEAD.items() if hp[k] != v}
    if different:
        warnings.warn(
            f"main_dino.py builds DINOHead with {OFFICIAL_DINO_HEAD}; this head has {different}: the official training "
            f"loop cannot resume from this file, though its eval scripts read the teacher's backbone",
            stacklevel=4,  # the caller of export_official
        )

    def official(net: nn.Module) -> dict[str, Tensor]:
        return dino_to_official(net.state_dict(), family, simpool, getattr(net.backbone, "official_pos_embed", None))

    # main_dino.py wraps the student in DDP, the teacher only when the network has batch norms.
    has_batchnorm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.student.modules())
    teacher_prefix = "module." if has_batchnorm else ""
    args = {name: hp[name] for name in DINO_ARGS}
    args.update(arch=hp.backbone, mode="simpool" if simpool else "official", gamma=backbone.pool.gamma if simpool else None)
    if family == "vit":
        args["patch_size"] = backbone.model.patch_embed.patch_size[0]
    return {
        "student": {"module." + k: v for k, v in official(model.student).items()},
        "teacher": {teacher_prefix + k: v for k, v in official(model.teacher).items()},
        # Our optimizer's groups are not the official ones: restart_from_checkpoint reports that it
        # cannot load this state and starts the optimizer afresh, as it does for any mismatch.
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": model.current_epoch,  # main_dino saves epoch + 1: the epochs done, where it resumes
        "args": args,  # a dict: nothing official reads it back, and our reader takes dicts and Namespaces alike
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
        kind: ``"supervised"``, ``"timm"`` or ``"dino"`` (see :mod:`simpool_lightning.weights.official`);
            ``None`` tells them apart by the file's entries. ``"dino"`` reads main_dino's
            ``checkpoint.pth`` (ViT, ResNet-50 or ConvNeXt, modes ``simpool`` and ``official``, with
            or without DDP's ``module.``) and files with one network or a backbone alone (a stripped
            teacher, DINO's ``*_pretrain.pth``): both networks start from it and the DINO head is
            built fresh (``out_dim`` and the head sizes from ``model_kwargs``).
        weights_only: unpickle tensors, plain containers and ``argparse.Namespace`` only (official
            files load with it); ``False`` for a file you trust that holds other objects.
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
        pickle.UnpicklingError: the file holds other objects and needs ``weights_only=False``.
        WeightsMismatchError: keys or shapes differ; lists the missing, unexpected and
            mis-shaped keys.
        ValueError: the architecture or gamma cannot be determined, or the file is not a checkpoint.
    """
    path = os.fspath(path)
    checkpoint = read_file(path, weights_only, f"checkpoint {path!r}", "pass weights_only=False")
    if (kind or detect_kind(checkpoint)) == "dino":
        if ema:
            raise ValueError("ema=True is for supervised checkpoints; a DINO checkpoint's EMA is its teacher")
        return _load_dino(checkpoint, model_kwargs).eval()
    return _load_classifier(checkpoint, kind, ema, model_kwargs).eval()


def export_official(
    model: Union[ImageClassifier, DINO], path: Union[str, os.PathLike], kind: Optional[Kind] = None
) -> None:
    """Write ``model`` as an official checkpoint that the authors' code loads.

    Args:
        model: an :class:`ImageClassifier` or a :class:`DINO` (ViT, ResNet or ConvNeXt).
        path: the file to write (``.pth.tar`` for supervised, by the official convention).
        kind: ``"supervised"`` (default): ``{'state_dict', 'state_dict_ema' (with an EMA), 'arch',
            'epoch', 'version'}``; ``"timm"``: the bare state dict; ``"dino"`` (a DINO model):
            main_dino's ``checkpoint.pth`` (``student``, ``teacher``, ``dino_loss``, ``args`` ...).

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
