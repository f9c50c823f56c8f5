"""Pascal VOC 2007 / 2012 for unsupervised object discovery (CorLoc, as LOST runs it on trainval).

Box convention: VOC's ``<bndbox>`` holds 1-based, inclusive pixel indices, so ``xmin = 1, xmax = W``
spans the whole width. A box here is ``(xmin - 1, ymin - 1, xmax, ymax)``: 0-based corners with the
pixel in column ``j`` covering ``[j, j + 1)`` (the convention of
:mod:`simpool_lightning.metrics.localization`, and the same numbers LOST's ``extract_gt_VOC``
produces). Coordinates are read as floats: a few VOC2012 annotations carry decimals.
"""
from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

from .downstream import DownstreamDataModule, build_squash_transform, read_table, require_file
from .io import FileSample, OnBadImage

__all__ = ["VOC_CLASSES", "VOCObject", "parse_voc_xml", "VOCDataModule"]

log = logging.getLogger(__name__)

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip


@dataclass
class VOCObject:
    """One ``<object>`` of a Pascal-VOC-style XML, corners as written in the file."""

    name: str
    xmin: float
    ymin: float
    xmax: float
    ymax: float
    difficult: bool = False
    truncated: bool = False


def parse_voc_xml(path: str | os.PathLike) -> tuple[Optional[tuple[int, int]], list[VOCObject]]:
    """Read a Pascal-VOC-style annotation (VOC, ILSVRC).

    Returns:
        ``(width, height)`` from ``<size>`` (``None`` when absent) and the objects in file order.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not XML, or an object without a name or with an incomplete ``<bndbox>``; the
            message names the file.
    """
    path = require_file(path, "annotation file")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"cannot parse annotation file {str(path)!r}: {err}") from err
    size = None
    if root.find("size") is not None:
        try:
            size = (int(float(root.findtext("size/width"))), int(float(root.findtext("size/height"))))
        except (TypeError, ValueError) as err:
            raise ValueError(f"annotation file {str(path)!r}: <size> needs numeric <width> and <height>") from err
    objects = []
    for number, obj in enumerate(root.iter("object")):
        name = (obj.findtext("name") or "").strip()
        try:
            corners = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
        except (TypeError, ValueError) as err:
            raise ValueError(f"annotation file {str(path)!r}, object {number}: <bndbox> needs numeric xmin, ymin, xmax, ymax") from err
        if not name:
            raise ValueError(f"annotation file {str(path)!r}, object {number} has no <name>")
        objects.append(
            VOCObject(
                name,
                *corners,
                difficult=(obj.findtext("difficult") or "0").strip() not in ("0", ""),
                truncated=(obj.findtext("truncated") or "0").strip() not in ("0", ""),
            )
        )
    return size, objects


class VOCDataModule(DownstreamDataModule):
    """Pascal VOC images with every object box, for object discovery: ``root/VOCdevkit/VOC<year>/``.

    Reads ``ImageSets/Main/<split>.txt`` (one image id a line), ``Annotations/<id>.xml`` and
    ``JPEGImages/<id>.jpg``. Discovery trains nothing, so validation and test are the same split
    and there is no training loader.

    Batch: ``image`` ``(B, 3, S, S)``; ``boxes``, a list of ``(K, 4)`` xyxy pixel tensors (every
    kept object, module convention, in the batch's frame); ``box_labels``, a list of ``K``-long lists
    of class indices; ``label`` ``(B,)``: the class of the first kept object in file order (CorLoc
    ignores it; it makes image-level classification possible); ``image_id``, a list of ids.

    Args:
        year: 2007 or 2012.
        split: an ``ImageSets/Main`` list, ``"trainval"`` for the CorLoc protocol.
        image_size: every image is resized whole to ``image_size x image_size`` (aspect not kept,
            no object cut off; boxes scale with it). ``None`` keeps each image at its own size as
            LOST does, which needs ``batch_size=1``.
        drop_difficult: leave out objects marked ``<difficult>1``. An image left with no object is
            dropped from the dataset (it cannot be scored), logged, and listed in :attr:`dropped`.
        Other arguments: see :class:`~.downstream.DownstreamDataModule`.
    """

    def __init__(
        self,
        root: str,
        year: int = 2007,
        split: str = "trainval",
        image_size: Optional[int] = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
        drop_difficult: bool = False,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, pin_memory, on_bad_image)
        if int(year) not in (2007, 2012):
            raise ValueError(f"year must be 2007 or 2012, got {year!r}")
        if image_size is None and batch_size != 1:
            raise ValueError(f"image_size=None keeps each image's own size and needs batch_size=1, got {batch_size}")
        self.year = int(year)
        self.split = split
        self.drop_difficult = drop_difficult
        self.base = self.root / "VOCdevkit" / f"VOC{year}"
        self.dropped: list[str] = []

    def _read_classes(self) -> list[str]:
        return list(VOC_CLASSES)

    def _sample(self, image_id: str) -> Optional[FileSample]:
        xml = self.base / "Annotations" / f"{image_id}.xml"
        _, objects = parse_voc_xml(xml)
        unknown = sorted({o.name for o in objects} - set(VOC_CLASSES))
        if unknown:
            raise ValueError(f"annotation file {str(xml)!r} names unknown class(es) {unknown}")
        kept = [o for o in objects if not (self.drop_difficult and o.difficult)]
        if not kept:
            return None
        boxes = torch.tensor([[o.xmin - 1, o.ymin - 1, o.xmax, o.ymax] for o in kept])
        box_labels = [VOC_CLASSES.index(o.name) for o in kept]
        path = str(self.base / "JPEGImages" / f"{image_id}.jpg")
        return FileSample(path, box_labels[0], boxes=boxes, extra={"box_labels": box_labels, "image_id": image_id})

    def _build(self) -> tuple[None, Dataset, Dataset]:
        require_file(self.base, f"VOC{self.year} folder")
        ids = [row[0] for row in read_table(self.base / "ImageSets" / "Main" / f"{self.split}.txt", 1, f"VOC{self.year} image list")]
        samples = []
        for image_id in ids:
            sample = self._sample(image_id)
            if sample is None:
                self.dropped.append(image_id)
            else:
                samples.append(sample)
        if self.dropped:
            log.warning(
                "VOC%s %s: dropped %d image(s) with no object left to score (drop_difficult=%s), e.g. %s",
                self.year, self.split, len(self.dropped), self.drop_difficult, self.dropped[:3],
            )  # fmt: skip
        data = self._files(samples, build_squash_transform(self.image_size))
        return None, data, data
