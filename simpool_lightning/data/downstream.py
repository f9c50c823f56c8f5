"""What every downstream DataModule shares: two bases and the small readers that name the file in each error.

The fine-tuning classification sets (paper, Sec. "Fine-tuning") are in :mod:`.classification`; the
localization, discovery, robustness and retrieval sets (:mod:`.cub`, :mod:`.voc`,
:mod:`.imagenet_boxes`, :mod:`.imagenet9`, :mod:`.retrieval`, :mod:`.coco`) build on the bases here.

Every DataModule here yields batches of the contract in DESIGN.md (``image`` ``(B, 3, S, S)``,
``label`` ``(B,)``, and where the dataset has them ``boxes`` / ``mask``); ``classes`` and
``num_classes`` are read from the dataset's metadata on first access, before ``setup``, so a config
can link ``data.num_classes`` into the model.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch
from scipy.io import loadmat
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

from .base import BaseDataModule
from .io import FileDataset, FileSample, OnBadImage
from .transforms import build_eval_transform, build_train_transform

__all__ = [
    "EvalResize",
    "DownstreamDataModule",
    "ClassificationDataModule",
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
