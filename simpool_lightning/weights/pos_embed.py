"""The DINO fork's SimPool-mode ViT resamples its position embedding at every forward; import does it once.

billpsomas/simpool ``self_supervised/vision_transformer.py`` (commit fac2263),
``VisionTransformer.interpolate_pos_encoding``::

    npatch = x.shape[1] - 1                  # counts a [CLS] token, which SimPool mode does not have
    N = self.pos_embed.shape[1]              # SimPool mode: patches only
    if npatch == N and w == h: return self.pos_embed     # never true in SimPool mode
    ... F.interpolate(table as (1, D, g, g), scale_factor=((w // p + 0.1) / sqrt(N), ...), mode="bicubic")

So even at the training resolution (``w // p == g == sqrt(N)``) the table the blocks see is not the
stored one but a bicubic resampling with scale factor ``(g + 0.1) / g``: the output grid is still
``g x g`` (``floor(g + 0.1)``), but PyTorch maps output pixel ``i`` to input coordinate
``(i + 0.5) * g / (g + 0.1) - 0.5`` (the given scale factor, not the size ratio), a shift of up to
0.1 pixel that blends neighbouring rows. A checkpoint trained with that forward has learned the
table *as resampled*, so :func:`simpool_forward_table` applies the resampling once, at import, and our
(timm) ViT, which adds its table as it is at its own resolution, then computes the authors' forward.

Other input sizes: at side ``s`` the fork resamples the *stored* table straight to ``s // p`` with
scale ``(s // p + 0.1) / g``; ours (``dynamic_img_size``) resamples the imported table with timm's
``resample_abs_pos_embed`` (bicubic to the exact size, antialiased when shrinking). The two are
two different resamplings of nearly the same grid, so features at other sizes (DINO's local crops,
evaluation at another resolution) are close to the fork's but not equal to float precision; at the
training resolution they are. Measured on a seeded ViT-S/16 whose table is noise of std 0.1 (rougher
than a trained one): the teacher's features differ by 4.6e-2 (relative) at 96 px, 7.0e-3 at 160 px,
1.2e-3 at 288 px; the official-mode ViT, which has no quirk, by as much (4.0e-2, 8.4e-3, 1.9e-3), as
the two rules differ whatever the table. Importing the table as stored instead: 1.5e-3 at 224 px.

:func:`simpool_stored_table` is the inverse, for export: the table that the fork's forward resamples
into ours. The resampling is linear and separable, ``T -> M T M^T`` per channel with a ``g x g``
matrix ``M`` close to the identity (condition number about 1.1), so the inverse is a solve in float64;
exporting an imported table and importing it again reproduces it to float32 rounding (a few ulps).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["simpool_forward_table", "simpool_stored_table"]


def _grid(pos_embed: Tensor) -> int:
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"expected a position embedding of shape (1, N, D), got {tuple(pos_embed.shape)}")
    n = pos_embed.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(
            f"the DINO fork's ViT reshapes its position embedding to a square grid; {n} positions are not a square"
        )
    return side


def _resample(table: Tensor, side: int) -> Tensor:
    """``table`` ``(B, D, g, g)`` resampled exactly as the fork's forward does at image side ``g * patch``."""
    n = side * side
    w0 = h0 = side + 0.1  # w // patch_size + 0.1, at the training resolution
    return F.interpolate(table, scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)), mode="bicubic")


def simpool_forward_table(pos_embed: Tensor) -> Tensor:
    """The table the fork's SimPool-mode forward adds at its training resolution: ``(1, N, D)`` -> ``(1, N, D)``.

    The same operations, in the same dtype, as ``interpolate_pos_encoding``: the result equals the
    fork's own to the last bit on the same device and kernels.
    """
    side = _grid(pos_embed)
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, side, side, dim).permute(0, 3, 1, 2)
    return _resample(grid, side).permute(0, 2, 3, 1).reshape(1, side * side, dim)


def simpool_stored_table(pos_embed: Tensor) -> Tensor:
    """The inverse of :func:`simpool_forward_table`: the stored table whose forward resampling is ``pos_embed``.

    ``M`` is read off the float32 kernel itself (the resampling of the identity), so the solve
    inverts the arithmetic the fork's forward will run, not an idealised bicubic.
    """
    side = _grid(pos_embed)
    dim = pos_embed.shape[-1]
    # Channel c of the probe is the unit vector e_c along the rows (width 1, which the resampling keeps).
    probe = torch.eye(side, dtype=pos_embed.dtype, device=pos_embed.device).reshape(1, side, side, 1)
    m = _resample(probe, side)[0, :, :, 0].T.double()  # m[i, j]: weight of input row j in output row i
    m_inv = torch.linalg.inv(m)
    grid = pos_embed.detach().double().reshape(side, side, dim)
    stored = torch.einsum("ij,kl,jld->ikd", m_inv, m_inv, grid)
    return stored.reshape(1, side * side, dim).to(pos_embed.dtype)
