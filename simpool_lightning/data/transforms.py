"""Train and eval pipelines on sample dicts, step for step those of timm's ``train.py``.

Training: random-resized crop (timm's crop parameters, interpolation bilinear or bicubic at random
under ``"random"``, timm's default), horizontal flip, timm's RandAugment (``rand-m9-mstd0.5-inc1``
in the official recipes), conversion to a normalised tensor, timm's random erasing. Evaluation:
resize the short side to ``floor(image_size / crop_pct)`` (bicubic), center crop, normalise.
Images go through PIL, as in timm; with the same random state the outputs equal those of
``timm.data.create_transform`` bit for bit (``tests/data/test_transforms.py`` checks it against
the installed timm; written against timm 1.0.31, ``timm/data/transforms_factory.py``
``transforms_imagenet_train`` / ``transforms_imagenet_eval``, without the prefetcher). Deliberate
differences: no colour jitter when ``auto_augment`` is off (timm adds ``ColorJitter(0.4)`` then; no
recipe here runs without RandAugment), and posterize at 0 bits gives black instead of Pillow 13's
error (:func:`posterize`).

An image's ``mask`` and ``boxes`` (tv_tensors) take the same crop, resize and flip through
torchvision's v2 functional ops. RandAugment and random erasing touch the image only.
"""
from __future__ import annotations

import math
import random
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from timm.data.auto_augment import RandAugment, rand_augment_transform
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import RandomResizedCropAndInterpolation
from torch import Tensor, nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as F

__all__ = [
    "Interpolation",
    "TrainTransform",
    "EvalTransform",
    "build_train_transform",
    "build_eval_transform",
    "posterize",
    "rand_augment",
    "to_normalized_tensor",
]

Interpolation = Literal["random", "bilinear", "bicubic"]
"""Resampling of the training crop and of RandAugment's geometric ops, by timm's names: ``"random"``
(timm ``train.py``'s default ``--train-interpolation``) draws bilinear or bicubic anew for each
crop and each op."""

_MODES = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}
_PIL_MODES = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
# What an image's annotations are called in a sample; they follow its geometry.
_GEOMETRIC_KEYS = ("image", "mask", "boxes")


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


def to_normalized_tensor(image: Image.Image, mean: np.ndarray, std: np.ndarray) -> Tensor:
    """An RGB PIL image as a normalised ``(3, H, W)`` float32 tensor, contiguous.

    Equal bit for bit to torchvision's ``to_tensor`` then ``normalize`` (timm's ``MaybeToTensor``
    and ``Normalize``): ``(x / 255 - mean) / std`` in float32, the same operations in the same
    order, each correctly rounded. It converts while transposing into one preallocated array and
    works in place there, with numpy: per-image arrays are too small for torch's intra-op threads to
    pay, and on a busy machine those threads mostly wait for each other (in-process loading ran
    several times slower with 2 torch threads than with 1 here).

    Args:
        image: an ``RGB`` image.
        mean, std: ``(3, 1, 1)`` float32.
    """
    if image.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {image.mode!r} (load images with load_rgb)")
    out = np.empty((3, image.height, image.width), dtype=np.float32)
    np.copyto(out, np.asarray(image).transpose(2, 0, 1), casting="unsafe")  # uint8 -> float32, exact
    np.divide(out, np.float32(255), out=out)
    np.subtract(out, mean, out=out)
    np.divide(out, std, out=out)
    return torch.from_numpy(out)


def _normalization(mean: Sequence[float], std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(f"mean and std must hold 3 values each, std positive, got mean={mean}, std={std}")
    return np.array(mean, dtype=np.float32).reshape(3, 1, 1), np.array(std, dtype=np.float32).reshape(3, 1, 1)


def _pil(sample: dict[str, Any]) -> Image.Image:
    image = sample.get("image")
    if not isinstance(image, Image.Image):
        raise TypeError(f"the transforms take a sample dict whose 'image' is a PIL image, got {type(image).__name__}")
    return image


class TrainTransform(nn.Module):
    """Training pipeline on a sample dict; see :func:`build_train_transform`.

    The random draws are timm's, in timm's order: the crop from Python's ``random``
    (``RandomResizedCropAndInterpolation.get_params``, then the interpolation), the flip from
    torch, RandAugment from numpy and Python, random erasing from Python and torch.

    Args:
        image_size, scale, ratio, hflip, interpolation, mean, std: see :func:`build_train_transform`.
        rand_augment: applied to the cropped PIL image, or ``None``.
        random_erasing: applied to the normalised ``(3, S, S)`` tensor, or ``None``.
    """

    def __init__(
        self,
        image_size: int,
        scale: tuple[float, float],
        ratio: tuple[float, float],
        hflip: float,
        interpolation: Interpolation,
        rand_augment: Optional[RandAugment],
        random_erasing: Optional[RandomErasing],
        mean: Sequence[float],
        std: Sequence[float],
    ) -> None:
        super().__init__()
        self.size = [image_size, image_size]
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), hflip
        self.interpolations = list(_MODES.values()) if interpolation == "random" else [_MODES[interpolation]]
        self.rand_augment = rand_augment
        self.random_erasing = random_erasing
        self.mean, self.std = _normalization(mean, std)

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        top, left, height, width = RandomResizedCropAndInterpolation.get_params(_pil(sample), self.scale, self.ratio)
        interpolation = random.choice(self.interpolations) if len(self.interpolations) > 1 else self.interpolations[0]
        flip = self.hflip > 0 and bool(torch.rand(1) < self.hflip)
        out = dict(sample)
        for key in _GEOMETRIC_KEYS:
            if key in out:
                value = F.resized_crop(out[key], top, left, height, width, self.size, interpolation, antialias=True)
                out[key] = F.horizontal_flip(value) if flip else value
        image = out["image"]
        if self.rand_augment is not None:
            image = self.rand_augment(image)
        tensor = to_normalized_tensor(image, self.mean, self.std)
        out["image"] = self.random_erasing(tensor) if self.random_erasing is not None else tensor
        return out

    def extra_repr(self) -> str:
        modes = "/".join(m.value for m in self.interpolations)
        return (
            f"size={self.size[0]}, scale={self.scale}, ratio={self.ratio}, hflip={self.hflip}, interpolation={modes},\n"
            f"rand_augment={self.rand_augment!r},\nrandom_erasing={self.random_erasing!r}"
        )


