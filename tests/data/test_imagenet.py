"""ImageNetDataModule on a tiny fabricated ImageFolder tree."""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpool_lightning.data import BadImageError, ImageNetDataModule

SIZE = 32
# Created out of order, so that sorting is what puts them in order.
CLASSES = ["n03000000", "n01000000", "n02000000"]


def _image(path: Path, value: int) -> None:
    """A small solid image; the format follows the (case-insensitive) extension."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (40, 30), (value, value, value)).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")


def _tree(root: Path, train_per_class: int = 5, val_per_class: int = 2) -> Path:
    extensions = [".JPEG", ".jpg", ".png", ".PNG", ".jpeg"]
    for c, wnid in enumerate(CLASSES):
        for i in reversed(range(train_per_class)):
            _image(root / "train" / wnid / f"{wnid}_{i:02d}{extensions[i % len(extensions)]}", 10 * c + i)
        for i in range(val_per_class):
            _image(root / "val" / wnid / f"val_{wnid}_{i}.JPEG", 100 + 10 * c + i)
        (root / "train" / wnid / "notes.txt").write_text("not an image")
        (root / "train" / wnid / ".DS_Store").write_bytes(b"\0")
    return root


def _module(root: Path, **kwargs) -> ImageNetDataModule:
    kwargs = {"image_size": SIZE, "batch_size": 4, "num_workers": 0, **kwargs}
    return ImageNetDataModule(str(root), **kwargs)


def _names(dataset) -> list[tuple[str, int]]:
    return [(Path(s.path).name, s.label) for s in dataset.samples]


def test_classes_are_sorted_folder_names(tmp_path: Path) -> None:
    dm = _module(_tree(tmp_path))
    assert dm.classes == sorted(CLASSES)
    assert dm.num_classes == 3


def test_files_sorted_all_extensions_any_case(tmp_path: Path) -> None:
    dm = _module(_tree(tmp_path))
    dm.setup("fit")
    names = _names(dm.train_set)
    assert len(names) == 15  # .JPEG .jpg .png .PNG .jpeg all count; .txt and hidden files do not
    n01 = [n for n, label in names if label == 0]
    assert n01 == sorted(n01) and all(n.startswith("n01000000") for n in n01)
    assert len(dm.val_set) == 6
    assert dm.test_dataloader().dataset is dm.val_set


def test_images_per_class_keeps_the_first_in_sorted_order_for_train_only(tmp_path: Path) -> None:
    dm = _module(_tree(tmp_path), images_per_class=2)
    dm.setup("fit")
    assert _names(dm.train_set) == [
        (f"{wnid}_{i:02d}{ext}", label)
        for label, wnid in enumerate(sorted(CLASSES))
        for i, ext in [(0, ".JPEG"), (1, ".jpg")]
    ]
    assert len(dm.val_set) == 6  # validation is never subsampled
    with pytest.raises(ValueError, match="images_per_class"):
        _module(tmp_path, images_per_class=0)


def test_a_batch(tmp_path: Path) -> None:
    dm = _module(_tree(tmp_path), batch_size=4)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
    assert batch["label"].shape == (4,) and batch["label"].dtype == torch.long
    val = next(iter(dm.val_dataloader()))
    assert val["image"].shape == (4, 3, SIZE, SIZE)
    assert val["label"].tolist() == [0, 0, 1, 1]


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        _module(tmp_path / "nowhere").classes


def test_missing_split_folder(tmp_path: Path) -> None:
    _tree(tmp_path)
    for path in sorted((tmp_path / "val").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(FileNotFoundError, match=r"val folder not found.*val/<class>/<image>"):
        _module(tmp_path).classes


def test_empty_class_folder_is_named(tmp_path: Path) -> None:
    _tree(tmp_path)
    empty = tmp_path / "train" / "n04000000"
    empty.mkdir()
    (tmp_path / "val" / "n04000000").mkdir()
    _image(tmp_path / "val" / "n04000000" / "x.JPEG", 0)
    (empty / "readme.txt").write_text("no images here")
    dm = _module(tmp_path)
    with pytest.raises(ValueError, match=r"1 class folder\(s\) hold no image.*train/n04000000"):
        dm.setup("fit")


def test_class_sets_that_differ_are_listed(tmp_path: Path) -> None:
    _tree(tmp_path)
    (tmp_path / "train" / "n09000000").mkdir()
    (tmp_path / "val" / "n01000000").rename(tmp_path / "val" / "n08000000")
    with pytest.raises(ValueError, match=r"2 only in train \(n01000000, n09000000\), 1 only in val \(n08000000\)"):
        _module(tmp_path).classes


def test_no_images_at_all(tmp_path: Path) -> None:
    _image(tmp_path / "train" / "loose.JPEG", 0)  # a flat folder: no class folders
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no images found.*1 image files directly"):
        _module(tmp_path).classes

    for split in ("train", "val"):
        for wnid in CLASSES:
            (tmp_path / "other" / split / wnid).mkdir(parents=True)
    with pytest.raises(ValueError, match=r"no images at all under .*other/train.*none of its 3 class folders"):
        _module(tmp_path / "other").setup("fit")


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda p: p.write_bytes(b""),
        lambda p: p.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg"),
        lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    ],
    ids=["zero-byte", "corrupt", "truncated"],
)
def test_bad_image_raise_or_skip(tmp_path: Path, caplog: pytest.LogCaptureFixture, corrupt) -> None:
    _tree(tmp_path, train_per_class=2)
    bad = tmp_path / "train" / "n01000000" / "n01000000_00.JPEG"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(bad, format="JPEG")
    corrupt(bad)

    dm = _module(tmp_path)
    dm.setup("fit")
    with pytest.raises(BadImageError, match="n01000000_00.JPEG"):
        dm.train_set[0]

    dm = _module(tmp_path, on_bad_image="skip")
    dm.setup("fit")
    with caplog.at_level(logging.WARNING, logger="simpool_lightning.data.io"):
        sample = dm.train_set[0]
    assert sample["label"] == 0  # the next readable image, of the same class here
    assert dm.skipped == [str(bad)]
    assert "n01000000_00.JPEG" in caplog.text


def test_non_rgb_inputs_load_as_rgb(tmp_path: Path) -> None:
    _tree(tmp_path, train_per_class=1, val_per_class=1)
    folder = tmp_path / "val" / "n01000000"
    Image.new("L", (40, 30), 77).save(folder / "gray.JPEG")
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(folder / "cmyk.JPEG", quality=100)  # red
    Image.new("RGBA", (40, 30), (0, 0, 0, 0)).save(folder / "rgba.png")  # transparent -> white
    Image.fromarray(np.full((30, 40), 65535, dtype=np.uint16)).save(folder / "deep.png")  # 16-bit white
    dm = _module(tmp_path, crop_pct=1.0)
    dm.setup("validate")
    images = {Path(s.path).name: dm.val_set[i]["image"] for i, s in enumerate(dm.val_set.samples)}
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]

    def rgb(name: str) -> list[float]:
        return (images[name] * std + mean).mean((1, 2)).mul(255).tolist()

    assert images["gray.JPEG"].shape == (3, SIZE, SIZE)
    assert np.allclose(rgb("gray.JPEG"), 77, atol=2)
    assert np.allclose(rgb("cmyk.JPEG"), [255, 0, 0], atol=4)
    assert np.allclose(rgb("rgba.png"), 255, atol=1)
    assert np.allclose(rgb("deep.png"), 255, atol=1)
