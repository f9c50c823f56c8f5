"""CUB-200-2011: 200 bird species with one box per image and optional segmentation masks.

The paper scores attention maps on its test split with MaxBoxAccV2 (boxes) and mask IoU (masks).

Box convention: ``bounding_boxes.txt`` gives ``x y width height`` in pixels from the top-left
corner of the image; the box is ``(x, y, x + width, y + height)`` xyxy, as wsolevaluation reads it
(pixels cover ``[j, j + 1)``, the convention of :mod:`simpool_lightning.metrics.localization`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch.utils.data import Dataset

from .downstream import ClassificationDataModule, EvalResize, build_squash_transform, read_table, require_file
from .io import FileSample, OnBadImage

__all__ = ["CUB200DataModule"]


class CUB200DataModule(ClassificationDataModule):
    """CUB-200-2011 under ``root/CUB_200_2011/``.

    Files: ``images/<NNN.Class_Name>/<file>.jpg``, ``images.txt`` (``<id> <relative path>``),
    ``classes.txt`` (``<class id> <NNN.Class_Name>``), ``image_class_labels.txt`` (``<id> <class
    1..200>``), ``train_test_split.txt`` (``<id> <1 train / 0 test>``), ``bounding_boxes.txt``
    (``<id> <x> <y> <w> <h>``); with ``masks=True`` also ``segmentations/<NNN.Class_Name>/<file>.png``
    (greyscale, several annotators averaged; a pixel is foreground above 127, i.e. for the majority).

    Splits: train = ``is_training_image`` 1; validation and test = 0 (CUB has no validation split).

    Batch:
        train: ``image`` ``(B, 3, S, S)``, ``label`` ``(B,)`` in ``[0, 200)`` (classification
        fine-tuning; no boxes, as random crops would cut them).
        val / test: also ``boxes``, a list of ``(1, 4)`` xyxy pixel tensors in the ``S x S`` frame,
        and with ``masks=True`` ``mask`` ``(B, S, S)`` bool.

    Args:
        masks: read the segmentation masks (every evaluated image must have one).
        mask_root: where the ``segmentations`` folders are, default ``root/CUB_200_2011/segmentations``
            (they ship as a separate archive).
        eval_resize: ``"squash"`` (default, wsolevaluation's protocol: every box stays whole) or
            ``"crop"`` (center crop ``crop_pct``).
        Other arguments: see :class:`~.downstream.ClassificationDataModule`.

    ``classes`` are the folder names without the number, underscores as spaces
    (``"Black footed Albatross"``).
    """

    def __init__(
        self,
        root: str,
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
        masks: bool = False,
        mask_root: Optional[str] = None,
        eval_resize: EvalResize = "squash",
        crop_pct: float = 0.875,
        scale: tuple[float, float] = (0.08, 1.0),
        hflip: float = 0.5,
        auto_augment: Optional[str] = None,
        re_prob: float = 0.0,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, pin_memory, on_bad_image, crop_pct, scale, hflip, auto_augment, re_prob)
        if eval_resize not in ("squash", "crop"):
            raise ValueError(f"eval_resize must be 'squash' or 'crop', got {eval_resize!r}")
        self.base = self.root / "CUB_200_2011"
        self.masks = masks
        self.mask_root = Path(mask_root) if mask_root is not None else self.base / "segmentations"
        if eval_resize == "squash":
            self.eval_transform = build_squash_transform(image_size)

    def _read_classes(self) -> list[str]:
        rows = read_table(self.base / "classes.txt", 2, "CUB class list")
        ids = [int(r[0]) for r in rows]
        if ids != list(range(1, len(ids) + 1)):
            raise ValueError(f"class ids in {str(self.base / 'classes.txt')!r} must run 1..N in order")
        return [r[1].split(".", 1)[-1].replace("_", " ") for r in rows]

    def _by_id(self, name: str, num_fields: int, what: str, ids: list[int]) -> dict[int, list[str]]:
        """``{image id: remaining fields}`` of a per-image file, checked to cover exactly ``ids``."""
        path = self.base / name
        rows = read_table(path, num_fields, what)
        table = {int(r[0]): r[1:] for r in rows}
        if len(table) != len(rows) or set(table) != set(ids):
            missing = sorted(set(ids) - set(table))[:5]
            extra = sorted(set(table) - set(ids))[:5]
            raise ValueError(
                f"{str(path)!r} has {len(rows)} rows for {len(ids)} images in images.txt "
                f"(ids missing: {missing}, unknown: {extra}, duplicated: {len(rows) - len(table)})"
            )
        return table

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        require_file(self.base, "CUB-200-2011 folder")
        images = read_table(self.base / "images.txt", 2, "CUB image list")
        ids = [int(r[0]) for r in images]
        if len(set(ids)) != len(ids):
            raise ValueError(f"{str(self.base / 'images.txt')!r} lists {len(ids) - len(set(ids))} image id(s) twice")
        labels = self._by_id("image_class_labels.txt", 2, "CUB labels", ids)
        is_train = self._by_id("train_test_split.txt", 2, "CUB train/test split", ids)
        boxes = self._by_id("bounding_boxes.txt", 5, "CUB bounding boxes", ids)
        if self.masks:
            require_file(self.mask_root, "CUB segmentation folder")

        train, test = [], []
        for image_id, rel in ((int(r[0]), r[1]) for r in images):
            label = int(labels[image_id][0]) - 1
            if not 0 <= label < self.num_classes:
                raise ValueError(f"image id {image_id}: class {label + 1} in image_class_labels.txt is outside 1..{self.num_classes}")
            path = str(self.base / "images" / rel)
            if is_train[image_id][0] == "1":
                train.append(FileSample(path, label))
                continue
            if is_train[image_id][0] != "0":
                raise ValueError(f"image id {image_id}: train_test_split.txt must say 1 or 0, got {is_train[image_id][0]!r}")
            x, y, w, h = (float(v) for v in boxes[image_id])
            mask_path = None
            if self.masks:
                mask_path = str(require_file(self.mask_root / Path(rel).with_suffix(".png"), f"CUB mask of image id {image_id}"))
            test.append(FileSample(path, label, boxes=torch.tensor([[x, y, x + w, y + h]]), mask_path=mask_path))
        test_set = self._files(test, self.eval_transform)
        return self._files(train, self.train_transform), test_set, test_set
