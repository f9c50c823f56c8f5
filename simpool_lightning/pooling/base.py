"""What every pool shares: input checking, maps <-> tokens, and the attention contract."""
from __future__ import annotations

from typing import ClassVar, Optional

import torch
from torch import Tensor, nn

__all__ = ["Pool", "to_tokens"]


def to_tokens(x: Tensor, dim: int) -> tuple[Tensor, Optional[tuple[int, int]]]:
    """View features as tokens.

    Args:
        x: maps ``(B, C, H, W)`` or tokens ``(B, N, C)``, ``C == dim``.
        dim: the channel count the pool was built for.

    Returns:
        ``(tokens, hw)``: tokens ``(B, N, C)`` (a view for maps: no copy) and ``(H, W)`` for maps,
        ``None`` for tokens.
    """
    if x.dim() == 4:
        if x.shape[1] != dim:
            raise ValueError(
                f"expected maps of shape (B, {dim}, H, W), got {tuple(x.shape)}: channel count {x.shape[1]} != {dim}"
            )
        b, c, h, w = x.shape
        return x.flatten(2).transpose(1, 2), (h, w)
    if x.dim() == 3:
        if x.shape[2] != dim:
            raise ValueError(
                f"expected tokens of shape (B, N, {dim}), got {tuple(x.shape)}: channel count {x.shape[2]} != {dim}"
            )
        return x, None
    raise ValueError(
        f"expected maps (B, {dim}, H, W) or tokens (B, N, {dim}), got a {x.dim()}-d tensor of shape {tuple(x.shape)}"
    )


class Pool(nn.Module):
    """Base class of every pool in the zoo.

    A subclass implements :meth:`pool_tokens` on tokens ``(B, N, C)``; this class turns maps into
    tokens, checks shapes, and reshapes the attention back to ``(B, heads, H, W)`` for map input.

    Attributes:
        dim: input channel count ``C``.
        out_dim: width of the pooled output.
        has_attention: whether :meth:`forward_with_attention` returns a map rather than ``None``.
    """

    has_attention: ClassVar[bool] = False

    def __init__(self, dim: int, out_dim: Optional[int] = None) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = dim
        self.out_dim = dim if out_dim is None else out_dim

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        """Pool tokens ``(B, N, C)`` into ``(B, out_dim)``; also return attention ``(B, heads, N)`` or ``None``.

        ``hw`` is the ``(H, W)`` grid the tokens came from (row-major) for map input, ``None`` for
        token input; only pools that work over space need it.
        """
        raise NotImplementedError

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """Pool and return the spatial weighting.

        Args:
            x: maps ``(B, C, H, W)`` or tokens ``(B, N, C)``.

        Returns:
            ``(pooled, attn)``: pooled ``(B, out_dim)``; attn ``(B, heads, H, W)`` for maps,
            ``(B, heads, N)`` for tokens, non-negative and summing to 1 over locations, or ``None``
            for a method with no spatial weighting.
        """
        tokens, hw = to_tokens(x, self.dim)
        pooled, attn = self.pool_tokens(tokens, hw)
        if attn is not None and hw is not None:
            attn = attn.unflatten(-1, hw)
        return pooled, attn

    def forward(self, x: Tensor) -> Tensor:
        """Pool maps ``(B, C, H, W)`` or tokens ``(B, N, C)`` into ``(B, out_dim)``."""
        return self.forward_with_attention(x)[0]

    def extra_repr(self) -> str:
        return f"dim={self.dim}, out_dim={self.out_dim}"
