"""Global average, max and their combinations: the pools with no spatial weighting."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .base import Pool
from .registry import register_pool

__all__ = ["AvgPool", "MaxPool", "AvgMaxPool", "CatAvgMaxPool"]


@register_pool("avg")
class AvgPool(Pool):
    """Global average pooling (GAP; Lin et al., "Network In Network", ICLR 2014)."""

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        return x.mean(1), None


@register_pool("max")
class MaxPool(Pool):
    """Global max pooling (Tolias et al., "Particular object retrieval with integral max-pooling", ICLR 2016)."""

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        return x.amax(1), None


@register_pool("avgmax")
class AvgMaxPool(Pool):
    """Mean of global average and max pooling, as timm's ``avgmax``."""

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        return 0.5 * (x.mean(1) + x.amax(1)), None


@register_pool("catavgmax")
class CatAvgMaxPool(Pool):
    """Global average and max pooling concatenated, as timm's ``catavgmax``: ``out_dim = 2 * dim``."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim, out_dim=2 * dim)

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        return torch.cat([x.mean(1), x.amax(1)], dim=1), None
