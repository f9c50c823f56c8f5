"""CIFAR-10/100, Flowers-102 and Stanford Cars DataModules on tiny fabricated copies of the real layouts."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from torchvision.datasets import StanfordCars

from simpool_lightning.data import (
    BadImageError,
    CIFAR10DataModule,
    CIFAR100DataModule,
    Flowers102DataModule,
    StanfordCarsDataModule,
)

from .downstream_files import np_str_cells, write_corrupt, write_image

SIZE = 32


# ---------------------------------------------------------------------------------------------- CIFAR


def _cifar_images(n: int, offset: int) -> np.ndarray:
    """(n, 3072) uint8 rows, channel planes R, G, B; image i is pure red with value 100 + offset + i."""
    data = np.zeros((n, 3, 32, 32), dtype=np.uint8)
    data[:, 0] = (100 + offset + np.arange(n))[:, None, None]
    return data.reshape(n, -1)


def _dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar10(root: Path) -> dict[str, list[int]]:
    base = root / "cifar-10-batches-py"
    train_labels = []
    for i in range(1, 6):
        labels = [(2 * i) % 10, (2 * i + 1) % 10]
        train_labels += labels
        batch = {"batch_label": f"training batch {i} of 5", "data": _cifar_images(2, 2 * i), "labels": labels, "filenames": ["a", "b"]}
        _dump(base / f"data_batch_{i}", batch)
    test_labels = [3, 1, 4]
    _dump(base / "test_batch", {"batch_label": "testing batch 1 of 1", "data": _cifar_images(3, 0), "labels": test_labels, "filenames": ["x"] * 3})
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    _dump(base / "batches.meta", {"num_cases_per_batch": 10000, "label_names": names, "num_vis": 3072})
    return {"train": train_labels, "test": test_labels}


def make_cifar100(root: Path) -> dict[str, list[int]]:
    base = root / "cifar-100-python"
    train, test = [5, 99, 0, 42], [7, 98]
    _dump(base / "train", {"data": _cifar_images(4, 0), "fine_labels": train, "coarse_labels": [0] * 4, "filenames": ["t"] * 4})
    _dump(base / "test", {"data": _cifar_images(2, 0), "fine_labels": test, "coarse_labels": [1] * 2, "filenames": ["t"] * 2})
    _dump(base / "meta", {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]})
    return {"train": train, "test": test}


def test_cifar10_reads_pickles_as_written(tmp_path: Path) -> None:
    written = make_cifar10(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), image_size=SIZE, batch_size=2)
    assert dm.num_classes == 10 and dm.classes[3] == "cat"  # before setup
    dm.setup("fit")
    assert dm.train_set.labels == written["train"] and dm.test_set.labels == written["test"]
    assert dm.val_set is dm.test_set
    # Rows are channel planes: image 1 of the test batch is pure red of value 101.
    assert dm.test_set.images[1, 5, 7].tolist() == [101, 0, 0]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["label"].tolist() == [3, 1]
    assert (batch["image"][:, 0] > batch["image"][:, 1]).all()  # red stays red
    train_batch = next(iter(dm.train_dataloader()))
    assert train_batch["image"].shape == (2, 3, SIZE, SIZE) and train_batch["label"].dtype == torch.long


def test_cifar100_fine_labels(tmp_path: Path) -> None:
    written = make_cifar100(tmp_path)
    dm = CIFAR100DataModule(str(tmp_path), image_size=SIZE, batch_size=4)
    dm.setup()
    assert dm.num_classes == 100 and dm.classes[42] == "fine42"
    assert dm.train_set.labels == written["train"]
    assert next(iter(dm.val_dataloader()))["label"].tolist() == written["test"]


def test_cifar_label_count_mismatch_names_file(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    _dump(bad, {"data": _cifar_images(2, 0), "labels": [1, 2, 3]})
    with pytest.raises(ValueError, match="data_batch_3.*2 images but 3 labels"):
        CIFAR10DataModule(str(tmp_path)).setup()


def test_cifar_missing_batch_and_bad_label(tmp_path: Path) -> None:
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        CIFAR10DataModule(str(tmp_path)).setup()
    _dump(tmp_path / "cifar-10-batches-py" / "test_batch", {"data": _cifar_images(1, 0), "labels": [10]})
    with pytest.raises(ValueError, match=r"test_batch.*\[0, 10\)"):
        CIFAR10DataModule(str(tmp_path)).setup()


# ---------------------------------------------------------------------------------------- Flowers-102


def make_flowers(root: Path, labels: list[int], num_images: int | None = None) -> Path:
    """Images 1..num_images, 1-based ``labels`` per image; trnid {1, 2}, valid {3}, tstid {4, 5, 6}."""
    base = root / "flowers-102"
    for i in range(1, (num_images or len(labels)) + 1):
        write_image(base / "jpg" / f"image_{i:05d}.jpg", (48, 40), rect=(8, 8, 24, 24))
    scipy.io.savemat(base / "imagelabels.mat", {"labels": np.array([labels], dtype=np.uint8)})
    scipy.io.savemat(
        base / "setid.mat",
        {"trnid": np.array([[1, 2]], np.uint16), "valid": np.array([[3]], np.uint16), "tstid": np.array([[4, 5, 6]], np.uint16)},
    )
    return base


def test_flowers_splits_follow_setid(tmp_path: Path) -> None:
    make_flowers(tmp_path, [1, 102, 5, 77, 77, 3])
    dm = Flowers102DataModule(str(tmp_path), image_size=SIZE, batch_size=3)
    assert dm.num_classes == 102 and dm.classes[0] == "pink primrose"
    dm.setup()
    assert [s.label for s in dm.train_set.samples] == [0, 101, 4]  # trnid + valid
    assert [Path(s.path).name for s in dm.test_set.samples] == ["image_00004.jpg", "image_00005.jpg", "image_00006.jpg"]
    assert dm.val_set is dm.test_set
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (3, 3, SIZE, SIZE) and batch["label"].tolist() == [76, 76, 2]

    dm = Flowers102DataModule(str(tmp_path), image_size=SIZE, train_split="train")
    dm.setup()
    assert [s.label for s in dm.train_set.samples] == [0, 101]
    assert [s.label for s in dm.val_set.samples] == [4]
    assert [s.label for s in dm.test_set.samples] == [76, 76, 2]


def test_flowers_label_count_mismatch(tmp_path: Path) -> None:
    make_flowers(tmp_path, [1, 2, 3, 4, 5], num_images=6)
    with pytest.raises(ValueError, match="imagelabels.mat.*5 labels.*6 images"):
        Flowers102DataModule(str(tmp_path)).setup()


def test_flowers_missing_setid(tmp_path: Path) -> None:
    (make_flowers(tmp_path, [1] * 6) / "setid.mat").unlink()
    with pytest.raises(FileNotFoundError, match="setid.mat"):
        Flowers102DataModule(str(tmp_path)).setup()


def test_flowers_corrupt_image_raise_and_skip(tmp_path: Path) -> None:
    base = make_flowers(tmp_path, [1, 2, 3, 4, 5, 6])
    bad = write_corrupt(base / "jpg" / "image_00005.jpg")
    dm = Flowers102DataModule(str(tmp_path), image_size=SIZE, batch_size=3)
    dm.setup()
    with pytest.raises(BadImageError, match="image_00005.jpg"):
        next(iter(dm.test_dataloader()))
    dm = Flowers102DataModule(str(tmp_path), image_size=SIZE, batch_size=3, on_bad_image="skip")
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["label"].tolist() == [3, 5, 5]  # the unreadable image is replaced by the next one
    assert dm.skipped == [str(bad)]


# --------------------------------------------------------------------------------------- Stanford Cars


def make_cars(root: Path, train: list[tuple[str, int]], test: list[tuple[str, int]]) -> Path:
    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = [f"Car Model {i}" for i in range(1, 197)]
    scipy.io.savemat(base / "devkit" / "cars_meta.mat", {"class_names": np_str_cells(names)})
    fields = ["bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname"]

    def annotations(rows: list[tuple[str, int]]) -> np.ndarray:
        records = np.empty((1, len(rows)), dtype=[(f, "O") for f in fields])
        for j, (fname, cls) in enumerate(rows):
            box = [np.array([[v]], dtype=np.uint8) for v in (3, 4, 30, 20)]
            records[0, j] = (*box, np.array([[cls]], dtype=np.uint8), np.array([fname]))
        return records

    scipy.io.savemat(base / "devkit" / "cars_train_annos.mat", {"annotations": annotations(train)})
    scipy.io.savemat(base / "cars_test_annos_withlabels.mat", {"annotations": annotations(test)})
    for folder, rows in (("cars_train", train), ("cars_test", test)):
        for fname, _ in rows:
            write_image(base / folder / fname, (40, 30), rect=(3, 4, 30, 20))
    return base


def test_stanford_cars_matches_torchvision_reading(tmp_path: Path) -> None:
    # Two test rows: torchvision cannot iterate a file with a single annotation (squeezed to 0-d).
    train, test = [("00001.jpg", 1), ("00002.jpg", 196), ("00003.jpg", 14)], [("00001.jpg", 7), ("00002.jpg", 2)]
    make_cars(tmp_path, train, test)
    dm = StanfordCarsDataModule(str(tmp_path), image_size=SIZE, batch_size=3)
    assert dm.num_classes == 196 and dm.classes[195] == "Car Model 196"
    dm.setup()
    # The layout is the one torchvision's own class reads: same files, labels and names.
    for split, ours in (("train", dm.train_set), ("test", dm.test_set)):
        theirs = StanfordCars(str(tmp_path), split=split, download=False)
        assert [(s.path, s.label) for s in ours.samples] == [(str(p), t) for p, t in theirs._samples]
        assert theirs.classes == dm.classes
    assert [s.label for s in dm.train_set.samples] == [0, 195, 13]
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["label"].tolist() == [6, 1]


def test_stanford_cars_errors(tmp_path: Path) -> None:
    make_cars(tmp_path, [("00001.jpg", 197)], [("00001.jpg", 1)])
    with pytest.raises(ValueError, match=r"cars_train_annos.mat.*\[0, 196\)"):
        StanfordCarsDataModule(str(tmp_path)).setup()
    (make_cars(tmp_path / "other", [("00001.jpg", 1)], [("00001.jpg", 1)]) / "cars_test_annos_withlabels.mat").unlink()
    with pytest.raises(FileNotFoundError, match="cars_test_annos_withlabels.mat"):
        StanfordCarsDataModule(str(tmp_path / "other")).setup()
