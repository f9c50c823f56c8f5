"""Pillow < 13's ``ImageOps.posterize`` (e.g. Pillow 12.0 ``src/PIL/ImageOps.py``), transcribed on arrays.

Pillow < 13 built a lookup table ``i & ~(2 ** (8 - bits) - 1)`` for ``i`` in 0..255 and applied it
to every channel of an ``L`` or ``RGB`` image, for any integer ``bits``: ``bits <= 0`` masks every
bit away (black), ``bits >= 8`` keeps them all. Pillow 13 refuses ``bits`` outside 1..8.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def posterize_pillow12(image: Image.Image, bits: int) -> Image.Image:
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"Pillow < 13 posterized L and RGB images only, got {image.mode}")
    mask = ~(2 ** (8 - bits) - 1)
    lut = np.array([i & mask for i in range(256)], dtype=np.int64).astype(np.uint8)
    return Image.fromarray(lut[np.asarray(image)])  # (H, W) -> L, (H, W, 3) -> RGB
