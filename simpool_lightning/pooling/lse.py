"""Log-sum-exp (LSE) pooling: a smooth interpolation between average and max pooling."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .base import Pool
from .registry import register_pool

__all__ = ["LSEPool"]


@register_pool("lse")
class LSEPool(Pool):
    """Log-sum-exp pooling (Pinheiro & Collobert, "From Image-level to Pixel-level Labeling with Convolutional Networks", CVPR 2015).

    Per channel, ``u = 1/r log(1/N sum_j exp(r x_j))``: ``r -> 0`` is GAP and ``r -> inf`` is max
    pooling. One sharpness ``r`` is shared by all channels.

    Args:
        dim: channel count ``C``.
        r: initial sharpness (10, as the SimPool authors' learnable LSE).
        learnable: learn ``r`` or keep it fixed.
    """

    def __init__(self, dim: int, r: float = 10.0, learnable: bool = True) -> None:
        super().__init__(dim)
        if r <= 0:
            raise ValueError(f"LSE sharpness r must be positive, got {r}")
        sharpness = torch.tensor(float(r))
        if learnable:
            self.r = nn.Parameter(sharpness)
        else:
            self.register_buffer("r", sharpness)

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        # logsumexp subtracts the max before exponentiating, so large r * x cannot overflow;
        # float32 keeps the 1/r rescaling exact enough in half precision.
        r = self.r.float()
        pooled = (torch.logsumexp(r * x.float(), dim=1) - math.log(x.shape[1])) / r
        return pooled.to(x.dtype), None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r.item():.4g}, learnable={isinstance(self.r, nn.Parameter)}"
