"""The paper's fine-tuning classification sets: CIFAR-10, CIFAR-100, Oxford Flowers-102, Stanford Cars.

Read in the layouts of ``shared/DATASETS.md``, which are torchvision's. The torchvision classes
themselves are not used: CIFAR and Flowers-102 check the MD5 of every file, so they refuse any file
that is not the original download and say only "not found or corrupted" without naming it; parsing
the same files here takes a few lines, names the file in every error, and feeds
:class:`~.io.FileDataset` and its bad-image policy.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import Flowers102

from .downstream import ClassificationDataModule, Transform, load_mat, require_file
from .io import FileSample, OnBadImage

__all__ = ["ArrayDataset", "CIFAR10DataModule", "CIFAR100DataModule", "Flowers102DataModule", "StanfordCarsDataModule"]


def _check_labels(labels: Sequence[int], num_classes: int, source: str | os.PathLike) -> None:
    if len(labels) and not (0 <= min(labels) and max(labels) < num_classes):
        raise ValueError(
            f"labels in {str(source)!r} must lie in [0, {num_classes}) after conversion to 0-based, "
            f"got range [{min(labels)}, {max(labels)}]"
        )


class ArrayDataset(Dataset):
    """Images held in memory as ``(N, H, W, 3)`` uint8, served as sample dicts.

    Args:
        images: ``(N, H, W, 3)`` uint8 array.
        labels: ``N`` class indices.
        transform: callable on ``{"image": PIL image, "label": int}``.
    """

    def __init__(self, images: np.ndarray, labels: Sequence[int], transform: Optional[Transform] = None) -> None:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be (N, H, W, 3) uint8, got {images.shape} {images.dtype}")
        if len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = [int(x) for x in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = {"image": Image.fromarray(self.images[index]), "label": self.labels[index]}
        return self.transform(sample) if self.transform is not None else sample


# --------------------------------------------------------------------------------------------------
# CIFAR


class _CIFARDataModule(ClassificationDataModule):
    """CIFAR from the python pickle batches torchvision reads (``root/<base_folder>/``).

    Train on the training batches; validation and test are both the test batch (CIFAR has no
    separate validation split). Images are 32x32 and upsampled to ``image_size`` by the pipelines.
    """

    base_folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    meta_key: str
    label_key: str

    def _read_classes(self) -> list[str]:
        meta = self._unpickle(self.meta_file, "CIFAR metadata")
        if self.meta_key not in meta:
            raise ValueError(f"CIFAR metadata {str(self.root / self.base_folder / self.meta_file)!r} lacks {self.meta_key!r}")
        return [str(name) for name in meta[self.meta_key]]

    def _unpickle(self, name: str, what: str) -> dict[str, Any]:
        path = require_file(self.root / self.base_folder / name, what)
        try:
            with open(path, "rb") as f:
                # latin1: the original batches were pickled by Python 2 (as torchvision reads them).
                return pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
            raise ValueError(f"cannot unpickle {what} {str(path)!r}: {err}") from err

    def _read_split(self, files: Sequence[str]) -> tuple[np.ndarray, list[int]]:
        images, labels = [], []
        for name in files:
            entry = self._unpickle(name, "CIFAR batch")
            path = self.root / self.base_folder / name
            if "data" not in entry or self.label_key not in entry:
                raise ValueError(f"CIFAR batch {str(path)!r} needs 'data' and {self.label_key!r}, has {sorted(entry)}")
            data = np.asarray(entry["data"])
            if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
                raise ValueError(f"CIFAR batch {str(path)!r}: 'data' must be (N, 3072) uint8, got {data.shape} {data.dtype}")
            if len(entry[self.label_key]) != len(data):
                raise ValueError(f"CIFAR batch {str(path)!r} has {len(data)} images but {len(entry[self.label_key])} labels")
            _check_labels(list(entry[self.label_key]), self.num_classes, path)
            images.append(data)
            labels += [int(x) for x in entry[self.label_key]]
        # Stored channel-first per row (R plane, G plane, B plane); PIL wants (H, W, 3).
        return np.concatenate(images).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        train = ArrayDataset(*self._read_split(self.train_files), transform=self.train_transform)
        test = ArrayDataset(*self._read_split(self.test_files), transform=self.eval_transform)
        return train, test, test


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: ``root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``.

    Batch: ``image`` ``(B, 3, S, S)``, ``label`` ``(B,)`` in ``[0, 10)``. Arguments: see
    :class:`ClassificationDataModule` (``on_bad_image`` has no effect: the images are in the pickles).
    """

    base_folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    meta_file = "batches.meta"
    meta_key = "label_names"
    label_key = "labels"


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100 (fine labels): ``root/cifar-100-python/{train, test, meta}``.

    Batch: ``image`` ``(B, 3, S, S)``, ``label`` ``(B,)`` in ``[0, 100)``. Arguments: see
    :class:`ClassificationDataModule`.
    """

    base_folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    meta_file = "meta"
    meta_key = "fine_label_names"
    label_key = "fine_labels"


# --------------------------------------------------------------------------------------------------
# Oxford Flowers-102


class Flowers102DataModule(ClassificationDataModule):
    """Oxford Flowers-102: ``root/flowers-102/{jpg/image_00001.jpg.., imagelabels.mat, setid.mat}``.

    ``setid.mat`` holds 1-based image ids: ``trnid`` (1,020 images), ``valid`` (1,020), ``tstid``
    (6,149); ``imagelabels.mat`` holds ``labels`` 1..102 for every image, in id order. torchvision
    maps its ``train`` / ``val`` / ``test`` to these three fields; so do we.

    Args:
        train_split: ``"trainval"`` (default; ``trnid`` + ``valid``, 2,040 images, the usual
            fine-tuning protocol, validation then runs on the test split) or ``"train"`` (``trnid``;
            validation on ``valid``). Test is always ``tstid``.
        Other arguments: see :class:`ClassificationDataModule`.

    Batch: ``image`` ``(B, 3, S, S)``, ``label`` ``(B,)`` in ``[0, 102)``.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
        train_split: Literal["trainval", "train"] = "trainval",
        crop_pct: float = 0.875,
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        auto_augment: Optional[str] = None,
        re_prob: float = 0.0,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, pin_memory, on_bad_image, crop_pct, scale, hflip, auto_augment, re_prob)
        if train_split not in ("trainval", "train"):
            raise ValueError(f"train_split must be 'trainval' or 'train', got {train_split!r}")
        self.train_split = train_split

    def _read_classes(self) -> list[str]:
        # The names are not in the dataset's files; torchvision carries them, in label order.
        return list(Flowers102.classes)

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        base = self.root / "flowers-102"
        images = require_file(base / "jpg", "Flowers-102 image folder")
        labels_path = base / "imagelabels.mat"
        labels = np.atleast_1d(load_mat(labels_path, ["labels"], "Flowers-102 labels")["labels"]).astype(np.int64) - 1
        _check_labels(labels.tolist(), self.num_classes, labels_path)
        num_images = sum(1 for name in os.listdir(images) if re.fullmatch(r"image_\d{5}\.jpg", name))
        if num_images != len(labels):
            raise ValueError(f"{str(labels_path)!r} has {len(labels)} labels but {str(images)!r} holds {num_images} images")
        setid_path = base / "setid.mat"
        setid = load_mat(setid_path, ["trnid", "valid", "tstid"], "Flowers-102 split file")

        def split(*fields: str) -> list[FileSample]:
            ids = np.concatenate([np.atleast_1d(setid[f]) for f in fields]).astype(np.int64)
            if len(ids) and (ids.min() < 1 or ids.max() > len(labels)):
                raise ValueError(
                    f"{str(setid_path)!r} {fields} refers to image ids up to {ids.max()} but {str(labels_path)!r} "
                    f"labels only {len(labels)} images"
                )
            return [FileSample(str(images / f"image_{i:05d}.jpg"), int(labels[i - 1])) for i in ids]

        test = self._files(split("tstid"), self.eval_transform)
        if self.train_split == "trainval":
            return self._files(split("trnid", "valid"), self.train_transform), test, test
        return self._files(split("trnid"), self.train_transform), self._files(split("valid"), self.eval_transform), test


