"""ViT-style attention pooling: a [CLS]-like query token attends to itself and the features."""
from __future__ import annotations

from typing import Literal, Optional

import torch
from torch import Tensor, nn

from .base import Pool
from .registry import register_pool

__all__ = ["QueryAttention", "QueryInit", "ViTPool", "initial_query", "make_cls_token", "patch_attention"]

QueryInit = Literal["cls", "gap"]


class QueryAttention(nn.Module):
    """Multi-head attention of one query token over ``[query; X]``.

    This is the [CLS] row of ViT's self-attention and CaiT's class attention:
    ``q = W_q u``, ``K = W_k [u; X]``, ``V = W_v [u; X]``, per head ``a = softmax(q K^T / sqrt(d_h))``
    over the ``1 + N`` tokens, output ``W_o concat_h(a_h V_h)``.

    Args:
        dim: channel count ``C``.
        num_heads: number of heads; must divide ``dim``.
        qkv_bias: bias in the query, key and value maps (ViT and CaiT have one).
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
        """Attend from ``query`` ``(B, C)`` over ``[query; x]``, ``x`` ``(B, N, C)``.

        Returns:
            ``(out, attn)``: out ``(B, C)``; attn ``(B, heads, 1 + N)``, index 0 being the query itself.
        """
        b, n, c = x.shape
        h = self.num_heads
        tokens = torch.cat([query.unsqueeze(1), x], dim=1)
        q = self.q(query).reshape(b, h, 1, c // h)
        k, v = self.kv(tokens).reshape(b, n + 1, 2, h, c // h).permute(2, 0, 3, 1, 4)  # each (B, h, 1 + N, C / h)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(-1)  # (B, h, 1, 1 + N)
        out = (attn @ v).reshape(b, c)
        return self.proj(out), attn.squeeze(2)


def patch_attention(attn: Tensor) -> Tensor:
    """Attention ``(B, heads, 1 + N)`` of a query over ``[query; X]`` -> ``(B, heads, N)`` over ``X``.

    The query's weight on itself is not a location, so it is dropped and the rest renormalised
    to sum to 1, as the attention contract asks.
    """
    patches = attn[..., 1:].float()  # renormalised in float32, so it sums to 1 under half precision too
    return patches / patches.sum(-1, keepdim=True)


def make_cls_token(dim: int, query: QueryInit) -> Optional[nn.Parameter]:
    """The learned [CLS] token ``(1, dim)`` for ``query="cls"``; ``None`` for ``"gap"``, whose query is GAP."""
    if query not in ("cls", "gap"):
        raise ValueError(f"query must be 'cls' or 'gap', got {query!r}")
    return nn.Parameter(torch.randn(1, dim) * 0.02) if query == "cls" else None


def initial_query(cls_token: Optional[Tensor], x: Tensor) -> Tensor:
    """The query token ``u^0`` ``(B, C)``: the learned [CLS] token, or GAP of ``x`` when there is none."""
    if cls_token is None:
        return x.mean(1)
    return cls_token.expand(x.shape[0], -1)


@register_pool("vit")
class ViTPool(Pool):
    """ViT-style attention pooling (Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale", ICLR 2021).

    One multi-head attention layer in which a query token attends to itself and the features, as
    ViT's [CLS] token does in each block, here once at the end of the network:
    ``u = W_o concat_h(softmax(q_h K_h^T / sqrt(d_h)) V_h)`` over ``[u^0; X]``. The returned
    attention ``(B, num_heads, N)`` is the query's attention to the features, renormalised without
    its weight on itself.

    Args:
        dim: channel count ``C``.
        num_heads: number of heads; must divide ``dim`` (4, as the SimPool authors' pooling zoo).
        qkv_bias: bias in the query, key and value maps.
        query: ``u^0``: ``"cls"``, a learned [CLS] token (ViT); or ``"gap"``, the mean of the
            features, the initialisation the SimPool paper argues for.
    """

    has_attention = True

    def __init__(self, dim: int, num_heads: int = 4, qkv_bias: bool = True, query: QueryInit = "cls") -> None:
        super().__init__(dim)
        self.attn = QueryAttention(dim, num_heads, qkv_bias)
        self.cls_token = make_cls_token(dim, query)

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        pooled, attn = self.attn(initial_query(self.cls_token, x), x)
        return pooled, patch_attention(attn)

    def extra_repr(self) -> str:
        query = "gap" if self.cls_token is None else "cls"
        return f"{super().extra_repr()}, num_heads={self.attn.num_heads}, query={query}"
