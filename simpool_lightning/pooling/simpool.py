"""SimPool: attention-based pooling with a GAP query (Psomas et al., ICCV 2023, arXiv 2309.06891).

For features X = {x_1 .. x_N} (d channels, N locations), following the paper:

    q   = W_q mean_j(x_j)                           query from the GAP of the raw features
    k_j = W_k LN(x_j),  v_j = LN(x_j)               one LayerNorm for keys and values, no value projection
    a   = softmax_j(q . k_j * head_dim^-0.5)        per head: the attention map
    y   = sum_j a_j v_j                             or, with gamma,
    y   = (sum_j a_j (v_j - m + eps)^gamma)^(1/gamma) [+ beta]

Keys are never formed: q . (W_k v_j + b_k) = (W_k^T q) . v_j + q . b_k, and softmax cancels the
constant q . b_k, so each head needs one vector u = W_k^T q and one pass over the values:
O(d^2 + N d) per image instead of O(N d^2).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import Pool
from .simpool_mean import simpool_mean
from .simpool_power import MinMode, simpool_power
from .registry import register_pool

__all__ = ["SimPool", "MinMode"]

@register_pool("simpool")
class SimPool(Pool):
    """SimPool (Psomas et al., "Keep It SimPool", ICCV 2023).

    Parameter names (``norm_patches``, ``wq``, ``wk``, ``beta``) match the official module, so its
    state dicts load unchanged.

    Args:
        dim: channels ``d`` of the features.
        num_heads: attention heads; ``dim`` must be divisible by it.
        qkv_bias: bias in ``wq`` and ``wk``.
        qk_scale: logit scale; ``head_dim ** -0.5`` when ``None``.
        gamma: exponent of the power mean of the values (the paper uses 1.25 for transformers and
            2.0 for CNNs); ``None`` takes the plain attention-weighted mean.
        use_beta: add a learnable scalar after the power mean (only with ``gamma``).
        min_mode: the minimum ``m`` that shifts the values before the power. ``"batch"``: one
            minimum over the whole batch, as the official code (a sample's output then depends on
            its batch mates); ``"sample"``: one per sample, so outputs do not depend on the batch and
            equal the official ones at batch size 1; ``"channel"``: one per sample and channel
            (timm's ``SimPool2d``).
        eps: added after the shift so that the power's base is positive.

    Low-precision input (fp16, bf16, or any autocast) is computed in float32 and returned in the
    input's dtype: the logits and the power mean overflow half precision for large features.
    """

    has_attention = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        gamma: Optional[float] = None,
        use_beta: bool = False,
        min_mode: MinMode = "sample",
        eps: float = 1e-6,
    ) -> None:
        super().__init__(dim)
        if num_heads <= 0 or dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads ({num_heads})")
        if gamma is not None and not gamma > 0:
            raise ValueError(f"gamma must be > 0 or None, got {gamma}")
        if use_beta and gamma is None:
            raise ValueError("use_beta=True needs a gamma: beta is added after the power mean")
        if gamma is not None and not eps > 0:
            raise ValueError(f"eps must be > 0 with a gamma (the power's base is at least eps), got {eps}")
        if min_mode not in ("batch", "sample", "channel"):
            raise ValueError(f"min_mode must be 'batch', 'sample' or 'channel', got {min_mode!r}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = qk_scale if qk_scale is not None else self.head_dim**-0.5
        self.gamma = None if gamma is None else float(gamma)
        self.use_beta = use_beta
        self.min_mode = min_mode
        self.eps = eps

        self.norm_patches = nn.LayerNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        if use_beta:
            self.beta = nn.Parameter(torch.zeros(1))

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Tensor]:
        """Pool tokens.

        Args:
            x: tokens ``(B, N, dim)``.

        Returns:
            ``(pooled, attn)``: pooled ``(B, dim)`` in ``x.dtype``; attn ``(B, num_heads, N)`` float32.
        """
        out_dtype = x.dtype
        with torch.autocast(x.device.type, enabled=False):
            pooled, attn = self._pool_fp32(x.float())
        return pooled.to(out_dtype), attn

    def _pool_fp32(self, x: Tensor) -> tuple[Tensor, Tensor]:
        norm = self.norm_patches
        params = [p.float() for p in (norm.weight, norm.bias, self.wq.weight, self.wk.weight)]
        bq = None if self.wq.bias is None else self.wq.bias.float()
        if self.gamma is None:
            return simpool_mean(x, *params, bq, self.num_heads, self.scale, norm.eps)
        pooled, attn = simpool_power(
            x, *params, bq, self.num_heads, self.scale, norm.eps, self.gamma, self.min_mode, self.eps
        )
        if self.use_beta:
            pooled = pooled + self.beta.float()
        return pooled, attn

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, num_heads={self.num_heads}, gamma={self.gamma}, use_beta={self.use_beta}, "
            f"min_mode={self.min_mode!r}"
        )