# --------------------------------------------------------------------------------------------------
# Stanford Cars


class StanfordCarsDataModule(ClassificationDataModule):
    """Stanford Cars in the layout torchvision 0.29's ``StanfordCars`` reads, under ``root/stanford_cars/``.

    ``cars_train/``, ``cars_test/`` (images), ``devkit/cars_meta.mat`` (``class_names``, 196),
    ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat`` (note: beside ``devkit/``,
    not in it), each an ``annotations`` struct array with ``fname`` and ``class`` (1-based). The
    boxes the annotations also carry are not used. Validation and test are both the test split.

    Batch: ``image`` ``(B, 3, S, S)``, ``label`` ``(B,)`` in ``[0, 196)``. Arguments: see
    :class:`ClassificationDataModule`.
    """

    def _read_classes(self) -> list[str]:
        names = load_mat(self.root / "stanford_cars" / "devkit" / "cars_meta.mat", ["class_names"], "Stanford Cars class names")
        return [str(n) for n in np.atleast_1d(names["class_names"])]

    def _split(self, annotations: Path, images: Path) -> list[FileSample]:
        require_file(images, "Stanford Cars image folder")
        records = np.atleast_1d(load_mat(annotations, ["annotations"], "Stanford Cars annotations")["annotations"])
        if records.dtype.names is None or not {"fname", "class"} <= set(records.dtype.names):
            raise ValueError(f"Stanford Cars annotations {str(annotations)!r} need fields 'fname' and 'class', have {records.dtype.names}")
        labels = [int(r["class"]) - 1 for r in records]
        _check_labels(labels, self.num_classes, annotations)
        return [FileSample(str(images / str(r["fname"])), label) for r, label in zip(records, labels)]

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        base = self.root / "stanford_cars"
        train = self._split(base / "devkit" / "cars_train_annos.mat", base / "cars_train")
        test = self._files(self._split(base / "cars_test_annos_withlabels.mat", base / "cars_test"), self.eval_transform)
        return self._files(train, self.train_transform), test, test
