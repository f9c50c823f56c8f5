"""HOW pooling: local descriptors weighted by their norm, smoothed, reduced and summed."""
from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from torch import Tensor, nn

from .base import Pool
from .grid import grid_to_tokens, tokens_to_grid
from .registry import register_pool

__all__ = ["HOWPool"]


@register_pool("how")
class HOWPool(Pool):
    """HOW's global descriptor (Tolias et al., "Learning and aggregating deep local descriptors for instance-level recognition", ECCV 2020).

    Attention is the L2 norm of each feature, ``w_j = ||x_j||``; the features are smoothed by a
    ``k x k`` average pooling over the grid and reduced by a linear map (HOW's 1x1 convolution),
    and the output is ``u = l2n(sum_j w_j W x~_j + b)``. Because of the final L2 normalisation the
    weights may be normalised to sum to 1 without changing ``u``; the normalised weights are the
    returned attention ``(B, 1, N)``.

    HOW initialises the reduction with PCA whitening learned on training descriptors; here it is
    learned from the default initialisation. Smoothing needs the spatial grid: tokens are taken to
    lie on a square grid (see :func:`tokens_to_grid`); ``kernel_size=1`` turns smoothing off.

    Args:
        dim: channel count ``C``.
        out_dim: width of the reduced descriptors and of the output (HOW uses 128; default ``dim``).
        kernel_size: smoothing window, odd (3 in the paper).
    """

    has_attention = True

    def __init__(self, dim: int, out_dim: Optional[int] = None, kernel_size: int = 3) -> None:
        super().__init__(dim, out_dim=out_dim)
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be a positive odd int, so smoothing keeps the grid; got {kernel_size}")
        self.kernel_size = kernel_size
        self.reduction = nn.Linear(dim, self.out_dim)

    def pool_tokens(self, x: Tensor, hw: Optional[tuple[int, int]] = None) -> tuple[Tensor, Optional[Tensor]]:
        # HOW's attention adds 1e-10 under the square root: the weights stay positive (so they can
        # be normalised) and the norm's gradient stays finite at zero features.
        norms = (x.float().pow(2).sum(-1) + 1e-10).sqrt()
        attn = norms / norms.sum(-1, keepdim=True)
        if self.kernel_size > 1:
            smoothed = F.avg_pool2d(
                tokens_to_grid(x, hw),
                self.kernel_size,
                stride=1,
                padding=self.kernel_size // 2,
                count_include_pad=False,
            )
            x = grid_to_tokens(smoothed)
        local = self.reduction(x)
        pooled = (attn.unsqueeze(-1).to(local.dtype) * local).sum(1)
        return F.normalize(pooled, dim=-1), attn.unsqueeze(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, kernel_size={self.kernel_size}"
