"""Optimal transport kernel (OTK) embedding: features transported onto learned references by Sinkhorn."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor, nn

from .base import Pool
from .registry import register_pool

__all__ = ["OTKPool", "sinkhorn_plan"]


def sinkhorn_plan(logits: Tensor, iterations: int) -> Tensor:
    """Entropic optimal transport plan between uniform marginals, by Sinkhorn in the log domain.

    Args:
        logits: ``(B, N, p)`` similarities over ``eps``, i.e. the log of the Gibbs kernel.
        iterations: Sinkhorn iterations; each rescales rows then columns.

    Returns:
        plan ``(B, N, p)``, non-negative; its columns sum to ``1/p`` exactly (the last step fixes
        them) and its rows to ``1/N`` up to the convergence of the iterations.
    """
    _, n, p = logits.shape
    log_row, log_col = -math.log(n), -math.log(p)
    log_u = logits.new_zeros(logits.shape[:2])
    log_v = logits.new_zeros(logits.shape[0], p)
    # The log domain keeps exp(<x, z> / eps) from overflowing however sharp the kernel is.
    for _ in range(iterations):
        log_u = log_row - torch.logsumexp(logits + log_v.unsqueeze(1), dim=2)
        log_v = log_col - torch.logsumexp(logits + log_u.unsqueeze(2), dim=1)
    return (logits + log_u.unsqueeze(2) + log_v.unsqueeze(1)).exp()


@register_pool("otk")
class OTKPool(Pool):
    """Optimal transport kernel embedding (Mialon et al., "A Trainable Optimal Transport Embedding for Feature Aggregation and its Relationship to Attention", ICLR 2021).

    ``p`` learned references ``z_1..z_p``; the entropic transport plan ``P`` (``N x p``) moves the
    features (mass ``1/N`` each) onto the references (mass ``1/p`` each) with similarity
    ``<x_i, z_j>`` and temperature ``eps``; the embedding is ``sqrt(p) [sum_i P_ij x_i]_j``: one
    weighted mean per reference, scaled by ``1/sqrt(p)``, concatenated, so
    ``out_dim = num_references * dim``. The returned attention ``(B, num_references, N)`` is each
    reference's transport mass, ``p P_ij``, which sums to 1 over locations.

    With both marginals enforced, one reference receives every location's mass equally: the pool is
    then GAP. (The SimPool authors' code drops the row step and uses one reference, which turns OTK
    into a softmax attention with a learned query.) OTK first embeds the features with a
    Nyström kernel map; here it acts on the features themselves.

    Args:
        dim: channel count ``C``.
        num_references: number of references ``p``.
        iterations: Sinkhorn iterations.
        eps: entropic regularisation, the temperature of the kernel ``exp(<x, z> / eps)``.
    """

    has_attention = True

    def __init__(self, dim: int, num_references: int = 4, iterations: int = 10, eps: float = 1.0) -> None:
        if num_references < 1:
            raise ValueError(f"num_references must be at least 1, got {num_references}")
        if iterations < 1:
            raise ValueError(f"iterations must be at least 1, got {iterations}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps}")
        super().__init__(dim, out_dim=num_references * dim)
        self.iterations = iterations
        self.eps = eps
        # Scaled so that <x, z> is O(1) for unit-variance features: the plan starts soft.
        self.references = nn.Parameter(torch.randn(num_references, dim) * dim**-0.5)

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        p = self.references.shape[0]
        logits = (x @ self.references.t()).float() / self.eps
        attn = sinkhorn_plan(logits, self.iterations).transpose(1, 2) * p  # (B, p, N)
        pooled = (attn.to(x.dtype) @ x).flatten(1) * p**-0.5
        return pooled, attn

    def extra_repr(self) -> str:
        p = self.references.shape[0]
        return f"{super().extra_repr()}, num_references={p}, iterations={self.iterations}, eps={self.eps}"
