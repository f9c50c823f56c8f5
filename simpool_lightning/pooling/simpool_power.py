"""SimPool with gamma as one autograd function: three (B, N, d) tensors saved, none rebuilt.

With z = LN(x) = w * xhat + b, xhat_j = r_j (x_j - mu_j), attention a = softmax(u_h . z_j), the
minimum m of z over a group (the batch, the sample, or the sample and channel) and
s = z - m + eps, SimPool's output is

    y_c = S_c^(1 / gamma),    S_c = sum_j a_{h(c) j} p_jc,    p = s^gamma,    h(c) the head owning c.

Autograd through these formulas keeps LN(X), s and p, rebuilds s and several (B, N, d) gradients in
the backward (the softmax's, the power's, the minimum's, LayerNorm's, the query mean's) and adds
them together. Here the forward keeps X, p and the tilted derivative

    t_jc = gamma a_{h(c) j} r_j s_jc^(gamma - 1)      (computed in the buffer of LN(X), in place)

and the backward reduces everything else to per-location and per-channel scalars through matrix
products over t and p: with gS = dL/dS, the value gradient is ds_jc = gS_c t_jc / r_j, and since
w_c xhat_jc = s_jc + m - eps - b_c, the sums LayerNorm's backward needs are
sum_c gS_c t_jc w_c xhat_jc / r_j = gamma sum_h a_hj dS/da_hj + sum_c gS_c (m - eps - b_c) t_jc / r_j.
dX is then one batched matrix product and two multiply-adds, with t and with X.
The minimum's gradient goes to its location; ties (measure zero for real features) send it to one
of the tied locations, as ``torch.min(dim)`` does, where ``amin`` would split it among them.
"""
from __future__ import annotations

from typing import Any, Literal, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .simpool_mean import fold_query, fold_query_backward, head_shares, own_channels, token_mean

__all__ = ["MinMode", "simpool_power"]

MinMode = Literal["batch", "sample", "channel"]


def _minimum(values: Tensor, min_mode: str) -> tuple[Tensor, Tensor]:
    """The minimum of ``values`` ``(B, N, d)`` per ``min_mode``, and the flat indices of its locations.

    Returns ``(minimum, flat)``: the minimum broadcastable to ``values`` (``()``, ``(B, 1, 1)`` or
    ``(B, 1, d)``) and the indices into ``values.view(-1)`` of where it is (``(1,)``, ``(B,)`` or
    ``(B * d,)`` in batch-major, channel-minor order). For ``"batch"`` and ``"sample"`` a vectorised
    ``amin`` over channels does the one full pass and the location is searched in the small result,
    several times faster on CPU than ``min`` with indices over all of ``values``.
    """
    b, n, d = values.shape
    if min_mode == "channel":
        minimum, token = values.min(1, keepdim=True)  # (B, 1, d)
        base = torch.arange(b, device=values.device).view(b, 1, 1) * (n * d) + torch.arange(d, device=values.device)
        return minimum, (base + token * d).view(-1)
    rows = values.amin(-1)  # (B, N): each location's minimum over channels
    if min_mode == "batch":
        row = rows.view(-1).argmin().view(1)  # tensors throughout: no data-dependent indexing to compile
        channel = values.view(-1, d).index_select(0, row).argmin(-1)
        return rows.view(-1).index_select(0, row).view(()), row * d + channel
    row = rows.argmin(1, keepdim=True)  # (B, 1)
    channel = values.gather(1, row.unsqueeze(-1).expand(b, 1, d)).argmin(-1)  # (B, 1)
    flat = torch.arange(b, device=values.device).view(b, 1) * (n * d) + row * d + channel
    return rows.gather(1, row).view(b, 1, 1), flat.view(-1)


