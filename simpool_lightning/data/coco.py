"""COCO-20k for unsupervised single-object discovery (CorLoc), as LOST builds and scores it.

COCO-20k is 19,817 images of COCO 2014 train, listed in ``coco_20k_filenames.txt`` beside this
module: LOST's ``datasets/coco_20k_filenames.txt`` (valeoai/LOST, commit
``fcedbecb644f18358a660ce58c739cc6374feda8``), shipped unchanged under LOST's Apache-2.0 licence
(``coco_20k_filenames.LICENSE`` names the source and holds the licence). A different list can be
given with ``file_list``.

Ground truth as LOST's ``datasets.extract_gt_COCO`` reads it: every annotation of the image in the
annotation file's order, crowd annotations (``iscrowd == 1``) dropped, each ``bbox`` ``[x, y, w,
h]`` turned into ``[x, y, x + w, y + h]`` and every coordinate rounded to an integer with Python's
``round`` (half to even). Those are exclusive pixel corners, the convention of
:mod:`simpool_lightning.metrics.localization`. The image id is the number at the end of the file
name (LOST's rule). Annotations are read with pycocotools.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import torch
from pycocotools.coco import COCO
from torch.utils.data import Dataset

from .downstream import DownstreamDataModule, build_squash_transform, require_file
from .io import FileSample, OnBadImage

__all__ = ["COCO20K_FILE_LIST", "COCO20kDataModule", "coco_gt_boxes", "read_file_list"]

log = logging.getLogger(__name__)

COCO20K_FILE_LIST = "coco_20k_filenames.txt"
"""The shipped list's resource name in :mod:`simpool_lightning.data`."""


def read_file_list(path: Optional[str | os.PathLike] = None) -> list[str]:
    """Image paths (relative to the COCO root), one a line; ``None`` reads the shipped COCO-20k list.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the list is empty, repeats a file, or names a file whose stem does not end in
            ``_<image id>`` (LOST reads the id from there); the message names the file and line.
    """
    if path is None:
        source = f"the shipped {COCO20K_FILE_LIST}"
        text = resources.files(__package__).joinpath(COCO20K_FILE_LIST).read_text(encoding="utf-8")
    else:
        source = repr(str(require_file(path, "COCO image list")))
        text = Path(path).read_text(encoding="utf-8")
    names = []
    for number, line in enumerate(text.splitlines(), 1):
        name = line.strip()
        if not name:
            continue
        if not Path(name).stem.rpartition("_")[2].isdigit():
            raise ValueError(f"COCO image list {source} line {number}: {name!r} does not end in _<image id> (e.g. COCO_train2014_000000000009.jpg)")
        names.append(name)
    if not names:
        raise ValueError(f"COCO image list {source} names no image")
    if len(set(names)) != len(names):
        raise ValueError(f"COCO image list {source} names some images twice")
    return names


def _image_id(name: str) -> int:
    """LOST's ``int(s.split("_")[-1].split(".")[0])``."""
    return int(Path(name).stem.rpartition("_")[2])


def coco_gt_boxes(annotations: list[dict[str, Any]]) -> tuple[torch.Tensor, list[int]]:
    """Non-crowd boxes as LOST's ``extract_gt_COCO`` makes them, and their category ids.

    Args:
        annotations: COCO annotation dicts (``bbox`` ``[x, y, w, h]``, ``iscrowd``, ``category_id``).

    Returns:
        ``(K, 4)`` float32 boxes ``[round(x), round(y), round(x + w), round(y + h)]`` and ``K``
        category ids, in the annotations' order.
    """
    boxes, categories = [], []
    for ann in annotations:
        if ann.get("iscrowd", 0) == 1:
            continue
        x, y, w, h = (float(v) for v in ann["bbox"])
        boxes.append([round(x), round(y), round(x + w), round(y + h)])
        categories.append(int(ann["category_id"]))
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), categories


