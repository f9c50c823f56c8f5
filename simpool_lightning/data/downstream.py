"""Downstream datasets of the paper's fine-tuning experiments, and what every downstream DataModule shares.

Fine-tuning classification (paper, Sec. "Fine-tuning"): CIFAR-10, CIFAR-100, Oxford Flowers-102,
Stanford Cars. The localization, discovery, robustness and retrieval sets live beside this module
(:mod:`.cub`, :mod:`.voc`, :mod:`.imagenet_boxes`, :mod:`.imagenet9`, :mod:`.retrieval`) and build on
the two bases here.

The files are read in the layouts of ``shared/DATASETS.md``, which are torchvision's for CIFAR,
Flowers-102 and Stanford Cars. The torchvision classes themselves are not used: CIFAR and
Flowers-102 check the MD5 of every file, so they refuse any file that is not the original download
and say only "not found or corrupted" without naming it; parsing the same files here takes a few
lines, names the file in every error, and feeds :class:`~.io.FileDataset` and its bad-image policy.

Every DataModule here yields batches of the contract in DESIGN.md (``image`` ``(B, 3, S, S)``,
``label`` ``(B,)``, and where the dataset has them ``boxes`` / ``mask``); ``classes`` and
``num_classes`` are read from the dataset's metadata on first access, before ``setup``, so a config
can link ``data.num_classes`` into the model.
"""
from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from scipy.io import loadmat
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.datasets import Flowers102
from torchvision.transforms import InterpolationMode, v2

from .base import BaseDataModule
from .io import FileDataset, FileSample, OnBadImage
from .transforms import build_eval_transform, build_train_transform

__all__ = [
    "EvalResize",
    "DownstreamDataModule",
    "ClassificationDataModule",
    "ArrayDataset",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "Flowers102DataModule",
    "StanfordCarsDataModule",
    "build_squash_transform",
    "require_file",
    "read_table",
    "load_mat",
]

Transform = Callable[[dict[str, Any]], dict[str, Any]]

EvalResize = Literal["squash", "crop"]
"""How evaluation images reach ``image_size``: ``"squash"`` resizes the whole image to a square
(aspect not kept, every box stays in the frame: wsolevaluation's protocol for MaxBoxAccV2);
``"crop"`` resizes the short side and center-crops (the classification protocol; parts of boxes
outside the crop are clamped to its border by torchvision)."""


# --------------------------------------------------------------------------------------------------
# Small readers shared by the downstream modules; each error names the file.


