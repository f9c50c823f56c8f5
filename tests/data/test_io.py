"""Reading images (every mode to RGB, the bad-file policy), the dict transforms and the batch collate."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision import tv_tensors

from simpool_lightning.data import (
    BadImageError,
    FileDataset,
    FileSample,
    build_eval_transform,
    build_train_transform,
    collate_samples,
    load_rgb,
)


def _rgb(path: Path) -> np.ndarray:
    image = load_rgb(path)
    assert image.mode == "RGB"
    return np.asarray(image)


def _save(image: Image.Image, path: Path, **kwargs) -> Path:
    image.save(path, **kwargs)
    return path


def _jpeg(path: Path, colour: tuple[int, int, int] = (200, 30, 30), size: int = 16) -> Path:
    return _save(Image.new("RGB", (size, size), colour), path, quality=95)


# -------------------------------------------------------------------------------------- load_rgb


def test_grayscale_jpeg_becomes_equal_channels(tmp_path: Path) -> None:
    rgb = _rgb(_save(Image.new("L", (8, 8), 90), tmp_path / "gray.jpg"))
    assert rgb.shape == (8, 8, 3)
    assert np.all(np.abs(rgb.astype(int) - 90) <= 1)


def test_cmyk_jpeg_converts_to_rgb(tmp_path: Path) -> None:
    # Pure cyan in CMYK (C=255, M=Y=K=0) is (0, 255, 255) in RGB.
    rgb = _rgb(_save(Image.new("CMYK", (8, 8), (255, 0, 0, 0)), tmp_path / "cmyk.jpg", quality=100))
    assert np.all(np.abs(rgb.astype(int) - [0, 255, 255]) <= 3)


def test_rgba_png_is_composited_on_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (2, 1))
    image.putpixel((0, 0), (10, 20, 30, 255))  # opaque: kept
    image.putpixel((1, 0), (10, 20, 30, 0))  # fully transparent: its stored colour must not show
    rgb = _rgb(_save(image, tmp_path / "rgba.png"))
    assert rgb[0, 0].tolist() == [10, 20, 30]
    assert rgb[0, 1].tolist() == [255, 255, 255]


def test_palette_png_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (2, 1))
    image.putpalette([0, 0, 255] + [0, 255, 0] * 255)
    image.putpixel((0, 0), 0)
    image.putpixel((1, 0), 1)
    rgb = _rgb(_save(image, tmp_path / "palette.png", transparency=1))
    assert rgb[0, 0].tolist() == [0, 0, 255]
    assert rgb[0, 1].tolist() == [255, 255, 255]


def test_16_bit_png_is_rescaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 257 * 128, 65535]], dtype=np.uint16)
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    assert Image.open(path).mode == "I;16"
    rgb = _rgb(path)
    assert rgb[0, :, 0].tolist() == [0, 128, 255]  # 65535 -> 255, not 255 everywhere above 255
    assert np.all(rgb == rgb[..., :1])


@pytest.mark.parametrize(
    "write, expected",
    [
        (lambda p: p.write_bytes(b""), "empty"),
        (lambda p: p.write_bytes(b"this is not an image at all" * 10), "cannot read"),
        (lambda p: p.write_bytes(_jpeg(p.with_suffix(".ok.jpg"), size=64).read_bytes()[:300]), "cannot read"),
    ],
    ids=["zero-byte", "garbage", "truncated"],
)
def test_bad_files_raise_naming_the_file(tmp_path: Path, write, expected: str) -> None:
    path = tmp_path / "bad.jpg"
    write(path)
    with pytest.raises(BadImageError, match=expected) as info:
        load_rgb(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_bad_image(tmp_path: Path) -> None:
    with pytest.raises(BadImageError, match="missing.jpg"):
        load_rgb(tmp_path / "missing.jpg")


# ----------------------------------------------------------------------------------- FileDataset


def _samples(tmp_path: Path) -> list[FileSample]:
    good0 = _jpeg(tmp_path / "good0.jpg", (255, 0, 0))
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"")
    good1 = _jpeg(tmp_path / "good1.jpg", (0, 0, 255))
    return [FileSample(str(good0), 0), FileSample(str(bad), 1), FileSample(str(good1), 2)]


def test_file_dataset_raise_names_the_file(tmp_path: Path) -> None:
    data = FileDataset(_samples(tmp_path), on_bad_image="raise")
    assert data[0]["label"] == 0
    with pytest.raises(BadImageError, match="bad.jpg"):
        data[1]


def test_file_dataset_skip_takes_the_next_image_and_records(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = FileDataset(_samples(tmp_path), on_bad_image="skip")
    with caplog.at_level(logging.WARNING, logger="simpool_lightning.data.io"):
        sample = data[1]
    assert sample["label"] == 2
    assert data.skipped == [str(tmp_path / "bad.jpg")]
    assert "bad.jpg" in caplog.text


def test_file_dataset_all_bad_raises(tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG garbage")
    with pytest.raises(BadImageError, match="every one"):
        FileDataset([FileSample(str(bad), 0)], on_bad_image="skip")[0]


def test_file_dataset_rejects_unknown_policy(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="on_bad_image"):
        FileDataset(_samples(tmp_path), on_bad_image="ignore")  # type: ignore[arg-type]


def test_mask_of_another_size_is_an_error_naming_both(tmp_path: Path) -> None:
    image = _jpeg(tmp_path / "img.jpg", size=16)
    mask = _save(Image.new("L", (8, 8), 255), tmp_path / "mask.png")
    data = FileDataset([FileSample(str(image), 0, mask_path=str(mask))])
    with pytest.raises(BadImageError, match="mask.png.*8x8.*img.jpg.*16x16"):
        data[0]


# ------------------------------------------------------------------------------------ transforms


def _square_sample(tmp_path: Path) -> dict:
    """A 64x48 black image with a white square, its mask and box, read as FileDataset reads them."""
    array = np.zeros((48, 64, 3), dtype=np.uint8)
    array[10:30, 20:44] = 255
    image = _save(Image.fromarray(array), tmp_path / "square.png")
    mask = _save(Image.fromarray(array[..., 0]), tmp_path / "square_mask.png")
    box = torch.tensor([[20.0, 10.0, 44.0, 30.0]])
    return FileDataset([FileSample(str(image), 3, boxes=box, mask_path=str(mask))])[0]


def test_train_transform_moves_image_mask_and_box_together(tmp_path: Path) -> None:
    torch.manual_seed(0)
    transform = build_train_transform(32, scale=(0.5, 1.0), hflip=0.5)
    white = (1.0 - torch.tensor(IMAGENET_DEFAULT_MEAN)) / torch.tensor(IMAGENET_DEFAULT_STD)
    for _ in range(10):
        out = transform(_square_sample(tmp_path))
        assert out["image"].shape == (3, 32, 32) and out["image"].dtype == torch.float32
        assert out["label"] == 3
        mask = out["mask"].bool()[0] if out["mask"].dim() == 3 else out["mask"].bool()
        if mask.sum() < 4:  # the crop missed the square
            continue
        inner = mask.clone()
        inner[1:-1, 1:-1] &= mask[:-2, 1:-1] & mask[2:, 1:-1] & mask[1:-1, :-2] & mask[1:-1, 2:]
        # Away from the resampled border, masked pixels are white and the rest black.
        assert torch.allclose(out["image"][:, inner].mean(1), white, atol=0.3)
        x1, y1, x2, y2 = out["boxes"][0].tolist()
        cols, rows = mask.any(0).nonzero()[:, 0], mask.any(1).nonzero()[:, 0]
        assert abs(x1 - cols[0]) <= 1.5 and abs(x2 - cols[-1] - 1) <= 1.5
        assert abs(y1 - rows[0]) <= 1.5 and abs(y2 - rows[-1] - 1) <= 1.5


def test_eval_transform_resizes_and_crops(tmp_path: Path) -> None:
    out = build_eval_transform(24, crop_pct=1.0)(_square_sample(tmp_path))
    assert out["image"].shape == (3, 24, 24)
    with pytest.raises(ValueError, match="crop_pct"):
        build_eval_transform(24, crop_pct=1.5)


def test_rand_augment_and_erasing_touch_only_the_image(tmp_path: Path) -> None:
    torch.manual_seed(0)
    transform = build_train_transform(32, auto_augment="rand-m9-mstd0.5-inc1", re_prob=1.0)
    out = transform(_square_sample(tmp_path))
    assert out["image"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="RandAugment"):
        build_train_transform(32, auto_augment="v0")


# --------------------------------------------------------------------------------------- collate


def test_collate_batch_contract() -> None:
    samples = [
        {
            "image": tv_tensors.Image(torch.rand(3, 8, 8)),
            "label": i,
            "mask": tv_tensors.Mask(torch.ones(8, 8, dtype=torch.uint8)),
            "boxes": (
                tv_tensors.BoundingBoxes([[0, 0, 4, 4]], format="XYXY", canvas_size=(8, 8))
                if i
                else torch.tensor([[0, 0, 2, 2], [1, 1, 8, 8]])
            ),
            "name": f"img{i}",
        }
        for i in range(2)
    ]
    batch = collate_samples(samples)
    assert batch["image"].shape == (2, 3, 8, 8) and type(batch["image"]) is torch.Tensor
    assert batch["label"].dtype == torch.long and batch["label"].tolist() == [0, 1]
    assert batch["mask"].shape == (2, 8, 8) and batch["mask"].dtype == torch.bool
    assert [b.shape for b in batch["boxes"]] == [(2, 4), (1, 4)]
    assert all(b.dtype == torch.float32 and type(b) is torch.Tensor for b in batch["boxes"])
    assert batch["name"] == ["img0", "img1"]
    with pytest.raises(ValueError, match="empty"):
        collate_samples([])