class COCO20kDataModule(DownstreamDataModule):
    """COCO 2014 train images of the COCO-20k list with their boxes, for object discovery.

    Layout under ``root`` (COCO's own): ``train2014/COCO_train2014_<id>.jpg`` (the list's paths are
    relative to ``root``) and ``annotations/instances_train2014.json``. Discovery trains nothing:
    validation and test are the same set and there is no training loader.

    Batch: ``image`` ``(B, 3, S, S)``; ``boxes``, a list of ``(K, 4)`` xyxy pixel tensors in the
    batch's frame; ``box_labels``, a list of ``K``-long lists of class indices (categories sorted by
    id); ``label`` ``(B,)``, the class of the first box; ``image_id``, a list of COCO ids as strings
    (LOST's image names).

    Args:
        root: the COCO folder.
        annotations: the instances file; ``None`` is ``root/annotations/instances_train2014.json``.
        file_list: a list of image paths relative to ``root``, one a line; ``None`` is the shipped
            COCO-20k list.
        image_size: every image resized whole to ``image_size x image_size`` (boxes scale with it);
            ``None`` keeps each image at its own size as LOST does, which needs ``batch_size=1``.
        Other arguments: see :class:`~.downstream.DownstreamDataModule`.

    Images whose annotations are all crowds have no box to score (LOST stops with an error on
    them): they are left out, logged and listed in :attr:`dropped`; the shipped list has none.

    Raises (at setup or on reading ``classes``):
        FileNotFoundError: the annotation file or list is missing.
        ValueError: the annotation file is not COCO JSON, or the list names an image it lacks.
    """

    def __init__(
        self,
        root: str,
        annotations: Optional[str] = None,
        file_list: Optional[str] = None,
        image_size: Optional[int] = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, pin_memory, on_bad_image)
        if image_size is None and batch_size != 1:
            raise ValueError(f"image_size=None keeps each image's own size and needs batch_size=1, got {batch_size}")
        self.annotations = Path(annotations) if annotations is not None else self.root / "annotations" / "instances_train2014.json"
        self.file_list = file_list
        self.dropped: list[str] = []
        self._coco: Any = None

    def _load_coco(self) -> Any:
        if self._coco is None:
            require_file(self.annotations, "COCO annotation file")
            try:
                with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
                    self._coco = COCO(str(self.annotations))
            except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError) as err:
                raise ValueError(f"cannot read COCO annotation file {str(self.annotations)!r}: {err!r}") from err
            if not isinstance(self._coco.dataset, dict) or "images" not in self._coco.dataset:
                raise ValueError(f"COCO annotation file {str(self.annotations)!r} has no 'images' list")
        return self._coco

    def _read_classes(self) -> list[str]:
        coco = self._load_coco()
        return [coco.cats[c]["name"] for c in sorted(coco.cats)]

    def _build(self) -> tuple[None, Dataset, Dataset]:
        coco = self._load_coco()
        self._classes = self._read_classes()  # now: the index is released below
        names = read_file_list(self.file_list)
        missing = [n for n in names if _image_id(n) not in coco.imgs]
        if missing:
            raise ValueError(
                f"COCO annotation file {str(self.annotations)!r} lacks {len(missing)} image(s) of the list, e.g. "
                f"{missing[:3]}; COCO-20k needs instances_train2014.json"
            )
        index = {c: i for i, c in enumerate(sorted(coco.cats))}
        samples = []
        for name in names:
            image_id = _image_id(name)
            boxes, categories = coco_gt_boxes(coco.loadAnns(coco.getAnnIds(imgIds=[image_id])))
            if not categories:
                self.dropped.append(name)
                continue
            unknown = sorted(set(categories) - set(index))
            if unknown:
                raise ValueError(f"COCO annotation file {str(self.annotations)!r}: image {image_id} has unknown category id(s) {unknown}")
            labels = [index[c] for c in categories]
            extra = {"box_labels": labels, "image_id": str(image_id)}
            samples.append(FileSample(str(self.root / name), labels[0], boxes=boxes, extra=extra))
        if self.dropped:
            log.warning("COCO-20k: dropped %d image(s) whose annotations are all crowds, e.g. %s", len(self.dropped), self.dropped[:3])
        # The samples hold all that is needed; COCO train's index takes GBs in every loader worker's parent.
        self._coco = None
        data = self._files(samples, build_squash_transform(self.image_size))
        return None, data, data
