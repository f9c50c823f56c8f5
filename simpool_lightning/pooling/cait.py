"""CaiT class-attention pooling: a class token refined by class-attention blocks over frozen features."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import Pool
from .registry import register_pool
from .vit import QueryAttention, QueryInit, initial_query, make_cls_token, patch_attention

__all__ = ["ClassAttentionBlock", "CaiTPool"]


class ClassAttentionBlock(nn.Module):
    """CaiT's class-attention block with LayerScale; the features are read, never updated.

    ``u <- u + gamma_1 * CA(LN([u; X]))``, then ``u <- u + gamma_2 * MLP(LN(u))``.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, init_values: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = QueryAttention(dim, num_heads, qkv_bias)
        self.gamma_1 = nn.Parameter(torch.full((dim,), init_values))
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.gamma_2 = nn.Parameter(torch.full((dim,), init_values))

    def forward(self, query: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Refine ``query`` ``(B, C)`` from ``x`` ``(B, N, C)``; return it and the attention ``(B, heads, 1 + N)``."""
        # CaiT normalises the class token together with the patches: LN([u; X]).
        tokens = self.norm1(torch.cat([query.unsqueeze(1), x], dim=1))
        out, attn = self.attn(tokens[:, 0], tokens[:, 1:])
        query = query + self.gamma_1 * out
        query = query + self.gamma_2 * self.mlp(self.norm2(query))
        return query, attn


@register_pool("cait")
class CaiTPool(Pool):
    """Class-attention pooling (Touvron et al., "Going deeper with Image Transformers", ICCV 2021).

    ``depth`` class-attention blocks refine a class token from the features (the iterations of the
    framework), then a final LayerNorm. The returned attention ``(B, num_heads, N)`` is the last
    block's, renormalised without the class token's weight on itself.

    Args:
        dim: channel count ``C``.
        num_heads: number of heads; must divide ``dim`` (4, as the SimPool authors' pooling zoo).
        depth: number of class-attention blocks (2 in CaiT; the SimPool authors' zoo uses 1).
        mlp_ratio: hidden width of each block's MLP, relative to ``dim``.
        qkv_bias: bias in the query, key and value maps.
        init_values: LayerScale initialisation (CaiT's 1e-5 for its 24-layer models).
        query: ``u^0``: ``"cls"``, a learned class token (CaiT); or ``"gap"``, the mean of the features.
    """

    has_attention = True

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        depth: int = 2,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: float = 1e-5,
        query: QueryInit = "cls",
    ) -> None:
        super().__init__(dim)
        if depth < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        self.blocks = nn.ModuleList(
            ClassAttentionBlock(dim, num_heads, mlp_ratio, qkv_bias, init_values) for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.cls_token = make_cls_token(dim, query)

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        query = initial_query(self.cls_token, x)
        for block in self.blocks:
            query, attn = block(query, x)
        return self.norm(query), patch_attention(attn)

    def extra_repr(self) -> str:
        query = "gap" if self.cls_token is None else "cls"
        heads = self.blocks[0].attn.num_heads
        return f"{super().extra_repr()}, num_heads={heads}, depth={len(self.blocks)}, query={query}"
