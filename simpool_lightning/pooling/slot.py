"""Slot-attention pooling: slots compete for locations over a few iterations; the slots are max-pooled."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .base import Pool
from .registry import register_pool

__all__ = ["SlotPool"]


@register_pool("slot")
class SlotPool(Pool):
    """Slot-attention pooling (Locatello et al., "Object-Centric Learning with Slot Attention", NeurIPS 2020).

    With ``X = LN(X)``, ``K = W_k X``, ``V = W_v X`` and slots ``S`` (``k x C``), each iteration does
    ``A = softmax over slots(W_q LN(S) K^T / sqrt(C))``: the slots compete for each location;
    ``a_i = (A_i + eps) / sum_j (A_ij + eps)``: per slot, weights over locations;
    ``S <- GRU(S, a V)``, ``S <- S + MLP(LN(S))``.
    The output is the channel-wise max over the slots, as in the SimPool authors' zoo; the returned
    attention ``(B, num_slots, N)`` is the last iteration's ``a``, each slot's weights over locations.

    The paper draws the initial slots from a learned Gaussian shared by all slots, so its output is
    random at test time too; here each slot has its own learned initial vector, which breaks the
    symmetry between slots deterministically. A GAP initialisation is not offered: slots that start
    equal get equal attention and updates and never separate, and a single slot makes the softmax
    over slots constant, so its attention is uniform and the pool degenerates to GAP of ``V``.

    Args:
        dim: channel count ``C`` (also the slot width).
        num_slots: number of slots ``k`` (3, as the SimPool authors' zoo).
        iterations: attention iterations (3 in the paper).
        mlp_ratio: hidden width of the slot MLP relative to ``dim`` (128 for 64-d slots in the paper).
        eps: added to the attention before the weighted mean, as in the paper.
    """

    has_attention = True

    def __init__(
        self, dim: int, num_slots: int = 3, iterations: int = 3, mlp_ratio: float = 2.0, eps: float = 1e-8
    ) -> None:
        super().__init__(dim)
        if num_slots < 1:
            raise ValueError(f"num_slots must be at least 1, got {num_slots}")
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        self.iterations = iterations
        self.eps = eps
        self.scale = dim**-0.5
        self.slots = nn.Parameter(torch.randn(num_slots, dim))
        self.norm_input = nn.LayerNorm(dim)
        self.norm_slots = nn.LayerNorm(dim)
        self.norm_mlp = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(dim, dim, bias=False)
        self.to_v = nn.Linear(dim, dim, bias=False)
        self.gru = nn.GRUCell(dim, dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        b, _, c = x.shape
        x = self.norm_input(x)
        k, v = self.to_k(x), self.to_v(x)
        slots = self.slots.expand(b, -1, -1)
        num_slots = slots.shape[1]
        for _ in range(self.iterations):
            q = self.to_q(self.norm_slots(slots))
            logits = (q @ k.transpose(1, 2)) * self.scale  # (B, k, N)
            # In float32: eps would vanish in half precision and the weights would not sum to 1.
            attn = logits.float().softmax(dim=1) + self.eps
            attn = attn / attn.sum(-1, keepdim=True)
            updates = attn.to(v.dtype) @ v
            # GRUCell takes (batch, C): fold the slots into the batch.
            slots = self.gru(updates.reshape(-1, c), slots.reshape(-1, c)).reshape(b, num_slots, c)
            slots = slots + self.mlp(self.norm_mlp(slots))
        return slots.amax(1), attn

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_slots={self.slots.shape[0]}, iterations={self.iterations}"
