"""COCO-20k (object discovery) on a tiny fabricated copy of COCO's layout, and the shipped image list."""
from __future__ import annotations

import hashlib
import json
from importlib import resources
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

from simpool_lightning.data import COCO20kDataModule
from simpool_lightning.data.coco import coco_gt_boxes, read_file_list
from tests.reference.lost import extract_gt_coco

from .downstream_files import write_image, write_lines

W, H = 64, 48
CATEGORIES = [{"id": 1, "name": "person"}, {"id": 18, "name": "dog"}, {"id": 3, "name": "car"}]
# image id: annotations (bbox [x, y, w, h], category, iscrowd); the first one is drawn into the image.
COCO_IMAGES = {
    9: [([8.5, 10.2, 20.0, 15.5], 18, 0), ([0, 0, 64, 48], 1, 1), ([40.4, 2.5, 11.2, 9.0], 3, 0)],
    25: [([30.0, 12.0, 24.0, 30.0], 1, 0)],
    30: [([1.0, 1.0, 10.0, 10.0], 3, 1)],  # crowds only: no box to score
    42: [([4.0, 20.0, 33.5, 21.5], 3, 0), ([36.0, 4.0, 20.0, 16.0], 18, 0)],
}
LIST = [f"train2014/COCO_train2014_{i:012d}.jpg" for i in (42, 9, 30, 25)]


def make_coco(root: Path, extra_images: int = 1) -> Path:
    """COCO's layout: ``train2014/COCO_train2014_<id>.jpg`` and ``annotations/instances_train2014.json``
    (with ``extra_images`` images that are in no list); returns the list file of the four images."""
    images, annotations = [], []
    for image_id, anns in COCO_IMAGES.items():
        name = f"COCO_train2014_{image_id:012d}.jpg"
        x, y, w, h = anns[0][0]
        write_image(root / "train2014" / name, (W, H), rect=(round(x), round(y), round(x + w), round(y + h)))
        images.append({"id": image_id, "file_name": name, "width": W, "height": H})
        for bbox, category, crowd in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "bbox": bbox, "category_id": category,
                                "iscrowd": crowd, "area": bbox[2] * bbox[3], "segmentation": []})  # fmt: skip
    for extra in range(extra_images):
        images.append({"id": 1000 + extra, "file_name": f"COCO_train2014_{1000 + extra:012d}.jpg", "width": W, "height": H})
    path = root / "annotations" / "instances_train2014.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": CATEGORIES}))
    return write_lines(root / "coco_list.txt", LIST)


def test_shipped_list_is_losts_coco_20k() -> None:
    names = read_file_list()
    assert len(names) == 19817 == len(set(names))
    assert names[0] == "train2014/COCO_train2014_000000560992.jpg"
    data = resources.files("simpool_lightning.data").joinpath("coco_20k_filenames.txt").read_bytes()
    notice = resources.files("simpool_lightning.data").joinpath("coco_20k_filenames.LICENSE").read_text()
    digest = hashlib.sha256(data).hexdigest()
    assert digest in notice and "valeoai/LOST" in notice and "Apache License" in notice


def test_boxes_are_losts_ground_truth(tmp_path: Path) -> None:
    file_list = make_coco(tmp_path)
    dm = COCO20kDataModule(str(tmp_path), file_list=str(file_list), image_size=None, batch_size=1)
    assert dm.classes == ["person", "car", "dog"] and dm.num_classes == 3  # sorted by category id
    dm.setup("test")
    assert dm.dropped == [LIST[2]]  # image 30: crowds only
    samples = dm.test_set.samples
    assert [s.extra["image_id"] for s in samples] == ["42", "9", "25"]
    coco = COCO(str(tmp_path / "annotations" / "instances_train2014.json"))
    for sample in samples:
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[int(sample.extra["image_id"])]))
        assert sample.boxes.tolist() == extract_gt_coco(anns).tolist()  # LOST's rule, crowds dropped
    # Rounding half to even: x = 8.5 -> 8, y + h = 25.7 -> 26; 40.4 + 11.2 = 51.6 -> 52; 2.5 -> 2.
    assert samples[1].boxes.tolist() == [[8, 10, 28, 26], [40, 2, 52, 12]]
    assert samples[1].extra["box_labels"] == [2, 1] and samples[1].label == 2
    assert dm.val_set is dm.test_set
    with pytest.raises(RuntimeError, match="no train split"):
        dm.train_dataloader()

    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (1, 3, H, W) and batch["image_id"] == ["42"]
    assert batch["boxes"][0].tolist() == [[4, 20, 38, 42], [36, 4, 56, 20]]


def test_squashed_batches_scale_the_boxes(tmp_path: Path) -> None:
    file_list = make_coco(tmp_path)
    dm = COCO20kDataModule(str(tmp_path), file_list=str(file_list), image_size=32, batch_size=3)
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (3, 3, 32, 32)
    expected = torch.tensor([[8, 10, 28, 26], [40, 2, 52, 12]]) * torch.tensor([32 / W, 32 / H] * 2)
    assert torch.allclose(batch["boxes"][1], expected)
    # The drawn rectangle is where the first box says.
    image, box = batch["image"][1], batch["boxes"][1][0].round().long().tolist()
    inside = image[:, box[1] + 1 : box[3] - 1, box[0] + 1 : box[2] - 1].mean()
    assert inside > image.mean() + 0.5


def test_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="instances_train2014.json"):
        COCO20kDataModule(str(tmp_path)).setup("test")
    file_list = make_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere.txt"):
        COCO20kDataModule(str(tmp_path), file_list=str(tmp_path / "nowhere.txt")).setup("test")
    # The shipped list names real COCO ids that the fabricated annotations lack.
    with pytest.raises(ValueError, match=r"lacks 19817 image\(s\) of the list.*instances_train2014"):
        COCO20kDataModule(str(tmp_path)).setup("test")
    bad = write_lines(tmp_path / "bad.txt", ["train2014/COCO_train2014_000000000009.jpg", "train2014/cat.jpg"])
    with pytest.raises(ValueError, match=r"bad.txt' line 2: 'train2014/cat.jpg' does not end in _<image id>"):
        COCO20kDataModule(str(tmp_path), file_list=str(bad)).setup("test")
    twice = write_lines(tmp_path / "twice.txt", [LIST[0], LIST[0]])
    with pytest.raises(ValueError, match="names some images twice"):
        COCO20kDataModule(str(tmp_path), file_list=str(twice)).setup("test")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read COCO annotation file .*broken.json"):
        COCO20kDataModule(str(tmp_path), annotations=str(broken), file_list=str(file_list)).setup("test")
    with pytest.raises(ValueError, match="needs batch_size=1"):
        COCO20kDataModule(str(tmp_path), image_size=None, batch_size=2)


def test_coco_gt_boxes_without_boxes() -> None:
    boxes, categories = coco_gt_boxes([{"bbox": [0, 0, 1, 1], "iscrowd": 1, "category_id": 1}])
    assert boxes.shape == (0, 4) and categories == []
