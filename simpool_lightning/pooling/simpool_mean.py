"""SimPool without gamma as one autograd function that never forms LayerNorm(X).

With per-location mean mu_j and inverse std r_j, LN(x_j) = r_j (x_j - mu_j) * w + b. For the folded
query u_h = scale * W_k,h^T (W_q q + b_q)_h and uw_h = u_h * w:

    logit_hj = r_j (uw_h . x_j - mu_j sum(uw_h))      (the constant u_h . b cancels in softmax)
    y[S_h]   = w * sum_j a_hj r_j (x_j - mu_j) + b     restricted to head h's channels S_h

The forward runs LayerNorm once for robust statistics and the logits, then reads X for the query
and the weighted sum; nothing of size (B, N, d) but X is saved. The backward reads X twice and
folds every per-location term of dX into one batched matrix product plus one multiply-add, where
autograd would form and sum several (B, N, d) gradients.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["simpool_mean"]


def head_mask(num_heads: int, dim: int, like: Tensor) -> Tensor:
    """``(h, d)``: 1 where channel c belongs to head h."""
    return torch.eye(num_heads, dtype=like.dtype, device=like.device).repeat_interleave(dim // num_heads, dim=1)


class _SimPoolMean(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        ln_weight: Tensor,
        ln_bias: Tensor,
        wq: Tensor,
        wk: Tensor,
        bq: Optional[Tensor],
        num_heads: int,
        scale: float,
        ln_eps: float,
    ) -> tuple[Tensor, Tensor]:
        b, n, d = x.shape
        h, hd = num_heads, d // num_heads
        # LayerNorm's own kernel gives robust statistics; its output is used for the logits and freed.
        z, mu, r = torch.native_layer_norm(x, (d,), ln_weight, ln_bias, ln_eps)
        mu, r = mu.view(b, n), r.view(b, n)
        q = x.mean(1)  # (B, d): the query is the GAP of the raw features
        qh = torch.nn.functional.linear(q, wq, bq)  # (B, d)
        u = torch.einsum("bhc,hcd->bhd", qh.view(b, h, hd), wk.view(h, hd, d)) * scale  # (B, h, d)
        logits = torch.bmm(u, z.transpose(1, 2))  # (B, h, N)
        del z
        attn = logits.softmax(-1)  # (B, h, N)
        c = attn * r.unsqueeze(1)  # (B, h, N)
        centered = torch.bmm(c, x) - (c * mu.unsqueeze(1)).sum(-1, keepdim=True)  # (B, h, d)
        mask = head_mask(h, d, x)
        pooled = (centered * mask).sum(1) * ln_weight + ln_bias  # (B, d)
        ctx.save_for_backward(x, ln_weight, ln_bias, wq, wk, q, qh, u, mu, r, logits, attn, centered)
        ctx.num_heads, ctx.scale, ctx.has_bq = num_heads, scale, bq is not None
        return pooled, attn

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Optional[Tensor], g_attn: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        x, ln_weight, ln_bias, wq, wk, q, qh, u, mu, r, logits, attn, centered = ctx.saved_tensors
        b, n, d = x.shape
        h, hd, scale = ctx.num_heads, d // ctx.num_heads, ctx.scale
        if g is None:
            g = x.new_zeros(b, d)
        mask = head_mask(h, d, x)
        gm = g.unsqueeze(1) * mask  # (B, h, d): head h's share of the output gradient

        d_ln_bias = g.sum(0)
        d_ln_weight = (gm * centered).sum((0, 1))
        gw = gm * ln_weight  # (B, h, d)
        sigma = gw.sum(-1, keepdim=True)  # (B, h, 1)

        # Through c_hj = a_hj r_j, with dL/dc_hj = gw_h . (x_j - mu_j).
        dc = torch.bmm(gw, x.transpose(1, 2)) - mu.unsqueeze(1) * sigma  # (B, h, N)
        da = dc * r.unsqueeze(1)
        if g_attn is not None:
            da = da + g_attn
        dr = (dc * attn).sum(1)  # (B, N)
        dmu = -(attn * r.unsqueeze(1) * sigma).sum(1)  # (B, N)

        # Through the softmax and logit_hj = r_j (uw_h . x_j - mu_j s_h) + u_h . b.
        uw = u * ln_weight
        s = uw.sum(-1, keepdim=True)  # (B, h, 1)
        dlogit = attn * (da - (attn * da).sum(-1, keepdim=True))  # (B, h, N)
        dr = dr + (dlogit * (logits - (u * ln_bias).sum(-1, keepdim=True))).sum(1) / r
        dp = dlogit * r.unsqueeze(1)  # (B, h, N)
        dmu = dmu - (dp * s).sum(1)
        d_uw = torch.bmm(dp, x) - (dp * mu.unsqueeze(1)).sum(-1, keepdim=True)  # (B, h, d)
        du = d_uw * ln_weight
        d_ln_weight = d_ln_weight + (d_uw * u).sum((0, 1))

        # Through u_h = scale W_k,h^T qh_h and qh = W_q q + b_q.
        d_qh = torch.einsum("bhd,hcd->bhc", du, wk.view(h, hd, d)).reshape(b, d) * scale
        d_wk = torch.einsum("bhc,bhd->hcd", qh.view(b, h, hd), du).reshape(d, d) * scale
        d_wq = d_qh.t() @ q
        d_bq = d_qh.sum(0) if ctx.has_bq else None

        dx = None
        if ctx.needs_input_grad[0]:
            # Every per-location term: dx_j = sum_h c_hj gw_h + sum_h dp_hj uw_h + k_j 1 + dq / N
            # + beta_j x_j, where beta_j, k_j carry the gradients of the statistics r_j and mu_j.
            beta = dr * (-0.5) * r.pow(3) * (2.0 / d)  # (B, N)
            k = dmu / d - beta * mu  # (B, N)
            dq = d_qh @ wq  # (B, d)
            coef = torch.cat(
                [(attn * r.unsqueeze(1)).transpose(1, 2), dp.transpose(1, 2), k.unsqueeze(-1), x.new_full((b, n, 1), 1.0 / n)],
                dim=-1,
            )  # (B, N, 2h + 2)
            vecs = torch.cat([gw, uw, x.new_ones(b, 1, d), dq.unsqueeze(1)], dim=1)  # (B, 2h + 2, d)
            dx = torch.bmm(coef, vecs).addcmul_(x, beta.unsqueeze(-1))
        return dx, d_ln_weight, d_ln_bias, d_wq, d_wk, d_bq, None, None, None


def simpool_mean(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    wq: Tensor,
    wk: Tensor,
    bq: Optional[Tensor],
    num_heads: int,
    scale: float,
    ln_eps: float,
) -> tuple[Tensor, Tensor]:
    """SimPool without gamma, exactly, in O(N d + d^2) time and O(B d) saved activations beyond X.

    Args:
        x: tokens ``(B, N, d)``.
        ln_weight, ln_bias: LayerNorm affine ``(d,)``; ``ln_eps`` its epsilon.
        wq, wk: query and key projections ``(d, d)``; ``bq`` the query bias ``(d,)`` or ``None``
            (a key bias has no effect after the softmax).
        num_heads: heads; ``d`` divisible by it.
        scale: logit scale.

    Returns:
        ``(pooled, attn)``: ``(B, d)`` and ``(B, num_heads, N)``.
    """
    return _SimPoolMean.apply(x, ln_weight, ln_bias, wq, wk, bq, num_heads, scale, ln_eps)
