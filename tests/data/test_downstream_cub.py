"""CUB-200-2011 DataModule on a tiny fabricated copy of the real layout."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from simpool_lightning.data import BadImageError, CUB200DataModule

from .downstream_files import assert_box_on_content, write_corrupt, write_image, write_lines, write_mask

SIZE = 32
W, H = 80, 40
# id: (relative path, class 1..200, is_train, x, y, w, h)
IMAGES = {
    1: ("001.Black_footed_Albatross/Black_Footed_Albatross_0046_18.jpg", 1, 1, 8.0, 4.0, 30.0, 20.0),
    2: ("200.Common_Yellowthroat/Common_Yellowthroat_0055_190967.jpg", 200, 1, 0.0, 0.0, 80.0, 40.0),
    3: ("001.Black_footed_Albatross/Black_Footed_Albatross_0009_34.jpg", 1, 0, 20.0, 10.0, 20.0, 20.0),
    4: ("014.Indigo_Bunting/Indigo_Bunting_0010_13000.jpg", 14, 0, 40.0, 5.0, 30.0, 30.0),
}


def make_cub(root: Path, with_masks: bool = True) -> Path:
    base = root / "CUB_200_2011"
    names = {1: "001.Black_footed_Albatross", 14: "014.Indigo_Bunting", 200: "200.Common_Yellowthroat"}
    write_lines(base / "classes.txt", [f"{c} {names.get(c, f'{c:03d}.Bird_{c}')}" for c in range(1, 201)])
    write_lines(base / "images.txt", [f"{i} {v[0]}" for i, v in IMAGES.items()])
    write_lines(base / "image_class_labels.txt", [f"{i} {v[1]}" for i, v in IMAGES.items()])
    write_lines(base / "train_test_split.txt", [f"{i} {v[2]}" for i, v in IMAGES.items()])
    write_lines(base / "bounding_boxes.txt", [f"{i} {v[3]} {v[4]} {v[5]} {v[6]}" for i, v in IMAGES.items()])
    for rel, _, _, x, y, w, h in IMAGES.values():
        rect = (int(x), int(y), int(x + w), int(y + h))
        write_image(base / "images" / rel, (W, H), rect=rect)
        if with_masks:
            write_mask((base / "segmentations" / rel).with_suffix(".png"), (W, H), rect)
    return base


def test_cub_labels_splits_boxes_masks(tmp_path: Path) -> None:
    make_cub(tmp_path)
    dm = CUB200DataModule(str(tmp_path), image_size=SIZE, batch_size=2, masks=True)
    assert dm.num_classes == 200
    assert dm.classes[0] == "Black footed Albatross" and dm.classes[199] == "Common Yellowthroat"
    dm.setup()
    assert [s.label for s in dm.train_set.samples] == [0, 199]
    assert [s.label for s in dm.test_set.samples] == [0, 13]
    assert dm.val_set is dm.test_set
    # x, y, w, h -> x, y, x + w, y + h in the image's own frame.
    assert dm.test_set.samples[0].boxes.tolist() == [[20.0, 10.0, 40.0, 30.0]]
    assert dm.test_set.samples[1].boxes.tolist() == [[40.0, 5.0, 70.0, 35.0]]

    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (2, 3, SIZE, SIZE) and batch["label"].tolist() == [0, 13]
    assert batch["mask"].shape == (2, SIZE, SIZE) and batch["mask"].dtype == torch.bool
    # Squash: x scales by 32/80, y by 32/40; boxes, masks and pixels move together.
    sx, sy = SIZE / W, SIZE / H
    expected = [[20 * sx, 10 * sy, 40 * sx, 30 * sy], [40 * sx, 5 * sy, 70 * sx, 35 * sy]]
    for image, boxes, mask, box in zip(batch["image"], batch["boxes"], batch["mask"], expected):
        assert boxes.shape == (1, 4)
        torch.testing.assert_close(boxes[0], torch.tensor(box))
        assert_box_on_content(image, boxes[0])
        x1, y1, x2, y2 = (int(round(v)) for v in box)
        # The soft border (51 < 128) is background: the mask is the rectangle, up to resampling.
        assert mask[y1 + 1 : y2 - 1, x1 + 1 : x2 - 1].all() and mask.sum() <= (x2 - x1 + 2) * (y2 - y1 + 2)

    train = next(iter(dm.train_dataloader()))
    assert set(train) == {"image", "label"} and train["image"].shape == (2, 3, SIZE, SIZE)


def test_cub_center_crop_moves_boxes(tmp_path: Path) -> None:
    make_cub(tmp_path, with_masks=False)
    dm = CUB200DataModule(str(tmp_path), image_size=SIZE, batch_size=2, eval_resize="crop", crop_pct=1.0)
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert "mask" not in batch
    # Short side 40 -> 32 (scale 0.8, width 64), then a 32-wide center crop drops 16 px on the left.
    torch.testing.assert_close(batch["boxes"][0][0], torch.tensor([20 * 0.8 - 16, 8.0, 40 * 0.8 - 16, 24.0]))
    assert_box_on_content(batch["image"][0], batch["boxes"][0][0])
    # The second box (x 32..56 after scaling) is clamped to the crop's right edge.
    torch.testing.assert_close(batch["boxes"][1][0], torch.tensor([16.0, 4.0, 32.0, 28.0]))


def test_cub_mismatched_annotation_counts(tmp_path: Path) -> None:
    base = make_cub(tmp_path, with_masks=False)
    write_lines(base / "bounding_boxes.txt", ["1 0 0 5 5", "2 0 0 5 5", "3 0 0 5 5"])
    with pytest.raises(ValueError, match=r"bounding_boxes.txt.*3 rows for 4 images.*missing: \[4\]"):
        CUB200DataModule(str(tmp_path)).setup()


def test_cub_missing_files(tmp_path: Path) -> None:
    base = make_cub(tmp_path, with_masks=False)
    with pytest.raises(FileNotFoundError, match="segmentations"):
        CUB200DataModule(str(tmp_path), masks=True).setup()
    (base / "train_test_split.txt").unlink()
    with pytest.raises(FileNotFoundError, match="train_test_split.txt"):
        CUB200DataModule(str(tmp_path)).setup()
    (base / "classes.txt").unlink()
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        CUB200DataModule(str(tmp_path)).num_classes


def test_cub_malformed_line_names_file_and_line(tmp_path: Path) -> None:
    base = make_cub(tmp_path, with_masks=False)
    write_lines(base / "bounding_boxes.txt", ["1 0 0 5 5", "2 0 0 5"])
    with pytest.raises(ValueError, match="bounding_boxes.txt' line 2"):
        CUB200DataModule(str(tmp_path)).setup()


def test_cub_corrupt_image(tmp_path: Path) -> None:
    base = make_cub(tmp_path, with_masks=False)
    bad = write_corrupt(base / "images" / IMAGES[3][0])
    dm = CUB200DataModule(str(tmp_path), image_size=SIZE, batch_size=2)
    dm.setup()
    with pytest.raises(BadImageError, match="Black_Footed_Albatross_0009_34.jpg"):
        next(iter(dm.test_dataloader()))
    dm = CUB200DataModule(str(tmp_path), image_size=SIZE, batch_size=2, on_bad_image="skip")
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["label"].tolist() == [13, 13] and dm.skipped == [str(bad)]
