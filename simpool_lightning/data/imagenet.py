"""ImageNet, and any dataset in its ImageFolder layout: ``root/train/<class>/*``, ``root/val/<class>/*``.

Classes are the sorted folder names (the wnids for ImageNet-1k, whose sorted order is the standard
label order), files within a class are taken in sorted order, so labels and subsets are the same on
every machine. ``images_per_class`` keeps the first N training images of each class: 260 gives the
paper's ImageNet-20% (260 x 1,000 images); validation is always complete.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

from torch.utils.data import Dataset

from .downstream import ClassificationDataModule
from .io import FileSample, OnBadImage
from .multicrop import MultiCropTransform
from .transforms import Interpolation, build_train_transform

__all__ = ["IMAGE_EXTENSIONS", "ImageNetDataModule", "list_image_files"]

log = logging.getLogger(__name__)

# torchvision's ImageFolder extensions, matched case-insensitively (ImageNet's are ".JPEG").
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def list_image_files(folder: str | os.PathLike) -> list[str]:
    """Image files under ``folder`` (subfolders included, links followed, as ImageFolder does), sorted.

    Hidden files and folders (a leading dot: ``.DS_Store``, ``.ipynb_checkpoints``) are not images.
    """
    files = []
    for parent, dirs, names in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        files += [
            os.path.join(parent, n) for n in names if not n.startswith(".") and n.lower().endswith(IMAGE_EXTENSIONS)
        ]
    return sorted(files)


def _class_folders(split: Path) -> list[str]:
    if not split.is_dir():
        raise FileNotFoundError(
            f"{split.name} folder not found: {str(split)!r}; expected the ImageFolder layout "
            f"{split.name}/<class>/<image> under the dataset root"
        )
    classes = sorted(entry.name for entry in os.scandir(split) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        loose = list_image_files(split)
        hint = f" (it holds {len(loose)} image files directly: sort them into one folder per class)" if loose else ""
        raise FileNotFoundError(
            f"no images found: {str(split)!r} has no class folders{hint}; expected {split.name}/<class>/<image>"
        )
    return classes


def _few(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return f"{shown}, ... ({len(names)} in all)" if len(names) > limit else shown


class ImageNetDataModule(ClassificationDataModule):
    """ImageNet-1k (or any ImageFolder-layout dataset) with timm-style training augmentation.

    Batches: ``image`` ``(B, 3, S, S)`` float, ``label`` ``(B,)`` long (index into :attr:`classes`).
    Validation and test are both ``root/val``.

    Args:
        root: folder holding ``train/<class>/*`` and ``val/<class>/*``; both splits must have the
            same class folders.
        images_per_class: keep the first N training images (sorted by path) of each class, ``None``
            for all; 260 is the paper's ImageNet-20%. Validation is not subsampled.
        image_size: side ``S`` of the square images.
        batch_size, num_workers, pin_memory: see :class:`~.base.BaseDataModule`.
        crop_pct, scale, hflip, auto_augment, re_prob: evaluation center crop and training
            augmentation, see :mod:`~.transforms` (the official recipes use
            ``auto_augment="rand-m9-mstd0.5-inc1"``).
        interpolation: of the training crop and RandAugment's geometric ops: ``"random"``
            (bilinear or bicubic, drawn anew each time: timm ``train.py``'s default
            ``--train-interpolation``, which the official recipes keep), ``"bilinear"`` or
            ``"bicubic"``. Evaluation resizes bicubic.
        on_bad_image: ``"raise"`` (stop, naming the file) or ``"skip"`` (log it and take the next
            image; :attr:`skipped` lists them), see :class:`~.io.FileDataset`.
        multi_crop: DINO's :class:`~.multicrop.MultiCropTransform` as the training transform
            (``scale``, ``hflip``, ``auto_augment``, ``re_prob`` and ``interpolation`` then do not apply): training
            batches hold ``image`` as a list of crop batches.

    Raises:
        FileNotFoundError: on first use of :attr:`classes` or in ``setup``: the root or a split
            folder is missing, or a split has no class folders.
        ValueError: the splits' class folders differ (the message lists the differences), or a
            class folder holds no image (named).
    """

    def __init__(
        self,
        root: str,
        images_per_class: Optional[int] = None,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 8,
        crop_pct: float = 0.875,
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        auto_augment: Optional[str] = None,
        re_prob: float = 0.0,
        on_bad_image: OnBadImage = "raise",
        pin_memory: bool = False,
        multi_crop: Optional[MultiCropTransform] = None,
        interpolation: Interpolation = "random",
    ) -> None:
        super().__init__(
            root,
            image_size=image_size,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            on_bad_image=on_bad_image,
            crop_pct=crop_pct,
            scale=scale,
            hflip=hflip,
            auto_augment=auto_augment,
            re_prob=re_prob,
        )
        if images_per_class is not None and images_per_class <= 0:
            raise ValueError(f"images_per_class must be positive or None, got {images_per_class}")
        self.images_per_class = images_per_class
        self.train_transform = (
            multi_crop
            if multi_crop is not None
            else build_train_transform(
                image_size, tuple(scale), hflip, auto_augment, re_prob, interpolation=interpolation
            )
        )

    def _read_classes(self) -> list[str]:
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root not found: {str(self.root)!r}; expected a folder with train/ and val/")
        train, val = _class_folders(self.root / "train"), _class_folders(self.root / "val")
        if train != val:
            only_train = sorted(set(train) - set(val))
            only_val = sorted(set(val) - set(train))
            raise ValueError(
                f"the class folders of {str(self.root / 'train')!r} and {str(self.root / 'val')!r} differ: "
                f"{len(only_train)} only in train ({_few(only_train) or '-'}), "
                f"{len(only_val)} only in val ({_few(only_val) or '-'})"
            )
        return train

    def _split(self, split: str, limit: Optional[int]) -> list[FileSample]:
        samples: list[FileSample] = []
        empty: list[str] = []
        for label, name in enumerate(self.classes):
            files = list_image_files(self.root / split / name)
            if not files:
                empty.append(str(self.root / split / name))
            samples += [FileSample(path, label) for path in files[:limit]]
        if empty:
            kinds = f"{', '.join(IMAGE_EXTENSIONS)}, any case"
            if len(empty) == len(self.classes):
                raise ValueError(f"no images at all under {str(self.root / split)!r}: none of its {len(empty)} class folders holds an image ({kinds})")
            raise ValueError(f"{len(empty)} class folder(s) hold no image ({kinds}): {_few(empty)}")
        return samples

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        train, val = self._split("train", self.images_per_class), self._split("val", None)
        subset = f" (the first {self.images_per_class} per class)" if self.images_per_class else ""
        log.info("%s: %d classes, %d training images%s, %d validation images", self.root, self.num_classes, len(train), subset, len(val))
        val_set = self._files(val, self.eval_transform)
        return self._files(train, self.train_transform), val_set, val_set
