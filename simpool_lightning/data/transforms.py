"""Train and eval pipelines on sample dicts.

torchvision transforms v2 move the image, its ``mask`` and its ``boxes`` together; timm supplies
RandAugment (``rand-m9-mstd0.5-inc1`` in the official recipes) and random erasing, which touch the
image only.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2

__all__ = ["ImageOnly", "build_train_transform", "build_eval_transform", "posterize", "rand_augment"]


def posterize(image: Image.Image, bits: int, **_: Any) -> Image.Image:
    """Keep the top ``bits`` bits of each channel, for every integer ``bits`` as Pillow < 13 did.

    timm's ``PosterizeIncreasing`` asks for 0 bits when RandAugment's sampled magnitude reaches
    its cap of 10 (about one image in 650 under ``rand-m9-mstd0.5-inc1``). Pillow < 13 masked each
    channel with ``~(2 ** (8 - bits) - 1)``, which turns ``bits <= 0`` into an all-black image (what
    the paper's runs saw); Pillow 13 refuses ``bits < 1``. Here ``bits <= 0`` gives black,
    ``1..7`` is ``ImageOps.posterize`` and ``>= 8`` the image itself, as in timm's ``posterize``.
    Keyword arguments (timm passes ``fillcolor`` and ``resample`` to every op) are ignored.
    """
    if bits >= 8:
        return image
    if bits <= 0:
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits)


def rand_augment(config: str, hparams: dict[str, Any]) -> RandAugment:
    """timm's ``rand_augment_transform(config, hparams)`` with its posterize ops on :func:`posterize`.

    Every pipeline of this package that uses RandAugment builds it here, so none stops on
    Pillow 13's refusal of 0 bits.
    """
    transform = rand_augment_transform(config, hparams)
    for op in transform.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return transform


class ImageOnly(nn.Module):
    """Apply ``fn`` to ``sample["image"]`` and pass every other entry through.

    For image-only operations (colour RandAugment, random erasing) inside a v2 pipeline on dicts.
    """

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        return {**sample, "image": self.fn(sample["image"])}

    def extra_repr(self) -> str:
        return repr(self.fn)


def _to_normalized_tensor(mean: Sequence[float], std: Sequence[float]) -> list[nn.Module]:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def build_train_transform(
    image_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    auto_augment: Optional[str] = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """timm-style training pipeline: RandomResizedCrop, flip, RandAugment, normalise, random erasing.

    Args:
        image_size: output side in pixels.
        scale: area range of RandomResizedCrop.
        hflip: horizontal flip probability.
        auto_augment: timm RandAugment string such as ``"rand-m9-mstd0.5-inc1"``, or ``None``.
        re_prob: random erasing probability (timm's, applied after normalisation).
        re_mode: random erasing fill, ``"pixel"`` (per-pixel normal noise) or ``"const"`` / ``"rand"``.
        mean, std: normalisation.

    Returns:
        A callable on a sample dict (``image`` a PIL image or tensor, optional ``mask`` and ``boxes``
        as tv_tensors) that returns the dict with ``image`` a normalised ``(3, S, S)`` float tensor.
        RandAugment's geometric ops move the image only: masks and boxes after it are approximate,
        which training does not use.
    """
    ops: list[nn.Module] = [
        v2.RandomResizedCrop(image_size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)
    ]
    if hflip > 0:
        ops.append(v2.RandomHorizontalFlip(hflip))
    if auto_augment:
        if not auto_augment.startswith("rand"):
            raise ValueError(f"auto_augment must be a timm RandAugment string like 'rand-m9-mstd0.5-inc1', got {auto_augment!r}")
        hparams = dict(translate_const=int(image_size * 0.45), img_mean=tuple(round(255 * m) for m in mean))
        ops += [v2.ToPILImage(), ImageOnly(rand_augment(auto_augment, hparams))]
    ops += _to_normalized_tensor(mean, std)
    if re_prob > 0:
        ops.append(ImageOnly(RandomErasing(re_prob, mode=re_mode, device="cpu")))
    return v2.Compose(ops)


def build_eval_transform(
    image_size: int = 224,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> v2.Compose:
    """Evaluation pipeline: resize the short side to ``image_size / crop_pct``, center crop, normalise.

    Masks and boxes follow the image, so localization metrics compare maps and ground truth in the
    cropped frame.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    resize = int(round(image_size / crop_pct))
    return v2.Compose(
        [
            v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            *_to_normalized_tensor(mean, std),
        ]
    )
