"""Squeeze-and-excitation (SE) pooling: GAP re-weighted by a channel gate computed from GAP itself."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import Pool
from .registry import register_pool

__all__ = ["SEPool", "excitation_mlp"]


def excitation_mlp(dim: int, reduction: int) -> nn.Sequential:
    """SE's bottleneck MLP ``W_2 relu(W_1 z)``, ``dim -> dim // reduction -> dim``, on channel-last input.

    Shared by SE, GE (its θ+ variant) and CBAM's channel attention, which all use this excitation.
    """
    if reduction < 1:
        raise ValueError(f"reduction must be a positive int, got {reduction}")
    hidden = max(1, dim // reduction)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))


@register_pool("se")
class SEPool(Pool):
    """Squeeze-and-excitation pooling (Hu et al., "Squeeze-and-Excitation Networks", CVPR 2018).

    Squeeze ``z = GAP(X)``, excite ``s = sigmoid(W_2 relu(W_1 z))``, pool the re-weighted features:
    ``u = GAP(s * X) = s * z``. The gate is per channel and the same at every location, so SE has
    no spatial attention (``forward_with_attention`` returns ``None``). The SimPool authors' code
    wraps the gate in a residual and a ReLU, as inside a ResNet block; the pool here is the
    method itself.

    Args:
        dim: channel count ``C``.
        reduction: bottleneck ratio ``r`` of the excitation MLP (16 in the paper).
    """

    def __init__(self, dim: int, reduction: int = 16) -> None:
        super().__init__(dim)
        self.excitation = excitation_mlp(dim, reduction)

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        z = x.mean(1)
        return z * torch.sigmoid(self.excitation(z)), None
