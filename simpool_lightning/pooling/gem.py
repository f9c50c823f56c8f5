"""Generalized mean (GeM) pooling: a power mean of the features, with a learnable exponent."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import Pool
from .registry import register_pool

__all__ = ["GeMPool"]


@register_pool("gem")
class GeMPool(Pool):
    """Generalized mean pooling (GeM; Radenović et al., "Fine-tuning CNN Image Retrieval with No Human Annotation", TPAMI 2018).

    Per channel, ``u = (1/N sum_j max(x_j, eps) ** p) ** (1/p)``: ``p = 1`` is GAP and ``p -> inf``
    is max pooling. As in the paper, one exponent is shared by all channels and the features are
    clamped to be positive (GeM was made for post-ReLU CNN features).

    Args:
        dim: channel count ``C``.
        p: initial exponent (3 in the paper).
        learnable: learn ``p`` (the paper's default) or keep it fixed.
        eps: clamp floor that keeps the power defined and its gradient finite.
    """

    def __init__(self, dim: int, p: float = 3.0, learnable: bool = True, eps: float = 1e-6) -> None:
        super().__init__(dim)
        if p <= 0:
            raise ValueError(f"GeM exponent p must be positive, got {p}")
        exponent = torch.tensor(float(p))
        if learnable:
            self.p = nn.Parameter(exponent)
        else:
            self.register_buffer("p", exponent)
        self.eps = eps

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        # Powers overflow and lose precision in half precision, so the mean is taken in float32.
        p = self.p.float()
        pooled = x.float().clamp(min=self.eps).pow(p).mean(1).pow(1.0 / p)
        return pooled.to(x.dtype), None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p.item():.4g}, learnable={isinstance(self.p, nn.Parameter)}"
