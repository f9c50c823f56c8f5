"""DINO's multi-crop augmentation on sample dicts (torchvision transforms v2 on PIL images).

Two global crops and N local crops of one image, each with flip, colour jitter, grayscale and
Gaussian blur; the second global crop may be solarised. Probabilities and ranges are DINO's
``DataAugmentationDINO``. The crops are augmented as PIL images, as DINO does: on CPU, PIL's
blur and hue shift are 5 to 10 times faster than the tensor kernels, and a multi-crop pipeline
runs them eight times per image.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from PIL import Image, ImageFilter
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

__all__ = ["MultiCropTransform", "PILGaussianBlur"]


class PILGaussianBlur(nn.Module):
    """PIL Gaussian blur with a radius drawn uniformly from ``radius`` (DINO: 0.1 to 2.0 pixels).

    The draw uses torch's generator, which the DataLoader seeds per worker.
    """

    def __init__(self, radius: tuple[float, float] = (0.1, 2.0)) -> None:
        super().__init__()
        self.radius = radius

    def forward(self, image: Image.Image) -> Image.Image:
        lo, hi = self.radius
        return image.filter(ImageFilter.GaussianBlur(lo + (hi - lo) * torch.rand(()).item()))

    def extra_repr(self) -> str:
        return f"radius={self.radius}"


class MultiCropTransform(nn.Module):
    """Sample dict -> the same dict with ``image`` a list of ``2 + local_crops_number`` crops.

    Args:
        global_crops_scale: area range of the two global crops (DINO: ``(0.25, 1.0)`` for ViTs
            with multi-crop, ``(0.14, 1.0)`` for ResNet-50).
        local_crops_scale: area range of the local crops (``(0.05, 0.25)``; ``(0.05, 0.14)`` for ResNet-50).
        local_crops_number: local crops per image; 0 disables multi-crop.
        global_size: side of the global crops (224).
        local_size: side of the local crops (96).
        color_jitter: ``(brightness, contrast, saturation, hue)`` of the colour jitter (DINO:
            ``(0.4, 0.4, 0.2, 0.1)``). Where colour says nothing about the content (SyntheticShapes
            draws hues at random), a full hue jitter (0.5) keeps the views from matching by colour.
        blur_radius: range of the Gaussian blur radius, in pixels of the output crop. DINO's
            ``(0.1, 2.0)`` is for 224 and 96 px crops; on a 32 px crop the same radius blurs seven
            times as much of the image, so scale it with the crop size for small images.
        mean, std: normalisation of the output crops.

    The input ``image`` may be a PIL image, a uint8 tensor or a float tensor in ``[0, 1]``
    (``(3, H, W)``). Outputs are normalised float ``(3, global_size, global_size)`` then
    ``(3, local_size, local_size)`` tensors. ``mask`` and ``boxes`` are dropped: they describe the
    uncropped image and match none of the crops; other entries (``label``) pass through.

    Augmentations (DINO): random resized crop (bicubic), horizontal flip 0.5, colour jitter
    (``color_jitter``) with p 0.8, grayscale 0.2, Gaussian blur (``blur_radius``) with p 1.0 /
    0.1 / 0.5 for global 1 / global 2 / local, and
    solarisation (threshold 128) with p 0.2 on the second global crop only.
    """

    def __init__(
        self,
        global_crops_scale: tuple[float, float] = (0.25, 1.0),
        local_crops_scale: tuple[float, float] = (0.05, 0.25),
        local_crops_number: int = 6,
        global_size: int = 224,
        local_size: int = 96,
        color_jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1),
        blur_radius: tuple[float, float] = (0.1, 2.0),
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        super().__init__()
        for name, (lo, hi) in (("global_crops_scale", global_crops_scale), ("local_crops_scale", local_crops_scale)):
            if not 0 < lo <= hi <= 1:
                raise ValueError(f"{name} must be (low, high) with 0 < low <= high <= 1, got {(lo, hi)}")
        if local_crops_number < 0 or global_size <= 0 or local_size <= 0:
            raise ValueError(
                f"need local_crops_number >= 0 and positive sizes, got {local_crops_number=}, {global_size=}, {local_size=}"
            )
        if len(color_jitter) != 4 or min(color_jitter) < 0 or color_jitter[3] > 0.5:
            raise ValueError(f"color_jitter must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {color_jitter}")
        if not 0 <= blur_radius[0] <= blur_radius[1]:
            raise ValueError(f"blur_radius must be (low, high) with 0 <= low <= high, got {blur_radius}")
        self.local_crops_number = local_crops_number
        self.to_pil = v2.ToPILImage()

        def view(size: int, scale: tuple[float, float], blur: float, solarize: float = 0.0) -> v2.Compose:
            ops: list[nn.Module] = [
                v2.RandomResizedCrop(size, scale=tuple(scale), interpolation=InterpolationMode.BICUBIC),
                v2.RandomHorizontalFlip(0.5),
                v2.RandomApply([v2.ColorJitter(*color_jitter)], p=0.8),
                v2.RandomGrayscale(0.2),
                v2.RandomApply([PILGaussianBlur(tuple(blur_radius))], p=blur),
            ]
            if solarize > 0:
                ops.append(v2.RandomSolarize(128, p=solarize))
            ops += [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
            return v2.Compose(ops)

        self.global_1 = view(global_size, global_crops_scale, blur=1.0)
        self.global_2 = view(global_size, global_crops_scale, blur=0.1, solarize=0.2)
        self.local = view(local_size, local_crops_scale, blur=0.5)

    def crops(self, image: Any) -> list[Tensor]:
        """One image (PIL, uint8 or float ``(3, H, W)`` tensor in ``[0, 1]``) -> ``2 + local_crops_number`` crops."""
        if isinstance(image, Tensor):
            if image.dim() != 3 or image.shape[0] != 3:
                raise ValueError(f"MultiCropTransform needs a (3, H, W) image tensor, got shape {tuple(image.shape)}")
            image = image.as_subclass(Tensor)
            # A float image is read as [0, 1]; clamp, as values past 1 would wrap around in uint8.
            image = self.to_pil(image.clamp(0.0, 1.0) if image.is_floating_point() else image)
        elif isinstance(image, Image.Image):
            image = image.convert("RGB")
        else:
            raise TypeError(f"MultiCropTransform needs a PIL image or a (3, H, W) tensor, got {type(image).__name__}")
        views = [self.global_1(image), self.global_2(image)]
        views += [self.local(image) for _ in range(self.local_crops_number)]
        return [v.as_subclass(Tensor) for v in views]

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        if "image" not in sample:
            raise KeyError(f"MultiCropTransform needs a sample dict with an 'image' entry, got keys {sorted(sample)}")
        out = {k: v for k, v in sample.items() if k not in ("image", "mask", "boxes")}
        out["image"] = self.crops(sample["image"])
        return out
