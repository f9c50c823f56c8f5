"""Any timm model as a feature extractor with a pluggable pool at the ``forward_features`` seam.

The backbone's own head is removed (``num_classes=0, global_pool=""``); a pool from the registry,
or ``"token"`` (a ViT's own [CLS] token), turns its features into one vector per image.

Starting weights come from one argument, ``pretrained_path``: any file that
:func:`simpool_lightning.weights.read_pretrained` reads (an ``ImageClassifier`` or ``DINO``
Lightning checkpoint, an official SimPool checkpoint, a plain timm state dict). Backbone and pool
load strictly (a plain timm file: the timm model only, the pool starts fresh); classification
heads are never loaded. Files are unpickled with ``weights_only=True`` unless the caller opts out.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Literal, Mapping, Optional

import timm
from torch import Tensor, nn

from ..pooling import create_pool, is_pool, list_pools
from ..weights import PretrainedWeights, WeightsMismatchError, check_fits, read_pretrained

__all__ = ["PooledBackbone", "PoolPlacement", "TOKEN_POOL", "WeightsMismatchError"]

TOKEN_POOL = "token"
PoolPlacement = Literal["after_norm", "before_norm"]



def _load_strict(module: nn.Module, state: Mapping[str, Tensor], what: str, hint: str = "", path: Optional[str] = None) -> None:
    """Load ``state`` into ``module``; every key and shape must match, else :class:`WeightsMismatchError`."""
    check_fits({k: tuple(v.shape) for k, v in module.state_dict().items()}, state, what, hint, path)
    module.load_state_dict(state)


def _create_timm_model(name: str, pretrained: bool, weights: Optional[PretrainedWeights], **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)``, with timm's pretrained weights or a plain timm state dict loaded strictly."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('_')[0]}*")[:10]
        raise ValueError(f"unknown timm backbone {name!r}; similar names: {close} (see timm.list_models())")
    try:
        model = timm.create_model(name, pretrained=pretrained, **kwargs)
    except (OSError, RuntimeError) as err:
        if not pretrained:
            raise
        raise RuntimeError(
            f"could not load pretrained weights for {name!r} ({type(err).__name__}: {err}). This machine may be "
            f"offline: download the weights elsewhere and pass pretrained_path=<file>."
        ) from err
    if weights is not None:
        classifier = model.pretrained_cfg.get("classifier") or ()
        dropped = {f"{c}.{p}" for c in ((classifier,) if isinstance(classifier, str) else classifier) for p in ("weight", "bias")}
        _load_strict(
            model,
            {k: v for k, v in weights.state.items() if k not in dropped},
            f"pretrained_path {weights.path!r} ({weights.source})",
            f"check the backbone name and backbone_kwargs against the file's architecture (timm {name!r}; its "
            f"classifier {sorted(dropped)} is not loaded and the pool starts fresh)",
            weights.path,
        )
    return model


class PooledBackbone(nn.Module):
    """timm model -> features -> pool -> one vector per image.

    Args:
        name: any timm model name (ResNet, ConvNeXt, ViT/DeiT, Swin, ...).
        pool: a name from :func:`~simpool_lightning.pooling.list_pools`, or ``"token"`` for a ViT's
            own [CLS] token. For a ViT with any other pool the model is built without a class token,
            as the paper does.
        pool_kwargs: passed to :func:`~simpool_lightning.pooling.create_pool`.
        placement: ``"after_norm"`` pools the backbone's final features (the supervised default);
            ``"before_norm"`` pools the tokens before a ViT's final norm and then applies that norm
            (the DINO variant of the official code).
        pretrained: load timm's pretrained weights (needs the hub, or its cache).
        pretrained_path: start from this file instead: a Lightning checkpoint of ``ImageClassifier``
            or ``DINO`` (teacher), an official SimPool checkpoint, or a plain timm state dict
            (:func:`~simpool_lightning.weights.read_pretrained`). Backbone and pool load strictly (a plain timm file: the timm
            model only); a mismatch raises :class:`WeightsMismatchError` listing the keys.
        weights_only: unpickle ``pretrained_path`` with ``weights_only=True`` (tensors, plain
            containers and ``argparse.Namespace``, so official checkpoints read with it); ``False``
            only for a file you trust that holds other objects.
        model_kwargs: passed to ``timm.create_model`` (``img_size``, ``patch_size``, ``depth``,
            ``drop_path_rate`` ...).

    Attributes:
        model: the timm model, head removed.
        pool: the pooling module (``None`` for ``"token"``).
        num_features: channels of the backbone features.
        out_dim: width of :meth:`forward`'s output.
    """

    def __init__(
        self,
        name: str,
        pool: str = "simpool",
        pool_kwargs: Optional[dict[str, Any]] = None,
        placement: PoolPlacement = "after_norm",
        pretrained: bool = False,
        pretrained_path: Optional[str] = None,
        *,
        weights_only: bool = True,
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if pool != TOKEN_POOL and not is_pool(pool):
            raise ValueError(f"unknown pool {pool!r}; known pools: {', '.join(list_pools())} and {TOKEN_POOL!r}")
        if placement not in ("after_norm", "before_norm"):
            raise ValueError(f"placement must be 'after_norm' or 'before_norm', got {placement!r}")
        if pretrained and pretrained_path is not None:
            raise ValueError(f"give pretrained=True (timm's weights) or pretrained_path={pretrained_path!r}, not both")
        self.pool_name = pool
        self.pool_kwargs: dict[str, Any] = dict(pool_kwargs or {})
        self.placement = placement

        weights = None
        if pretrained_path is not None:
            opt_out = "set pretrained_weights_only=False (PooledBackbone: weights_only=False)"
            weights = read_pretrained(os.fspath(pretrained_path), weights_only, opt_out)
        timm_weights = weights if weights is not None and weights.timm_only else None

        kwargs = dict(model_kwargs, num_classes=0, global_pool="")
        token = pool == TOKEN_POOL
        try:  # ViT-like models take class_token; the paper builds them without one unless pooling with it
            vit_kwargs = dict(kwargs, class_token=token, global_pool="token" if token else "")
            self.model = _create_timm_model(name, pretrained, timm_weights, **vit_kwargs)
        except TypeError as err:
            if "class_token" not in str(err):
                raise
            self.model = _create_timm_model(name, pretrained, timm_weights, **kwargs)
        if token and getattr(self.model, "cls_token", None) is None:
            raise ValueError(f"pool 'token' needs a model with a class token (a ViT); {name!r} has none")
        self.num_features: int = self.model.num_features
        self.num_prefix_tokens: int = getattr(self.model, "num_prefix_tokens", 0)
        self.channels_last_output = getattr(self.model, "output_fmt", "NCHW") == "NHWC"

        self.final_norm: nn.Module = nn.Identity()
        if placement == "before_norm":
            if not isinstance(getattr(self.model, "norm", None), nn.Module) or pool == TOKEN_POOL:
                raise ValueError(f"placement='before_norm' needs a ViT-like model with a final .norm and a pool; got {name!r}, {pool!r}")
            self.final_norm, self.model.norm = self.model.norm, nn.Identity()

        self.pool: Optional[nn.Module] = None
        if pool != TOKEN_POOL:
            self.pool = create_pool(pool, self.num_features, **(pool_kwargs or {}))
        elif pool_kwargs:
            raise ValueError(f"pool 'token' takes no pool_kwargs, got {pool_kwargs}")
        self.out_dim: int = self.num_features if self.pool is None else self.pool.out_dim

        # timm's NormMlpClassifierHead (ConvNeXt and kin) normalises the pooled vector before its
        # classifier; keep that step, after whichever pool, with its (pretrained) weights.
        head_norm = getattr(getattr(self.model, "head", None), "norm", None)
        if isinstance(head_norm, nn.LayerNorm) and self.pool is not None and self.out_dim == self.num_features:
            self.final_norm = nn.LayerNorm(self.num_features, eps=head_norm.eps)
            self.final_norm.load_state_dict(head_norm.state_dict())
            self.model.head.norm = nn.Identity()

        if weights is not None and not weights.timm_only:
            self._load_pretrained(weights)

    def _load_pretrained(self, weights: PretrainedWeights) -> None:
        """Backbone and pool from our Lightning checkpoints or an official one, strictly."""
        recorded = weights.recorded
        if weights.official and self.pool_name == "simpool" and "gamma" in recorded and recorded["gamma"] != self.pool.gamma:
            # gamma is no weight: the strict load cannot see it, but the official args record it.
            raise ValueError(
                f"pretrained_path {weights.path!r} was trained with SimPool gamma={recorded['gamma']}, this model has "
                f"gamma={self.pool.gamma}: set pool_kwargs.gamma (null for none) as the checkpoint was trained"
            )
        if weights.official:
            hint = f"the checkpoint pools with {recorded.get('pool')!r}, placement={recorded.get('placement', 'after_norm')!r}"
        else:
            hint = f"the checkpoint's model: {recorded}" if recorded else ""
        _load_strict(self, weights.state, f"pretrained_path {weights.path!r} ({weights.source})", hint, weights.path)
        if not weights.official and (recorded.get("pool"), recorded.get("pool_kwargs") or {}) != (self.pool_name, self.pool_kwargs):
            # Not weights (gamma, say), so the strict load cannot see them: say so rather than fine-tune another pool.
            warnings.warn(
                f"pretrained_path {weights.path!r} was trained with pool={recorded.get('pool')!r}, "
                f"pool_kwargs={recorded.get('pool_kwargs')}; this model has pool={self.pool_name!r}, "
                f"pool_kwargs={self.pool_kwargs}",
                stacklevel=3,
            )

    def forward_features(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images -> maps ``(B, C, h, w)`` or tokens ``(B, N, C)``.

        For ``"token"`` the tokens keep the [CLS] token first; otherwise prefix tokens (class,
        register) are stripped.
        """
        x = self.model.forward_features(images)
        if x.dim() == 4 and self.channels_last_output:
            x = x.permute(0, 3, 1, 2)
        if x.dim() == 3 and self.pool is not None and self.num_prefix_tokens:
            x = x[:, self.num_prefix_tokens :]
        return x

    def pool_features(self, features: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Features from :meth:`forward_features` -> ``(pooled (B, out_dim), attention or None)``."""
        if self.pool is None:
            return features[:, 0], None
        pooled, attn = self.pool.forward_with_attention(features)
        return self.final_norm(pooled), attn

    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, out_dim)``."""
        return self.pool_features(self.forward_features(images))[0]

    def forward_with_attention(self, images: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Pooled ``(B, out_dim)`` and the spatial attention ``(B, heads, h, w)``, or ``None``.

        For ``"token"`` the attention is the last block's [CLS] attention over the patches;
        token attention of other pools comes back on the patch grid.
        """
        if self.pool is None:
            return self._token_forward_with_attention(images)
        pooled, attn = self.pool_features(self.forward_features(images))
        if attn is not None and attn.dim() == 3:
            attn = attn.unflatten(-1, self.patch_grid(images))
        return pooled, attn

    @property
    def has_attention(self) -> bool:
        return self.pool is None or self.pool.has_attention

    def patch_grid(self, images: Tensor) -> tuple[int, int]:
        """``(h, w)`` of a ViT's patch tokens for ``images`` ``(B, 3, H, W)``."""
        patch_embed = getattr(self.model, "patch_embed", None)
        if patch_embed is None or not hasattr(patch_embed, "patch_size"):
            raise ValueError(f"{type(self.model).__name__} has no patch grid: its tokens cannot be shown as a map")
        ph, pw = patch_embed.patch_size
        return images.shape[-2] // ph, images.shape[-1] // pw

    def _token_forward_with_attention(self, images: Tensor) -> tuple[Tensor, Tensor]:
        attn_module = self.model.blocks[-1].attn
        if not all(hasattr(attn_module, a) for a in ("qkv", "q_norm", "k_norm", "num_heads", "scale")):
            raise ValueError(f"[CLS] attention needs timm's standard Attention, got {type(attn_module).__name__}")
        captured: list[Tensor] = []
        # timm's fused attention returns no weights: recompute them from the block's input.
        handle = attn_module.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
        try:
            features = self.forward_features(images)
        finally:
            handle.remove()
        x = captured[0]
        b, n, _ = x.shape
        heads = attn_module.num_heads
        q, k, _ = attn_module.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k = attn_module.q_norm(q), attn_module.k_norm(k)
        cls_attn = ((q[:, :, :1] * attn_module.scale) @ k.transpose(-2, -1)).softmax(-1)[:, :, 0]  # (B, heads, n)
        patches = cls_attn[:, :, self.num_prefix_tokens :]
        patches = patches / patches.sum(-1, keepdim=True)  # over patches only, as maps are shown
        return features[:, 0], patches.unflatten(-1, self.patch_grid(images))

