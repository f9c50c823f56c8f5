from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data import create_transform

from simpool_lightning.data.transforms import build_eval_transform, build_train_transform, posterize, rand_augment
from tests.reference.pillow_posterize import posterize_pillow12

RECIPE_POLICY = "rand-m9-mstd0.5-inc1"


def _random_image(rng: np.random.Generator, size: int = 8, mode: str = "RGB") -> Image.Image:
    shape = (size, size, 3) if mode == "RGB" else (size, size)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_posterize_follows_pillow_12_for_every_bit_count(mode: str) -> None:
    image = _random_image(np.random.default_rng(0), 16, mode)
    for bits in range(-2, 9):
        out = posterize(image, bits, fillcolor=(124, 116, 104), resample=Image.Resampling.BICUBIC)
        assert out.mode == mode and out.size == image.size
        assert np.array_equal(np.asarray(out), np.asarray(posterize_pillow12(image, bits))), bits


def _spy_on_posterize(transform: Any, calls: list[tuple[int, Image.Image]]) -> None:
    """Record (bits, output) of every posterize the RandAugment ops run."""
    ops = [op for op in transform.ops if op.name.startswith("Posterize")]
    assert ops, "the policy has no posterize op"
    for op in ops:
        def spy(image: Image.Image, bits: int, _fn: Any = op.aug_fn, **kwargs: Any) -> Image.Image:
            out = _fn(image, bits, **kwargs)
            calls.append((bits, out))
            return out

        op.aug_fn = spy


def test_the_recipe_policy_reaches_zero_bits_and_gives_black() -> None:
    # About one image in 650 draws PosterizeIncreasing at the magnitude cap (0 bits): 8,000 images
    # make missing it a one-in-200,000 event, whatever the seed; with the seed fixed it is certain.
    transform = rand_augment(RECIPE_POLICY, {"translate_const": 3, "img_mean": (124, 116, 104)})
    calls: list[tuple[int, Image.Image]] = []
    _spy_on_posterize(transform, calls)
    random.seed(0)
    np.random.seed(0)
    rng = np.random.default_rng(0)
    for _ in range(8000):
        transform(_random_image(rng))
    black = [out for bits, out in calls if bits == 0]
    assert black, f"no 0-bit posterize in {len(calls)} posterize calls"
    assert all(np.asarray(out).max() == 0 and out.size == (8, 8) and out.mode == "RGB" for out in black)
    assert {bits for bits, _ in calls} <= set(range(0, 5))  # PosterizeIncreasing: 4 - int(level * 0.4)


def test_the_recipe_pipeline_survives_the_zero_bit_case() -> None:
    # The whole training pipeline, with the magnitude forced to the cap so that every posterize is 0 bits.
    transform = build_train_transform(16, auto_augment="rand-m10-inc1", re_prob=0.25)
    calls: list[tuple[int, Image.Image]] = []
    _spy_on_posterize(transform.rand_augment, calls)
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    for _ in range(100):
        out = transform({"image": _random_image(rng, 24), "label": 0})
        assert out["image"].shape == (3, 16, 16)
    assert calls and all(bits == 0 for bits, _ in calls)


# ------------------------------------------------------------------------- equal to timm's pipeline


def _photos(count: int, seed: int = 0) -> list[Image.Image]:
    """Smooth random RGB images of assorted sizes and aspect ratios (the crop's fallback included)."""
    rng = np.random.default_rng(seed)
    images = []
    for i in range(count):
        w, h = (int(v) for v in rng.integers(40, 90, 2))
        if i % 10 == 0:
            w = 3 * h  # outside the crop's ratio range: timm's center fallback
        coarse = Image.fromarray(rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8))
        images.append(coarse.resize((w, h), Image.Resampling.BICUBIC))
    return images


def _timm_with_posterize_fix(transform: Any) -> Any:
    # timm's own RandAugment stops on Pillow 13 at 0 bits; give it the same posterize.
    for t in transform.transforms:
        for op in getattr(t, "ops", []):
            if op.name.startswith("Posterize"):
                op.aug_fn = posterize
    return transform


def _seeded(fn: Any, seed: int) -> Any:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return fn()


@pytest.mark.parametrize("interpolation", ["random", "bilinear", "bicubic"])
def test_train_transform_equals_timms_create_transform(interpolation: str) -> None:
    ours = build_train_transform(32, auto_augment=RECIPE_POLICY, re_prob=0.5, interpolation=interpolation)
    theirs = _timm_with_posterize_fix(
        create_transform(
            32, is_training=True, auto_augment=RECIPE_POLICY, re_prob=0.5, re_mode="pixel", interpolation=interpolation
        )
    )
    for seed, image in enumerate(_photos(60)):
        out = _seeded(lambda: ours({"image": image, "label": 1}), seed)
        expected = _seeded(lambda: theirs(image), seed)
        assert out["label"] == 1 and out["image"].is_contiguous()
        assert torch.equal(out["image"], expected), seed


@pytest.mark.parametrize("image_size, crop_pct", [(32, 0.875), (24, 0.9), (40, 1.0)])
def test_eval_transform_equals_timms_create_transform(image_size: int, crop_pct: float) -> None:
    ours = build_eval_transform(image_size, crop_pct=crop_pct)
    theirs = create_transform(image_size, is_training=False, interpolation="bicubic", crop_pct=crop_pct)
    for image in _photos(20):
        assert torch.equal(ours({"image": image})["image"], theirs(image))


def test_interpolation_is_checked_and_random_draws_both_modes() -> None:
    with pytest.raises(ValueError, match="interpolation"):
        build_train_transform(32, interpolation="nearest")  # type: ignore[arg-type]
    assert len(build_train_transform(32, interpolation="random").interpolations) == 2
    assert len(build_train_transform(32, interpolation="bicubic").interpolations) == 1
    # RandAugment's geometric ops draw their own interpolation unless one is fixed, as in timm.
    fixed = build_train_transform(32, auto_augment=RECIPE_POLICY, interpolation="bilinear").rand_augment
    drawn = build_train_transform(32, auto_augment=RECIPE_POLICY, interpolation="random").rand_augment
    assert all(op.kwargs["resample"] == Image.Resampling.BILINEAR for op in fixed.ops)
    assert all(isinstance(op.kwargs["resample"], tuple) and len(op.kwargs["resample"]) == 2 for op in drawn.ops)


def test_transforms_need_a_pil_image_in_rgb() -> None:
    with pytest.raises(TypeError, match="PIL image"):
        build_eval_transform(16)({"image": torch.zeros(3, 16, 16)})
    with pytest.raises(ValueError, match="RGB"):
        build_eval_transform(16)({"image": Image.new("L", (16, 16))})