class EvalTransform(nn.Module):
    """Evaluation pipeline on a sample dict; see :func:`build_eval_transform`."""

    def __init__(self, image_size: int, crop_pct: float, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if not 0 < crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size = [image_size, image_size]
        self.resize = [math.floor(image_size / crop_pct)]
        self.mean, self.std = _normalization(mean, std)

    def forward(self, sample: dict[str, Any]) -> dict[str, Any]:
        _pil(sample)
        out = dict(sample)
        for key in _GEOMETRIC_KEYS:
            if key in out:
                resized = F.resize(out[key], self.resize, InterpolationMode.BICUBIC, antialias=True)
                out[key] = F.center_crop(resized, self.size)
        out["image"] = to_normalized_tensor(out["image"], self.mean, self.std)
        return out

    def extra_repr(self) -> str:
        return f"resize={self.resize[0]} (bicubic), center_crop={self.size[0]}"


def build_train_transform(
    image_size: int = 224,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    auto_augment: Optional[str] = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: Interpolation = "bicubic",
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> TrainTransform:
    """timm's training pipeline (``transforms_imagenet_train`` with RandAugment, no colour jitter).

    Args:
        image_size: output side in pixels.
        scale, ratio: area and aspect-ratio ranges of the random-resized crop.
        hflip: horizontal flip probability.
        auto_augment: timm RandAugment string such as ``"rand-m9-mstd0.5-inc1"``, or ``None``.
        re_prob: random erasing probability (timm's, applied after normalisation).
        re_mode: random erasing fill, ``"pixel"`` (per-pixel normal noise) or ``"const"`` / ``"rand"``.
        mean, std: normalisation.
        interpolation: of the crop and of RandAugment's geometric ops, see :data:`Interpolation`.
            The default ``"bicubic"`` is DeiT's fine-tuning recipe (the downstream recipes');
            :class:`~.imagenet.ImageNetDataModule` passes timm ``train.py``'s ``"random"``.

    Returns:
        A callable on a sample dict (``image`` an RGB PIL image, optional ``mask`` and ``boxes``
        as tv_tensors) that returns the dict with ``image`` a normalised ``(3, S, S)`` float tensor.
        RandAugment's geometric ops move the image only: masks and boxes after it are approximate,
        which training does not use. Unlike ``transforms_imagenet_train``, there is no colour
        jitter without ``auto_augment``.
    """
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 0 < scale[0] <= scale[1] or not 0 < ratio[0] <= ratio[1]:
        raise ValueError(f"scale and ratio must be (low, high) with 0 < low <= high, got scale={scale}, ratio={ratio}")
    if interpolation != "random" and interpolation not in _MODES:
        raise ValueError(f"interpolation must be 'random', 'bilinear' or 'bicubic', got {interpolation!r}")
    augment = None
    if auto_augment:
        if not auto_augment.startswith("rand"):
            raise ValueError(
                f"auto_augment must be a timm RandAugment string like 'rand-m9-mstd0.5-inc1', got {auto_augment!r}"
            )
        hparams: dict[str, Any] = {
            "translate_const": int(image_size * 0.45),
            "img_mean": tuple(min(255, round(255 * m)) for m in mean),
        }
        if interpolation != "random":  # timm's ops draw bilinear or bicubic themselves when none is given
            hparams["interpolation"] = _PIL_MODES[interpolation]
        augment = rand_augment(auto_augment, hparams)
    erasing = RandomErasing(re_prob, mode=re_mode, device="cpu") if re_prob > 0 else None
    return TrainTransform(image_size, scale, ratio, hflip, interpolation, augment, erasing, mean, std)


def build_eval_transform(
    image_size: int = 224,
    crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
    std: Sequence[float] = IMAGENET_DEFAULT_STD,
) -> EvalTransform:
    """Evaluation pipeline: resize the short side to ``floor(image_size / crop_pct)`` (bicubic, as
    timm's ``transforms_imagenet_eval``), center crop, normalise.

    Masks and boxes follow the image, so localization metrics compare maps and ground truth in the
    cropped frame.
    """
    return EvalTransform(image_size, crop_pct, mean, std)
