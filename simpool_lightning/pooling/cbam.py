"""CBAM pooling: GAP of the features after CBAM's channel and then spatial attention."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import Pool
from .grid import tokens_to_grid
from .registry import register_pool
from .se import excitation_mlp

__all__ = ["CBAMPool"]


@register_pool("cbam")
class CBAMPool(Pool):
    """CBAM pooling (Woo et al., "CBAM: Convolutional Block Attention Module", ECCV 2018).

    Channel attention ``M_c = sigmoid(MLP(GAP(X)) + MLP(max(X)))`` (one MLP, SE's), ``X' = M_c * X``;
    spatial attention ``M_s = sigmoid(BN(conv_k([mean_c X'; max_c X'])))``, ``X'' = M_s * X'``;
    output ``u = GAP(X'')``. The returned attention ``(B, 1, N)`` is ``M_s`` normalised to sum to 1
    over locations.

    The spatial convolution needs the grid: tokens are taken to lie on a square grid (see
    :func:`tokens_to_grid`).

    Args:
        dim: channel count ``C``.
        reduction: bottleneck ratio of the channel MLP (16 in the paper).
        kernel_size: spatial convolution size, odd (7 in the paper).
    """

    has_attention = True

    def __init__(self, dim: int, reduction: int = 16, kernel_size: int = 7) -> None:
        super().__init__(dim)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size must be a positive odd int, so the spatial map keeps the grid; got {kernel_size}"
            )
        self.mlp = excitation_mlp(dim, reduction)
        # CBAM's spatial branch: a bias-free convolution followed by batch norm.
        self.spatial = nn.Sequential(
            nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(1),
        )

    def channel_gate(self, x: Tensor) -> Tensor:
        """``M_c``: tokens ``(B, N, C)`` -> gate ``(B, 1, C)`` in (0, 1)."""
        return torch.sigmoid(self.mlp(x.mean(1)) + self.mlp(x.amax(1))).unsqueeze(1)

    def spatial_gate(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> Tensor:
        """``M_s``: tokens ``(B, N, C)`` on grid ``hw`` -> gate ``(B, N)`` in (0, 1)."""
        descriptor = torch.stack([x.mean(-1), x.amax(-1)], dim=-1)  # (B, N, 2)
        return torch.sigmoid(self.spatial(tokens_to_grid(descriptor, hw))).flatten(1)

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        x = x * self.channel_gate(x)
        gate = self.spatial_gate(x, hw)
        pooled = (gate.unsqueeze(-1) * x).mean(1)
        weights = gate.float()
        return pooled, (weights / weights.sum(-1, keepdim=True)).unsqueeze(1)