def require_file(path: str | os.PathLike, what: str) -> Path:
    """Return ``path`` as a ``Path``; raise ``FileNotFoundError`` naming it (and ``what`` it is) if absent."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{what} not found: {str(path)!r}")
    return path


def read_table(path: str | os.PathLike, num_fields: int, what: str) -> list[list[str]]:
    """Rows of a whitespace-separated text file, blank lines ignored.

    The last field takes the rest of the line, so it may hold spaces. Raises ``FileNotFoundError``
    if the file is missing and ``ValueError`` naming file and line when a row has too few fields.
    """
    path = require_file(path, what)
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split(maxsplit=num_fields - 1)
            if len(fields) != num_fields:
                raise ValueError(f"{str(path)!r} line {number}: expected {num_fields} fields, got {line!r}")
            rows.append(fields)
    return rows


def load_mat(path: str | os.PathLike, keys: Sequence[str], what: str) -> dict[str, Any]:
    """Read a MATLAB file with ``squeeze_me=True`` (as torchvision does) and check it has ``keys``."""
    path = require_file(path, what)
    try:
        content = loadmat(path, squeeze_me=True)
    except Exception as err:  # scipy raises several unrelated types for a damaged file
        raise ValueError(f"cannot read {what} {str(path)!r}: {err}") from err
    missing = [k for k in keys if k not in content]
    if missing:
        present = sorted(k for k in content if not k.startswith("__"))
        raise ValueError(f"{what} {str(path)!r} lacks the field(s) {missing}; it has {present}")
    return content


def _check_labels(labels: Sequence[int], num_classes: int, source: str | os.PathLike) -> None:
    if len(labels) and not (0 <= min(labels) and max(labels) < num_classes):
        raise ValueError(
            f"labels in {str(source)!r} must lie in [0, {num_classes}) after conversion to 0-based, "
            f"got range [{min(labels)}, {max(labels)}]"
        )


def build_squash_transform(image_size: Optional[int] = 224) -> v2.Compose:
    """Resize the whole image to ``image_size x image_size`` (bicubic), then normalise as ImageNet.

    Boxes and masks are scaled with the image, so none leaves the frame. ``image_size=None`` keeps
    the original resolution (images of different sizes then need ``batch_size=1``).
    """
    ops: list[Any] = []
    if image_size is not None:
        ops.append(v2.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC, antialias=True))
    ops += [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)),
    ]
    return v2.Compose(ops)


# --------------------------------------------------------------------------------------------------
# Bases


class DownstreamDataModule(BaseDataModule):
    """A dataset under ``root`` read into ``train_set`` / ``val_set`` / ``test_set`` on first ``setup``.

    Subclasses implement :meth:`_read_classes` and :meth:`_build` (which returns the three splits,
    any of them ``None``). ``classes`` is read lazily, before ``setup``, and ``num_classes`` is its
    length.

    Args:
        root: directory that holds the dataset's folder (see each subclass).
        image_size: side of the square images in a batch (``None``, where a subclass allows it:
            each image at its own size).
        batch_size, num_workers, pin_memory: see :class:`~.base.BaseDataModule`.
        on_bad_image: ``"raise"`` or ``"skip"``, see :class:`~.io.FileDataset`; skipped files are
            listed by :attr:`skipped` (with ``num_workers=0``; workers keep their own lists).
    """

    def __init__(
        self,
        root: str,
        image_size: Optional[int] = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        if image_size is not None and image_size <= 0:
            raise ValueError(f"image_size must be positive, got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        self.on_bad_image = on_bad_image
        self._classes: Optional[list[str]] = None
        self._built = False

    @property
    def classes(self) -> list[str]:
        """Class names, index = label."""
        if self._classes is None:
            self._classes = self._read_classes()
        return self._classes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def skipped(self) -> list[str]:
        """Files skipped as unreadable so far (``on_bad_image="skip"``), over all splits."""
        sets = {id(s): s for s in (self.train_set, self.val_set, self.test_set) if s is not None}
        return [path for s in sets.values() for path in getattr(s, "skipped", [])]

    def setup(self, stage: Optional[str] = None) -> None:
        # Annotations are small: every split is parsed once, whatever the stage, so that
        # validation during fit and a later test share the same objects.
        if not self._built:
            self.train_set, self.val_set, self.test_set = self._build()
            self._built = True

    def _files(self, samples: list[FileSample], transform: Transform) -> FileDataset:
        return FileDataset(samples, transform=transform, on_bad_image=self.on_bad_image)

    def _read_classes(self) -> list[str]:
        raise NotImplementedError

    def _build(self) -> tuple[Optional[Dataset], Optional[Dataset], Optional[Dataset]]:
        raise NotImplementedError


class ClassificationDataModule(DownstreamDataModule):
    """A :class:`DownstreamDataModule` for fine-tuning: a training pipeline and a center-crop evaluation.

    Args:
        crop_pct: evaluation center crop, ``image_size / crop_pct`` being the resized short side.
        scale, hflip, auto_augment, re_prob: training augmentation, see
            :func:`~.transforms.build_train_transform`.
        Other arguments: see :class:`DownstreamDataModule`.
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
        crop_pct: float = 0.875,
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        auto_augment: Optional[str] = None,
        re_prob: float = 0.0,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, pin_memory, on_bad_image)
        self.train_transform = build_train_transform(
            image_size, scale=tuple(scale), hflip=hflip, auto_augment=auto_augment, re_prob=re_prob
        )
        self.eval_transform = build_eval_transform(image_size, crop_pct=crop_pct)


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
