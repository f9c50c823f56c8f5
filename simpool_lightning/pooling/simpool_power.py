"""SimPool's gamma power sum as one autograd function: one full-size temporary each way.

For attention ``a`` (per head), values ``v`` and their minimum ``m`` over a group (the batch, the
sample, or the sample and channel), the power sum is

    S_c = sum_j a_{h(c) j} s_jc^gamma,    s = v - m + eps,    h(c) the head that owns channel c

and SimPool's output is ``S^(1 / gamma)``. Autograd through ``(v - v.amin() + eps).pow(gamma)``
keeps three (B, N, d) temporaries in the forward, evaluates a second ``pow`` (``s^(gamma - 1)``) in
the backward, and spends longer in ``amin``'s backward (a full-size mask of the ties) than in the
rest of the head. Here the forward makes one tensor, ``p = s^gamma``, in place as
``exp(gamma * log s)`` (several times faster than ``pow`` with a float exponent on CPU), and the
backward reads ``s^(gamma - 1)`` as ``p / s`` and routes the minimum's gradient to its location:

    dS/da_hj = sum_{c in h} gS_c p_jc
    dS/dv_jc = gamma a_{h(c) j} gS_c p_jc / s_jc,   plus, at the minimum's location, -sum over its group

Ties for the minimum (measure zero for real features) send its gradient to one of the tied
locations, as ``torch.min(dim)`` does, where ``amin`` would split it among them.
"""
from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .simpool_mean import head_mask

__all__ = ["MinMode", "power_sum"]

MinMode = Literal["batch", "sample", "channel"]


def _minimum(values: Tensor, min_mode: str) -> tuple[Tensor, Tensor]:
    """The minimum per ``min_mode``, broadcastable to ``values`` ``(B, N, d)``, and where it is.

    Returns ``(minimum, index)``: ``()`` and a flat index ``(1,)`` for ``"batch"``; ``(B, 1, 1)`` and
    ``(B, 1)`` indices into ``values.view(B, -1)`` for ``"sample"``; ``(B, 1, d)`` and ``(B, 1, d)``
    indices along dim 1 for ``"channel"``. For the first two, a vectorised ``amin`` over channels
    does the one full pass and the location is searched in the small result, several times faster
    on CPU than ``min`` with indices over all of ``values``.
    """
    if min_mode == "channel":
        return values.min(1, keepdim=True)
    b, n, d = values.shape
    rows = values.amin(-1)  # (B, N): each location's minimum over channels
    if min_mode == "batch":
        row = rows.view(-1).argmin().view(1)  # tensors throughout: no data-dependent indexing to compile
        channel = values.view(-1, d).index_select(0, row).argmin(-1)
        return rows.view(-1).index_select(0, row).view(()), row * d + channel
    row = rows.argmin(1, keepdim=True)  # (B, 1)
    channel = values.gather(1, row.unsqueeze(-1).expand(b, 1, d)).argmin(-1)  # (B, 1)
    return rows.gather(1, row).view(b, 1, 1), row * d + channel


def _add_at_minimum(grad: Tensor, index: Tensor, grad_minimum: Tensor, min_mode: str) -> None:
    """Add ``grad_minimum`` (shaped as the minimum) into ``grad`` at the minimum's location."""
    b = grad.shape[0]
    if min_mode == "batch":
        grad.view(-1).index_add_(0, index, grad_minimum.view(1))
    elif min_mode == "sample":
        grad.view(b, -1).scatter_add_(1, index, grad_minimum.view(b, 1))
    else:
        grad.scatter_add_(1, index, grad_minimum)


class _PowerSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, attn: Tensor, values: Tensor, min_mode: str, eps: float, gamma: float) -> Tensor:
        h = attn.shape[1]
        minimum, index = _minimum(values, min_mode)
        powered = torch.sub(values, minimum - eps)  # (B, N, d) s: the one temporary, powered in place
        if gamma == 2.0:
            powered.mul_(powered)  # exact, and cheapest
        else:
            powered.log_().mul_(gamma).exp_()
        # One matrix product reads the values once for every head; each head keeps its own channels.
        total = torch.bmm(attn, powered)  # (B, h, d)
        total = total[:, 0] if h == 1 else (total * head_mask(h, values.shape[-1], values)).sum(1)
        ctx.save_for_backward(attn, values, minimum, index, powered)
        ctx.min_mode, ctx.eps, ctx.gamma = min_mode, eps, gamma
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        attn, values, minimum, index, powered = ctx.saved_tensors
        b, h, n = attn.shape
        d = values.shape[-1]
        g = grad.unsqueeze(1) if h == 1 else grad.unsqueeze(1) * head_mask(h, d, grad)  # (B, h, d)
        d_attn = torch.bmm(g, powered.transpose(1, 2)) if ctx.needs_input_grad[0] else None  # (B, h, N)
        d_values = None
        if ctx.needs_input_grad[1]:
            d_values = torch.sub(values, minimum - ctx.eps)  # s, overwritten with dS/dv in place
            torch.div(powered, d_values, out=d_values)
            weights = attn.transpose(1, 2).unsqueeze(-1)  # (B, N, h, 1)
            d_values.view(b, n, h, d // h).mul_(weights).mul_((grad * ctx.gamma).view(b, 1, h, d // h))
            _add_at_minimum(d_values, index, -d_values.sum_to_size(minimum.shape), ctx.min_mode)
        return d_attn, d_values, None, None, None


def power_sum(attn: Tensor, values: Tensor, min_mode: MinMode, eps: float, gamma: float) -> Tensor:
    """``S_c = sum_j attn[h(c), j] (values_jc - m + eps) ** gamma``, each head on its own channels.

    Args:
        attn: attention ``(B, heads, N)``; head h weights channels ``h * d/heads .. (h+1) * d/heads``.
        values: ``(B, N, d)``, float, contiguous.
        min_mode: the group of ``m``, the minimum of ``values``: ``"batch"`` (one for all),
            ``"sample"`` (one per sample) or ``"channel"`` (one per sample and channel).
        eps: added after the shift so that every base is at least ``eps``; positive.
        gamma: the exponent; positive.

    Returns:
        ``(B, d)``; differentiable in ``attn`` and ``values`` (through ``m`` too).
    """
    return _PowerSum.apply(attn, values, min_mode, eps, gamma)
