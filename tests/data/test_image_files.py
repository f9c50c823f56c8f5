"""ImageFilesDataModule: finding files, any mode upright, the eval pipelines' pixels, crop boxes, bad files."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from simpool_lightning.data import BadImageError, ImageFilesDataModule, ImageFilesDataset, find_images
from simpool_lightning.data.downstream import build_squash_transform
from simpool_lightning.data.image_files import map_to_original, short_names
from simpool_lightning.data.transforms import build_eval_transform

EXIF_ORIENTATION = 0x0112


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def rotated_jpeg(path: Path) -> Path:
    """Stored 48 wide and 24 tall, tagged "rotate 90 degrees clockwise to view" (orientation 6)."""
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    return save(path, noise(48, 24, seed=3), exif=exif.tobytes(), quality=95)


def dataset(files: list[Path], **kwargs) -> ImageFilesDataset:
    names = short_names([str(f) for f in files])
    return ImageFilesDataset([str(f) for f in files], names, **kwargs)


# ---------------------------------------------------------------------- finding files


def test_find_images_takes_folders_globs_and_files(tmp_path):
    a = save(tmp_path / "b.png", noise(8, 8))
    b = save(tmp_path / "a.JPG", noise(8, 8))
    (tmp_path / "notes.txt").write_text("not an image")
    c = save(tmp_path / "sub" / "c.webp", noise(8, 8))
    assert find_images(tmp_path) == [str(b), str(a)]  # sorted, images only, not the subfolder
    assert find_images(str(tmp_path / "**" / "*")) == [str(b), str(a), str(c)]
    assert find_images([str(c), str(tmp_path / "*.png"), str(c)]) == [str(c), str(a)]  # each once
    assert find_images(str(tmp_path / "notes.txt")) == [str(tmp_path / "notes.txt")]  # named: taken as it is


@pytest.mark.parametrize(
    "entry, message",
    [("missing.jpg", "image file or folder not found: '.*missing.jpg'"), ("empty", "folder '.*empty' holds no image file"),
     ("*.gif", "the glob '.*gif' holds no image file")],
)
def test_find_images_names_what_holds_nothing(tmp_path, entry, message):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=message):
        find_images(str(tmp_path / entry))


def test_short_names_are_relative_and_unique():
    files = ["/p/a/cat.jpg", "/p/a/cat.png", "/p/a/sub/dog.jpg"]
    assert short_names(files) == ["cat.jpg", "cat.png", "sub/dog"]
    assert short_names(["/x/one.jpg"]) == ["one"]


# ---------------------------------------------------------------------- pixels and geometry


@pytest.mark.parametrize("width, height", [(40, 30), (30, 40), (33, 97), (64, 64), (225, 17)])
@pytest.mark.parametrize("crop_pct", [0.875, 1.0])
def test_crop_equals_the_eval_pipeline(tmp_path, width, height, crop_pct):
    path = save(tmp_path / "x.png", noise(width, height))
    sample = dataset([path], image_size=32, crop_pct=crop_pct)[0]
    expected = build_eval_transform(32, crop_pct=crop_pct)({"image": Image.open(path).convert("RGB")})["image"]
    torch.testing.assert_close(sample["image"], expected.as_subclass(torch.Tensor), rtol=0, atol=0)
    assert sample["size"].tolist() == [height, width]


@pytest.mark.parametrize("width, height", [(40, 30), (33, 97)])
def test_squash_equals_the_squash_pipeline(tmp_path, width, height):
    path = save(tmp_path / "x.png", noise(width, height))
    sample = dataset([path], image_size=32, resize="squash")[0]
    expected = build_squash_transform(32)({"image": Image.open(path).convert("RGB")})["image"]
    # The same pixels; the two normalisations round differently by an ulp or two of values below 3.
    torch.testing.assert_close(sample["image"], expected.as_subclass(torch.Tensor), rtol=0, atol=1e-6)
    assert sample["crop_box"].tolist() == [0.0, 0.0, width, height]


@pytest.mark.parametrize("resize", ["crop", "squash"])
@pytest.mark.parametrize("width, height", [(400, 240), (240, 400), (333, 517), (225, 170)])
def test_crop_box_maps_the_input_back_onto_the_original(tmp_path, resize, width, height):
    # A bright square at a known place; found in the model's input, then mapped back through crop_box.
    original = np.zeros((height, width, 3), dtype=np.uint8)
    cx, cy = round(0.58 * width), round(0.47 * height)
    original[cy - 20 : cy + 20, cx - 20 : cx + 20] = 255
    path = save(tmp_path / "square.png", Image.fromarray(original))
    sample = dataset([path], image_size=64, resize=resize, crop_pct=0.875)[0]
    # The brightness-weighted centre (resampling keeps it), in the input's pixel-edge coordinates.
    weight = (sample["image"][0].double() * 0.229 + 0.485).clamp_min(0)
    grid = torch.arange(64, dtype=torch.float64) + 0.5
    xs = (weight.sum(0) * grid).sum() / weight.sum()
    ys = (weight.sum(1) * grid).sum() / weight.sum()
    x0, y0, x1, y1 = sample["crop_box"].tolist()
    x = x0 + xs.item() / 64 * (x1 - x0)
    y = y0 + ys.item() / 64 * (y1 - y0)
    assert abs(x - cx) < 0.5 and abs(y - cy) < 0.5
    if resize == "crop":  # the centre, its side the short side's 64 / floor(64 / 0.875) = 64 / 73
        scale = min(width, height) / 73  # original pixels per resized pixel
        # Off the centre by at most half a resized pixel (the crop offset is rounded), plus the
        # long side's truncation to whole resized pixels.
        assert abs((x0 + x1) / 2 - width / 2) <= 1.01 * scale and abs((y0 + y1) / 2 - height / 2) <= 1.01 * scale
        assert abs((x1 - x0) - 64 * scale) <= scale and abs((y1 - y0) - 64 * scale) <= scale


def test_map_to_original_resizes_within_the_box_and_is_zero_outside():
    attn = torch.rand(8, 8, generator=torch.Generator().manual_seed(0))
    full = map_to_original(attn, (30, 50), (0.0, 0.0, 50.0, 30.0))
    expected = F.interpolate(attn[None, None], size=(30, 50), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(full, expected, rtol=0, atol=1e-6)
    part = map_to_original(attn, (50, 60), (10.0, 5.0, 50.0, 45.0))  # a 40 x 40 box
    assert (part[:, :10] == 0).all() and (part[:, 50:] == 0).all() and (part[:5] == 0).all() and (part[45:] == 0).all()
    inner = F.interpolate(attn[None, None], size=(40, 40), mode="bilinear", align_corners=False)[0, 0]
    torch.testing.assert_close(part[5:45, 10:50], inner, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- modes and orientation


def test_exif_orientation_is_applied(tmp_path):
    path = rotated_jpeg(tmp_path / "r.jpg")
    sample = dataset([path], image_size=16, resize="squash")[0]
    assert sample["size"].tolist() == [48, 24]  # upright: 24 wide, 48 tall
    upright = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    expected = build_squash_transform(16)({"image": upright})["image"]
    torch.testing.assert_close(sample["image"], expected.as_subclass(torch.Tensor), rtol=0, atol=1e-6)
    assert not torch.allclose(sample["image"], build_squash_transform(16)({"image": Image.open(path).convert("RGB")})["image"])


def test_every_mode_comes_out_rgb(tmp_path):
    palette = Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).convert("P")
    palette.info["transparency"] = 0
    rgba = Image.fromarray(np.random.default_rng(0).integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    files = [
        save(tmp_path / "l.png", noise(10, 12).convert("L")),
        save(tmp_path / "rgba.png", rgba),
        save(tmp_path / "p.png", palette, transparency=0),
        save(tmp_path / "i16.png", Image.fromarray(np.full((6, 5), 40000, dtype=np.uint16))),
        save(tmp_path / "cmyk.jpg", noise(11, 13).convert("CMYK")),
    ]
    data = dataset(files, image_size=16)
    for i, (w, h) in enumerate([(10, 12), (7, 9), (8, 8), (5, 6), (11, 13)]):
        sample = data[i]
        assert sample["image"].shape == (3, 16, 16) and sample["size"].tolist() == [h, w]


# ---------------------------------------------------------------------- the DataModule


def test_setup_raises_naming_the_corrupt_file_or_skips_it(tmp_path):
    save(tmp_path / "good.png", noise(20, 10))
    good = (tmp_path / "good.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(BadImageError, match=r"broken\.png.*on_bad_image='skip'"):
        ImageFilesDataModule(str(tmp_path), image_size=16).setup("predict")
    data = ImageFilesDataModule(str(tmp_path), image_size=16, on_bad_image="skip", batch_size=4)
    data.setup("predict")
    assert sorted(Path(p).name for p in data.skipped) == ["broken.png", "empty.jpg"]
    (batch,) = list(data.predict_dataloader())
    assert batch["image"].shape == (1, 3, 16, 16) and batch["name"] == ["good"] and batch["path"] == [str(tmp_path / "good.png")]
    assert batch["size"].tolist() == [[10, 20]] and batch["crop_box"].shape == (1, 4)


def test_nothing_readable_and_bad_settings_are_errors(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(BadImageError, match="none of the 1 image files is readable"):
        ImageFilesDataModule(str(tmp_path), on_bad_image="skip").setup("predict")
    with pytest.raises(ValueError, match="crop_pct must be in"):
        ImageFilesDataModule(str(tmp_path), crop_pct=1.5)
    with pytest.raises(ValueError, match="resize must be 'crop' or 'squash'"):
        ImageFilesDataModule(str(tmp_path), resize="stretch")
    with pytest.raises(ValueError, match="on_bad_image must be"):
        ImageFilesDataModule(str(tmp_path), on_bad_image="ignore")


def test_defaults_are_timms_eval_settings(tmp_path):
    save(tmp_path / "x.png", noise(300, 260))
    data = ImageFilesDataModule(str(tmp_path))
    data.setup("predict")
    assert data.predict_set.image_size == 224 and data.predict_set.crop_pct == 0.875
    assert data.predict_set[0]["image"].shape == (3, 224, 224)
    with pytest.raises(RuntimeError, match="no test split"):
        data.test_dataloader()
