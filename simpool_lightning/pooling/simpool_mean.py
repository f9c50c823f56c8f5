"""SimPool without gamma as one autograd function that keeps nothing of LayerNorm(X).

With per-location mean mu_j and inverse std r_j, LN(x_j) = r_j (x_j - mu_j) * w + b. For the folded
query u_h = scale * W_k,h^T (W_q q + b_q)_h and uw_h = u_h * w:

    logit_hj = r_j (uw_h . x_j - mu_j sum(uw_h))      (the constant u_h . b cancels in softmax)
    y[S_h]   = w * sum_j a_hj r_j (x_j - mu_j) + b     restricted to head h's channels S_h

The forward takes exact LayerNorm statistics and the logits from one LayerNorm without its affine
(two passes for maps), then reads X for the query, and LayerNorm's output (tokens) or X (maps) for
the weighted sum; nothing of size (B, N, d) but X is saved.
The backward reads X twice and folds every per-location term of dX into one batched matrix product
plus one multiply-add, where autograd would form and sum several (B, N, d) gradients. X may be
tokens ``(B, N, d)`` or maps viewed as tokens (channels outermost, the view ``to_tokens`` makes):
matrix products read either in place, and dX comes back in X's layout, so neither direction copies
X.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = ["simpool_mean"]


def _head_mask(num_heads: int, dim: int, like: Tensor) -> Tensor:
    """``(h, d)``: 1 where channel c belongs to head h."""
    return torch.eye(num_heads, dtype=like.dtype, device=like.device).repeat_interleave(dim // num_heads, dim=1)


def own_channels(per_head: Tensor) -> Tensor:
    """``(B, h, d) -> (B, d)``: each channel taken from the head that owns it."""
    b, h, d = per_head.shape
    return per_head[:, 0] if h == 1 else (per_head * _head_mask(h, d, per_head)).sum(1)


def head_shares(g: Tensor, num_heads: int) -> Tensor:
    """``(B, d) -> (B, h, d)``: head h keeps the channels it owns, zero elsewhere."""
    return g.unsqueeze(1) if num_heads == 1 else g.unsqueeze(1) * _head_mask(num_heads, g.shape[-1], g)


def readable_in_place(x: Tensor) -> Tensor:
    """``x`` ``(B, N, d)`` itself when its channels or its locations are contiguous, else a copy."""
    return x if x.stride(-1) == 1 or x.stride(1) == 1 else x.contiguous()


def token_mean(x: Tensor) -> Tensor:
    """``(B, d)``: the mean over locations of ``x`` ``(B, N, d)``, one matrix product in either layout."""
    b, n, d = x.shape
    return torch.bmm(x.new_full((b, 1, n), 1.0 / n), x).view(b, d)


def fold_query(
    q: Tensor, wq: Tensor, wk: Tensor, bq: Optional[Tensor], num_heads: int, scale: float
) -> tuple[Tensor, Tensor]:
    """``(qh, u)``: the projected query ``(B, d)`` and, per head, ``u_h = scale W_k,h^T qh_h`` ``(B, h, d)``."""
    b, d = q.shape
    qh = torch.nn.functional.linear(q, wq, bq)
    u = torch.einsum("bhc,hcd->bhd", qh.view(b, num_heads, d // num_heads), wk.view(num_heads, d // num_heads, d))
    return qh, u * scale


def fold_query_backward(
    du: Tensor, q: Tensor, qh: Tensor, wq: Tensor, wk: Tensor, num_heads: int, scale: float, has_bq: bool
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """Gradients of :func:`fold_query` for ``du`` ``(B, h, d)``: ``(d_qh, d_wq, d_wk, d_bq)``.

    ``d_qh`` ``(B, d)`` is the projected query's; ``d_qh @ wq`` is the query's, for callers that need
    the input's gradient.
    """
    b, h, d = du.shape
    du = du * scale  # (B, h, d): scaled here, the smallest place
    d_qh = torch.einsum("bhd,hcd->bhc", du, wk.view(h, d // h, d)).reshape(b, d)
    d_wk = torch.einsum("bhc,bhd->hcd", qh.view(b, h, d // h), du).reshape(d, d)
    return d_qh, d_qh.t() @ q, d_wk, d_qh.sum(0) if has_bq else None


def _layer_norm_logits(
    x: Tensor, u: Tensor, ln_weight: Tensor, ln_bias: Tensor, eps: float
) -> tuple[Tensor, Tensor, Tensor, Optional[Tensor], Optional[Tensor]]:
    """``(logits, mu, r, xhat, delta)``: ``u_h . LN(x_j)`` ``(B, h, N)``; LayerNorm's mean and inverse
    std ``(B, N)``; for tokens its output before the affine ``xhat`` ``(B, N, d)``, for maps the
    rest ``delta`` ``(B, N)`` of the mean ``mu + delta`` that float32 ``mu`` cannot hold.

    The statistics are exact (two passes, or LayerNorm's own kernel): E[x^2] - mu^2 and logits from
    raw X would skip a (B, N, d) write but lose every digit for a location whose mean dwarfs its
    spread. Tokens go through LayerNorm's kernel without its affine, and the output averages its
    ``xhat``. Maps viewed as tokens, which that kernel would copy, are centered in their own layout.

    The mean of a location at 30 is off by 1e-6 or more in float32 (half a unit in the last place
    of 30, plus its sum's rounding), the same shift on every channel: LayerNorm turns it into
    ``r_j delta_j sum(u_h w)`` on the logit, an error coherent over channels that, at a location of
    small spread (large ``r_j``), outgrows what storing X in float32 costs. ``x - mu`` is exact
    wherever x is within a factor 2 of mu (Sterbenz), so the mean of the centered values is that
    error to float32 accuracy, and one more row in the matrix product that the logits need
    computes it.
    """
    b, n, d = x.shape
    uw = u * ln_weight  # (B, h, d)
    offset = (u * ln_bias).sum(-1, keepdim=True)  # (B, h, 1)
    if x.stride(-1) == 1:
        xhat, mu, r = torch.native_layer_norm(x, (d,), None, None, eps)
        return torch.baddbmm(offset, uw, xhat.transpose(1, 2)), mu.view(b, n), r.view(b, n), xhat, None
    mu = x.mean(-1)  # (B, N)
    centered = x - mu.unsqueeze(-1)  # (B, N, d) in X's layout
    rows = torch.cat([uw, uw.new_full((b, 1, d), 1.0 / d)], 1)  # (B, h + 1, d): the last row means
    products = torch.bmm(rows, centered.transpose(1, 2))  # (B, h + 1, N)
    raw, delta = products[:, :-1], products[:, -1]
    raw = raw - delta.unsqueeze(1) * uw.sum(-1, keepdim=True)  # uw . (x_j - mu_j - delta_j)
    # mean((x - mu - delta)^2) = mean((x - mu)^2) - delta^2: no second centering pass.
    r = centered.square_().mean(-1).sub_(delta.square()).add_(eps).rsqrt_()
    return raw * r.unsqueeze(1) + offset, mu, r, None, delta


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
        h = num_heads
        q = token_mean(x)  # (B, d): the query is the GAP of the raw features
        qh, u = fold_query(q, wq, wk, bq, h, scale)
        logits, mu, r, xhat, delta = _layer_norm_logits(x, u, ln_weight, ln_bias, ln_eps)
        attn = logits.softmax(-1)
        if xhat is not None:
            centered = torch.bmm(attn, xhat)  # (B, h, d): sum_j a_hj r_j (x_j - mu_j)
        else:  # maps: from X itself, their squares having taken the centered buffer
            c = attn * r.unsqueeze(1)
            # mu and delta subtracted one after the other: sum_j c_hj mu_j + sum_j c_hj delta_j
            # would round the second away
            centered = torch.bmm(c, x) - (c * mu.unsqueeze(1)).sum(-1, keepdim=True)
            centered = centered - (c * delta.unsqueeze(1)).sum(-1, keepdim=True)
        pooled = own_channels(centered) * ln_weight + ln_bias  # (B, d)
        ctx.save_for_backward(x, ln_weight, ln_bias, wq, wk, q, qh, u, mu, r, logits, attn, centered)
        ctx.num_heads, ctx.scale, ctx.has_bq = num_heads, scale, bq is not None
        return pooled, attn

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Optional[Tensor], g_attn: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        x, ln_weight, ln_bias, wq, wk, q, qh, u, mu, r, logits, attn, centered = ctx.saved_tensors
        b, n, d = x.shape
        h = ctx.num_heads
        if g is None:
            g = x.new_zeros(b, d)
        gm = head_shares(g, h)  # (B, h, d): head h's share of the output gradient

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
        d_ln_weight = d_ln_weight + (d_uw * u).sum((0, 1))
        d_qh, d_wq, d_wk, d_bq = fold_query_backward(d_uw * ln_weight, q, qh, wq, wk, h, ctx.scale, ctx.has_bq)

        dx = None
        if ctx.needs_input_grad[0]:
            # Every per-location term: dx_j = sum_h c_hj gw_h + sum_h dp_hj uw_h + k_j 1 + dq / N
            # + beta_j x_j, where beta_j, k_j carry the gradients of the statistics r_j and mu_j.
            beta = dr * (-0.5) * r.pow(3) * (2.0 / d)  # (B, N)
            k = dmu / d - beta * mu  # (B, N)
            coef = torch.cat(
                [(attn * r.unsqueeze(1)).transpose(1, 2), dp.transpose(1, 2), k.unsqueeze(-1), x.new_full((b, n, 1), 1.0 / n)],
                dim=-1,
            )  # (B, N, 2h + 2)
            dq = d_qh @ wq  # (B, d)
            vecs = torch.cat([gw, uw, x.new_ones(b, 1, d), dq.unsqueeze(1)], dim=1)  # (B, 2h + 2, d)
            if x.stride(-1) == 1:
                dx = torch.bmm(coef, vecs)
            else:  # maps viewed as tokens: write dX channels-outermost, as X is
                dx = torch.bmm(vecs.transpose(1, 2), coef.transpose(1, 2)).transpose(1, 2)
            dx.addcmul_(x, beta.unsqueeze(-1))
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
        x: tokens ``(B, N, d)``, or maps viewed as tokens (``to_tokens``); another layout is copied.
        ln_weight, ln_bias: LayerNorm affine ``(d,)``; ``ln_eps`` its epsilon.
        wq, wk: query and key projections ``(d, d)``; ``bq`` the query bias ``(d,)`` or ``None``
            (a key bias has no effect after the softmax).
        num_heads: heads; ``d`` divisible by it.
        scale: logit scale.

    Returns:
        ``(pooled, attn)``: ``(B, d)`` and ``(B, num_heads, N)``.
    """
    return _SimPoolMean.apply(readable_in_place(x), ln_weight, ln_bias, wq, wk, bq, num_heads, scale, ln_eps)
