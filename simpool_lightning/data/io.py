"""Reading images from disk with a policy for bad files.

A corrupt, truncated or zero-byte file either stops the run with an error that names it
(``on_bad_image="raise"``, the default) or is skipped, logged by name and counted (``"skip"``).
Every readable mode (grayscale, palette, CMYK, RGBA, 16-bit) comes out as 8-bit RGB.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Optional

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

__all__ = ["BadImageError", "OnBadImage", "load_rgb", "FileSample", "FileDataset"]

log = logging.getLogger(__name__)

OnBadImage = Literal["raise", "skip"]


class BadImageError(ValueError):
    """An image file that cannot be decoded; the message names the file."""


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        # PIL's convert("RGB") clips high-bit-depth values at 255; rescale instead.
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        img = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        # Composite on white: transparent pixels carry arbitrary colour.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    return img.convert("RGB")


def load_rgb(path: str | os.PathLike, exif_transpose: bool = False) -> Image.Image:
    """Decode ``path`` fully into an 8-bit RGB PIL image.

    ``exif_transpose`` turns the image upright as its EXIF orientation tag says (as a photo viewer
    shows it); datasets leave it off, since their annotations are in the stored pixel frame.

    Raises:
        BadImageError: the file is missing, empty, truncated, or not an image.
    """
    path = os.fspath(path)
    try:
        if os.path.getsize(path) == 0:
            raise BadImageError(f"image file {path!r} is empty (0 bytes)")
        with Image.open(path) as img:
            img.load()  # decodes everything now, so truncation fails here and not in a worker later
            return _to_rgb(ImageOps.exif_transpose(img) if exif_transpose else img)
    except BadImageError:
        raise
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise BadImageError(f"cannot read image file {path!r}: {err}") from err


@dataclass
class FileSample:
    """One image on disk and its annotations.

    Attributes:
        path: image file.
        label: class index.
        boxes: ``(K, 4)`` xyxy pixel boxes in the image's own frame, or ``None``.
        mask_path: binary mask image, or ``None``.
        extra: further entries copied as they are into the sample dict (e.g. an image id).
    """

    path: str
    label: int
    boxes: Optional[torch.Tensor] = None
    mask_path: Optional[str] = None
    extra: dict[str, Any] = field(default_factory=dict)


class FileDataset(Dataset):
    """Samples read from image files, transformed as dicts.

    Args:
        samples: what to read.
        transform: callable on the sample dict (``image`` PIL, ``label`` int, ``mask`` and ``boxes``
            as tv_tensors where present); see :mod:`simpool_lightning.data.transforms`.
        on_bad_image: ``"raise"`` stops with :class:`BadImageError` naming the file; ``"skip"``
            logs it, counts it in :attr:`skipped` and returns the next readable sample instead.
    """

    def __init__(
        self,
        samples: list[FileSample],
        transform: Optional[Callable[[dict[str, Any]], dict[str, Any]]] = None,
        on_bad_image: OnBadImage = "raise",
    ) -> None:
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        if not samples:
            raise ValueError("FileDataset got no samples")
        self.samples = samples
        self.transform = transform
        self.on_bad_image = on_bad_image
        self.skipped: list[str] = []

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, s: FileSample) -> dict[str, Any]:
        image = load_rgb(s.path)
        sample: dict[str, Any] = {"image": image, "label": s.label, **s.extra}
        if s.mask_path is not None:
            mask = np.asarray(load_rgb(s.mask_path).convert("L")) > 127
            if mask.shape != (image.height, image.width):
                raise BadImageError(
                    f"mask {s.mask_path!r} is {mask.shape[1]}x{mask.shape[0]} but image {s.path!r} is "
                    f"{image.width}x{image.height}"
                )
            sample["mask"] = tv_tensors.Mask(torch.from_numpy(mask).to(torch.uint8))
        if s.boxes is not None:
            sample["boxes"] = tv_tensors.BoundingBoxes(
                s.boxes.reshape(-1, 4).float(), format="XYXY", canvas_size=(image.height, image.width)
            )
        return sample

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.samples)):
            s = self.samples[(index + offset) % len(self.samples)]
            try:
                sample = self._read(s)
            except BadImageError as err:
                if self.on_bad_image == "raise":
                    raise
                self.skipped.append(s.path)
                log.warning("skipping bad image %d so far in this process: %s", len(self.skipped), err)
                continue
            if self.transform is not None:
                sample = self.transform(sample)
            return sample
        raise BadImageError(f"every one of the {len(self.samples)} images is unreadable (first: {self.samples[0].path!r})")
