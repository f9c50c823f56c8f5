"""ImageNet-1k validation images with their ground-truth boxes, for MaxBoxAccV2 on ImageNet.

Boxes come from one of the two forms users have:

- a directory of ILSVRC XMLs, one per image (``ILSVRC2012_val_00000001.xml``: ``<object>`` with a
  wnid ``<name>`` and ``<bndbox>``);
- Kaggle's ``LOC_val_solution.csv`` (``ImageId,PredictionString``, the string repeating
  ``wnid xmin ymin xmax ymax``).

Box convention: ILSVRC corners are 0-based inclusive pixel indices (``xmin`` may be 0, ``xmax``
reaches ``width - 1``); a box here is ``(xmin, ymin, xmax + 1, ymax + 1)``, pixels covering
``[j, j + 1)`` as in :mod:`simpool_lightning.metrics.localization`. (wsolevaluation takes the
corners as they are; the two differ by one pixel on the far side, under half a pixel at 224.)

Which boxes: those whose wnid is the image's class. In ILSVRC2012 validation every annotated object
is of the image's class, so this is every box; an image with none of its class is an error that
names the annotation (a sign that the folders and the annotations disagree).
"""
from __future__ import annotations

import csv
import logging
import os
from pathlib import Path
import torch
from torch.utils.data import Dataset

from .downstream import DownstreamDataModule, EvalResize, build_squash_transform, require_file
from .io import FileSample, OnBadImage
from .transforms import build_eval_transform
from .voc import parse_voc_xml

__all__ = ["IMAGE_EXTENSIONS", "read_loc_solution", "ImageNetBoxesDataModule"]

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")


def read_loc_solution(path: str | os.PathLike) -> dict[str, list[tuple[str, float, float, float, float]]]:
    """Parse Kaggle's ``LOC_val_solution.csv`` into ``{image id: [(wnid, xmin, ymin, xmax, ymax), ...]}``.

    Corners are returned as written. Raises ``ValueError`` naming the file and row for a wrong
    header or a prediction string that is not groups of five.
    """
    path = require_file(path, "ImageNet box file")
    table: dict[str, list[tuple[str, float, float, float, float]]] = {}
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:2]] != ["ImageId", "PredictionString"]:
            raise ValueError(f"{str(path)!r} must start with the header 'ImageId,PredictionString', got {header}")
        for number, row in enumerate(reader, 2):
            if not row:
                continue
            tokens = row[1].split() if len(row) > 1 else []
            if len(row) != 2 or not tokens or len(tokens) % 5:
                raise ValueError(f"{str(path)!r} row {number}: expected 'ImageId,wnid xmin ymin xmax ymax ...', got {row}")
            try:
                table[row[0]] = [
                    (tokens[i], *(float(v) for v in tokens[i + 1 : i + 5])) for i in range(0, len(tokens), 5)
                ]
            except ValueError as err:
                raise ValueError(f"{str(path)!r} row {number}: non-numeric corner in {row[1]!r}") from err
    return table


class ImageNetBoxesDataModule(DownstreamDataModule):
    """ImageNet validation images (``root/val/<wnid>/*.JPEG``) with their boxes, for evaluation.

    Batch: ``image`` ``(B, 3, S, S)``, ``label`` ``(B,)`` (index of the wnid among the sorted class
    folders, the ImageNet-1k index when all 1,000 are present; a warning says when they are not),
    ``boxes``, a list of ``(K, 4)`` xyxy pixel tensors in the batch's frame (module convention).
    Validation and test are the same data; there is no training loader.

    Args:
        root: the ImageNet folder holding ``val/``.
        boxes: a directory of ILSVRC XMLs, or the path of ``LOC_val_solution.csv``.
        eval_resize: ``"squash"`` (default, wsolevaluation's protocol: whole image to ``S x S``) or
            ``"crop"`` (short side to ``S / crop_pct``, center crop; boxes are clamped to the crop).
        crop_pct: for ``eval_resize="crop"``.
        Other arguments: see :class:`~.downstream.DownstreamDataModule`.
    """

    def __init__(
        self,
        root: str,
        boxes: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
        eval_resize: EvalResize = "squash",
        crop_pct: float = 0.875,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, pin_memory, on_bad_image)
        if eval_resize not in ("squash", "crop"):
            raise ValueError(f"eval_resize must be 'squash' or 'crop', got {eval_resize!r}")
        self.boxes = Path(boxes)
        self.eval_transform = (
            build_squash_transform(image_size) if eval_resize == "squash" else build_eval_transform(image_size, crop_pct)
        )

    def _read_classes(self) -> list[str]:
        val = require_file(self.root / "val", "ImageNet validation folder")
        classes = sorted(entry.name for entry in os.scandir(val) if entry.is_dir())
        if not classes:
            raise FileNotFoundError(f"no class folders in {str(val)!r}")
        if len(classes) != 1000:
            log.warning("%s holds %d class folders, not 1000: labels are not ImageNet-1k indices", val, len(classes))
        return classes

    def _build(self) -> tuple[None, Dataset, Dataset]:
        require_file(self.boxes, "ImageNet box annotations")
        table = None if self.boxes.is_dir() else read_loc_solution(self.boxes)
        samples = []
        for label, wnid in enumerate(self.classes):
            folder = self.root / "val" / wnid
            for name in sorted(os.listdir(folder)):
                if not name.lower().endswith(IMAGE_EXTENSIONS):
                    continue
                image_id = Path(name).stem
                if table is None:
                    source = str(self.boxes / f"{image_id}.xml")
                    objects = [(o.name, o.xmin, o.ymin, o.xmax, o.ymax) for o in parse_voc_xml(source)[1]]
                else:
                    source = str(self.boxes)
                    if image_id not in table:
                        raise ValueError(f"{source!r} has no row for image {str(folder / name)!r}")
                    objects = table[image_id]
                own = [corners for obj_wnid, *corners in objects if obj_wnid == wnid]
                if not own:
                    raise ValueError(
                        f"{source!r} has no box of class {wnid} for image {str(folder / name)!r} "
                        f"(its boxes are of {sorted({o[0] for o in objects})})"
                    )
                boxes = torch.tensor(own, dtype=torch.float32) + torch.tensor([0.0, 0.0, 1.0, 1.0])
                samples.append(FileSample(str(folder / name), label, boxes=boxes))
        if not samples:
            raise FileNotFoundError(f"no images under {str(self.root / 'val')!r}")
        data = self._files(samples, self.eval_transform)
        return None, data, data