class _SimPoolPower(torch.autograd.Function):
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
        gamma: float,
        min_mode: str,
        eps: float,
    ) -> tuple[Tensor, Tensor]:
        x = x.contiguous()  # LayerNorm's kernel needs channels innermost: maps are copied once
        b, n, d = x.shape
        h = num_heads
        z, mu, r = torch.native_layer_norm(x, (d,), ln_weight, ln_bias, ln_eps)
        mu, r = mu.view(b, n), r.view(b, n)
        q = token_mean(x)  # (B, d): the query is the GAP of the raw features
        qh, u = fold_query(q, wq, wk, bq, h, scale)
        logits = torch.bmm(u, z.transpose(1, 2))  # (B, h, N)
        attn = logits.softmax(-1)
        minimum, flat = _minimum(z, min_mode)
        s = z.sub_(minimum - eps)  # (B, N, d), in place: LN(X) is not needed again
        alpha = (attn * r.unsqueeze(1) * gamma).transpose(1, 2).unsqueeze(-1)  # (B, N, h, 1)
        if gamma == 2.0:
            powered = s * s  # exact, and cheapest
            tilted = s.view(b, n, h, d // h).mul_(alpha).view(b, n, d)
        else:  # exp(gamma log s): several times faster than pow with a float exponent on CPU
            log_s = s.log_()
            powered = torch.mul(log_s, gamma).exp_()
            # t = exp((gamma - 1) log s + log alpha) in one pass and one exp (alpha = 0 gives t = 0)
            log_s_heads = log_s.view(b, n, h, d // h)
            tilted = torch.add(alpha.log(), log_s_heads, alpha=gamma - 1.0, out=log_s_heads).exp_().view(b, n, d)
        total = torch.bmm(attn, powered)  # (B, h, d): one product reads p once for every head
        total = own_channels(total)  # (B, d)
        pooled = total.pow(1.0 / gamma)
        ctx.save_for_backward(
            x, ln_weight, ln_bias, wq, wk, q, qh, u, mu, r, logits, attn, minimum, flat, powered, tilted, total, pooled
        )
        ctx.num_heads, ctx.scale, ctx.has_bq, ctx.gamma, ctx.eps = h, scale, bq is not None, gamma, eps
        ctx.min_mode = min_mode
        return pooled, attn

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: Optional[Tensor], g_attn: Optional[Tensor]) -> tuple[Optional[Tensor], ...]:
        (x, ln_weight, ln_bias, wq, wk, q, qh, u, mu, r, logits, attn, minimum, flat, powered, tilted, total, pooled) = (
            ctx.saved_tensors
        )
        b, n, d = x.shape
        h, gamma = ctx.num_heads, ctx.gamma
        g_s = x.new_zeros(b, d) if g is None else g * pooled / (total * gamma)  # (B, d): dL/dS
        g_heads = head_shares(g_s, h)  # (B, h, d)
        da_power = torch.bmm(g_heads, powered.transpose(1, 2))  # (B, h, N): sum_{c in h} gS_c p_jc
        da = da_power if g_attn is None else da_power + g_attn
        dl = attn * (da - (attn * da).sum(-1, keepdim=True))  # (B, h, N): through the softmax

        # Sums over channels and over locations of t, each one matrix product.
        wg = g_s * ln_weight  # (B, d)
        shift = (minimum - ctx.eps).expand(b, 1, d).reshape(b, d)  # m - eps per sample and channel
        over_c = torch.bmm(tilted, torch.stack([wg, g_s * (shift - ln_bias)], -1))  # (B, N, 2)
        over_j = torch.bmm(torch.stack([r.reciprocal(), mu], 1), tilted)  # (B, 2, d)
        ds_sum = g_s * over_j[:, 0]  # (B, d): sum_j ds_jc

        # The minimum's gradient, minus the sum of ds over its group, goes to its location.
        if ctx.min_mode == "channel":
            dm = -ds_sum.reshape(-1)
        elif ctx.min_mode == "sample":
            dm = -ds_sum.sum(1)
        else:
            dm = -ds_sum.sum().view(1)
        token, channel = flat // d, flat % d
        w_dm = ln_weight[channel] * dm
        xhat_m = (x.view(-1)[flat] - mu.view(-1)[token]) * r.view(-1)[token]

        # LayerNorm's backward: mean_c of w dz_j and of w dz_j xhat_j, per location.
        u_w = u * ln_weight  # (B, h, d)
        normed = logits - (u * ln_bias).sum(-1, keepdim=True)  # (B, h, N): u_h . w xhat_j
        mean_dz = (over_c[..., 0] / r + (dl * u_w.sum(-1, keepdim=True)).sum(1)).view(-1).index_add(0, token, w_dm)
        mean_dz_xhat = (gamma * (attn * da_power).sum(1) + over_c[..., 1] / r + (dl * normed).sum(1)).view(-1).index_add(
            0, token, w_dm * xhat_m
        )
        mean_dz, mean_dz_xhat = mean_dz.view(b, n) / d, mean_dz_xhat.view(b, n) / d

        # Parameters, through the logits u_h . z_j (sum_j dl_hj = 0 removes b) and through s.
        dlr = dl * r.unsqueeze(1)  # (B, h, N)
        dl_xhat = torch.bmm(dlr, x) - (dlr * mu.unsqueeze(1)).sum(-1, keepdim=True)  # (B, h, d): sum_j dl_hj xhat_j
        scratch = torch.mul(tilted, x)  # (B, N, d), reused for dX below
        ds_xhat = g_s * (scratch.sum(1) - over_j[:, 1])  # (B, d): sum_j ds_jc xhat_jc
        d_ln_weight = (ds_xhat + (u * dl_xhat).sum(1)).sum(0).index_add(0, channel, dm * xhat_m)
        d_ln_bias = ds_sum.sum(0).index_add(0, channel, dm)
        d_qh, d_wq, d_wk, d_bq = fold_query_backward(dl_xhat * ln_weight, q, qh, wq, wk, h, ctx.scale, ctx.has_bq)

        dx = None
        if ctx.needs_input_grad[0]:
            # dx_j = r_j w dz_j - r_j mean_dz_j - r_j^2 mean_dz_xhat_j (x_j - mu_j) + dq / N, where
            # r_j w dz_j = t_j * w gS + sum_h r_j dl_hj u_h w, plus the minimum's share at its location.
            beta = -r.square() * mean_dz_xhat  # (B, N)
            k = -r * mean_dz - beta * mu
            coef = torch.cat([dlr.transpose(1, 2), k.unsqueeze(-1), x.new_full((b, n, 1), 1.0 / n)], -1)  # (B, N, h + 2)
            dq = d_qh @ wq  # (B, d)
            vecs = torch.cat([u_w, x.new_ones(b, 1, d), dq.unsqueeze(1)], 1)  # (B, h + 2, d)
            dx = torch.bmm(coef, vecs, out=scratch).addcmul_(tilted, wg.unsqueeze(1)).addcmul_(x, beta.unsqueeze(-1))
            dx.view(-1).index_add_(0, flat, r.view(-1)[token] * w_dm)
        return dx, d_ln_weight, d_ln_bias, d_wq, d_wk, d_bq, None, None, None, None, None, None


def simpool_power(
    x: Tensor,
    ln_weight: Tensor,
    ln_bias: Tensor,
    wq: Tensor,
    wk: Tensor,
    bq: Optional[Tensor],
    num_heads: int,
    scale: float,
    ln_eps: float,
    gamma: float,
    min_mode: MinMode,
    eps: float,
) -> tuple[Tensor, Tensor]:
    """SimPool with gamma, exactly: ``(sum_j a_j (LN(x_j) - m + eps)^gamma)^(1/gamma)`` per head.

    Args:
        x: tokens ``(B, N, d)`` (maps viewed as tokens are copied once, as LayerNorm needs).
        ln_weight, ln_bias: LayerNorm affine ``(d,)``; ``ln_eps`` its epsilon.
        wq, wk: query and key projections ``(d, d)``; ``bq`` the query bias ``(d,)`` or ``None``.
        num_heads: heads; ``d`` divisible by it. Head h weights channels ``h d/heads .. (h+1) d/heads``.
        scale: logit scale.
        gamma: the exponent; positive.
        min_mode: the group of the minimum ``m`` of LN(X): ``"batch"`` (one for all), ``"sample"``
            (one per sample) or ``"channel"`` (one per sample and channel).
        eps: added after the shift so that every base is at least ``eps``; positive.

    Returns:
        ``(pooled, attn)``: ``(B, d)`` and ``(B, num_heads, N)``.
    """
    return _SimPoolPower.apply(x, ln_weight, ln_bias, wq, wk, bq, num_heads, scale, ln_eps, gamma, min_mode, eps)
