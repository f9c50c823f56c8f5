"""Gather-excite (GE) pooling: GAP of the features re-weighted by a gate gathered from their neighbourhoods."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Pool
from .grid import tokens_to_grid
from .registry import register_pool
from .se import excitation_mlp

__all__ = ["GatherExcitePool"]


@register_pool("ge")
class GatherExcitePool(Pool):
    """Gather-excite pooling (Hu et al., "Gather-Excite: Exploiting Feature Context in Convolutional Neural Networks", NeurIPS 2018).

    Gather: aggregate the features over neighbourhoods of extent ``e`` (GE-θ⁻: average pooling
    with window ``2e - 1`` and stride ``e``; GE-θ: ``log2 e`` strided 3x3 depthwise convolutions
    with batch norm; ``e = 0``: the whole map, i.e. GAP). Excite: optionally SE's MLP (GE-θ⁺), then
    a sigmoid gate, upsampled (nearest) back to the grid. Pool: ``u = GAP(gate * X)``.

    The gate ``g_{jc}`` weighs location ``j`` per channel ``c``; the returned attention
    ``(B, 1, N)`` is its mean over channels, normalised over locations: the spatial weighting GE
    applies on average. With ``e = 0`` the gate is the same everywhere and the attention uniform.
    The SimPool authors' code (GE-θ⁺, ``e = 2``, the defaults here) wraps the gate in a residual and
    a ReLU, as inside a ResNet block; the pool here is the method itself.

    A spatial gather needs the grid: tokens are taken to lie on a square grid (see
    :func:`tokens_to_grid`); ``extent=0`` works on any tokens.

    Args:
        dim: channel count ``C``.
        extent: gather extent ``e``: 0 (global) or a power of two.
        learnable_gather: GE-θ (depthwise convolutions) rather than GE-θ⁻ (average pooling).
        use_mlp: GE-θ⁺: pass the gathered context through SE's MLP before the gate.
        reduction: bottleneck ratio of that MLP.
    """

    has_attention = True

    def __init__(
        self,
        dim: int,
        extent: int = 2,
        learnable_gather: bool = True,
        use_mlp: bool = True,
        reduction: int = 16,
    ) -> None:
        super().__init__(dim)
        if extent != 0 and (extent < 2 or extent & (extent - 1)):
            raise ValueError(f"extent must be 0 (global) or a power of two >= 2, got {extent}")
        if extent == 0 and learnable_gather:
            raise ValueError(
                "a learnable global gather (GE-θ, extent=0) is a depthwise convolution as large as the map, "
                "which a pool for any input size cannot have; use learnable_gather=False"
            )
        self.extent = extent
        if learnable_gather:
            layers: list[nn.Module] = []
            for i in range(int(math.log2(extent))):
                if i > 0:
                    layers.append(nn.ReLU(inplace=True))
                layers += [nn.Conv2d(dim, dim, 3, stride=2, padding=1, groups=dim, bias=False), nn.BatchNorm2d(dim)]
            self.gather: Optional[nn.Sequential] = nn.Sequential(*layers)
        else:
            self.gather = None
        self.mlp = excitation_mlp(dim, reduction) if use_mlp else nn.Identity()

    def _gather(self, x: Tensor, hw: Optional[tuple[int, int]]) -> Tensor:
        """Tokens ``(B, N, C)`` -> gathered context ``(B, C, h, w)`` on a grid coarser by ``extent``."""
        if self.extent == 0:
            return x.mean(1)[:, :, None, None]
        grid = tokens_to_grid(x, hw)
        if self.gather is not None:
            return self.gather(grid)
        e = self.extent
        return F.avg_pool2d(grid, 2 * e - 1, stride=e, padding=e - 1, count_include_pad=False)

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        b, n, _ = x.shape
        context = self.mlp(self._gather(x, hw).permute(0, 2, 3, 1))  # channel-last (B, h, w, C) for the MLP
        if context.shape[1:3] != (1, 1):
            grid = hw if hw is not None else (math.isqrt(n),) * 2  # the grid _gather has checked
            context = F.interpolate(context.permute(0, 3, 1, 2), size=grid).permute(0, 2, 3, 1)
        gate = torch.sigmoid(context.flatten(1, 2))  # (B, N, C), or (B, 1, C) for a global gather
        pooled = (gate * x).mean(1)
        weights = gate.float().mean(-1).expand(b, n)
        return pooled, (weights / weights.sum(-1, keepdim=True)).unsqueeze(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, extent={self.extent}"
