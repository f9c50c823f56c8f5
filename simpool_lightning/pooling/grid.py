"""Tokens back to a 2-d grid, for the pools whose method convolves or pools over space (HOW, GE, CBAM)."""
from __future__ import annotations

import math

from typing import Optional

from torch import Tensor

__all__ = ["tokens_to_grid", "grid_to_tokens"]


def tokens_to_grid(x: Tensor, hw: Optional[tuple[int, int]] = None) -> Tensor:
    """View tokens ``(B, N, C)`` as maps ``(B, C, H, W)``.

    ``hw`` is the grid of map input (tokens are row-major, as ``to_tokens`` flattens them); token
    input has none, so its grid is taken to be square, as it is for ViT patch tokens.

    Raises:
        ValueError: ``H * W != N``, or no ``hw`` and ``N`` is not a perfect square.
    """
    b, n, c = x.shape
    if hw is None:
        side = math.isqrt(n)
        if side * side != n:
            raise ValueError(
                f"this pool needs the token grid: pass maps (B, C, H, W), or tokens on a square grid; got N = {n}"
            )
        hw = (side, side)
    if hw[0] * hw[1] != n:
        raise ValueError(f"grid {hw} does not hold N = {n} tokens")
    return x.transpose(1, 2).reshape(b, c, *hw)


def grid_to_tokens(x: Tensor) -> Tensor:
    """Maps ``(B, C, H, W)`` -> tokens ``(B, H * W, C)``, row-major as ``to_tokens``."""
    return x.flatten(2).transpose(1, 2)
