"""Pascal VOC (object discovery) and ImageNet validation boxes on tiny fabricated copies of the real layouts."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchvision.datasets import VOCDetection

from simpool_lightning.data import BadImageError, ImageNetBoxesDataModule, VOCDataModule
from simpool_lightning.data.voc import parse_voc_xml

from .downstream_files import assert_box_on_content, write_corrupt, write_image, write_lines, write_voc_xml

SIZE = 32
W, H = 80, 40

# ------------------------------------------------------------------------------------------------ VOC

VOC_IMAGES = {
    # id: objects (box as written: 1-based inclusive corners); the first object is drawn into the image
    "000005": [{"name": "dog", "box": (21, 11, 40, 30)}, {"name": "person", "box": (1, 1, 80, 40), "difficult": 1}],
    "000007": [{"name": "car", "box": (5, 5, 20, 20), "difficult": 1}],
    "000009": [{"name": "tvmonitor", "box": (41, 6, 70, 35)}, {"name": "cat", "box": (2.5, 3, 10, 12.5)}],
}


def make_voc(root: Path, year: int = 2007) -> Path:
    base = root / "VOCdevkit" / f"VOC{year}"
    for image_id, objects in VOC_IMAGES.items():
        write_voc_xml(base / "Annotations" / f"{image_id}.xml", (W, H), objects)
        xmin, ymin, xmax, ymax = objects[0]["box"]
        write_image(base / "JPEGImages" / f"{image_id}.jpg", (W, H), rect=(int(xmin) - 1, int(ymin) - 1, int(xmax), int(ymax)))
    write_lines(base / "ImageSets" / "Main" / "trainval.txt", list(VOC_IMAGES))
    write_lines(base / "ImageSets" / "Main" / "test.txt", ["000009"])
    return base


def test_voc_boxes_labels_and_convention(tmp_path: Path) -> None:
    make_voc(tmp_path)
    dm = VOCDataModule(str(tmp_path), year=2007, split="trainval", image_size=SIZE, batch_size=3)
    assert dm.num_classes == 20 and dm.classes[11] == "dog"
    dm.setup("test")
    # The layout is the one torchvision's VOCDetection reads: same ids and objects.
    theirs = VOCDetection(str(tmp_path), year="2007", image_set="trainval", download=False)
    assert [Path(p).stem for p in theirs.images] == [s.extra["image_id"] for s in dm.test_set.samples]
    # 1-based inclusive (xmin, ymin, xmax, ymax) -> (xmin - 1, ymin - 1, xmax, ymax).
    first = dm.test_set.samples[0]
    assert first.boxes.tolist() == [[20.0, 10.0, 40.0, 30.0], [0.0, 0.0, 80.0, 40.0]]
    assert first.label == 11 and first.extra["box_labels"] == [11, 14]
    assert dm.test_set.samples[2].boxes.tolist()[1] == [1.5, 2.0, 10.0, 12.5]
    assert dm.dropped == [] and dm.val_set is dm.test_set
    with pytest.raises(RuntimeError, match="no train split"):
        dm.train_dataloader()

    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (3, 3, SIZE, SIZE)
    assert batch["label"].tolist() == [11, 6, 19]  # first object's class
    assert batch["image_id"] == list(VOC_IMAGES) and batch["box_labels"][2] == [19, 7]
    sx, sy = SIZE / W, SIZE / H
    torch.testing.assert_close(batch["boxes"][0], torch.tensor([[20 * sx, 10 * sy, 40 * sx, 30 * sy], [0, 0, 32.0, 32.0]]))
    for image, boxes in zip(batch["image"][[0, 2]], [batch["boxes"][0], batch["boxes"][2]]):
        assert_box_on_content(image, boxes[0])


def test_voc_drop_difficult(tmp_path: Path) -> None:
    make_voc(tmp_path)
    dm = VOCDataModule(str(tmp_path), image_size=SIZE, batch_size=2, drop_difficult=True)
    dm.setup()
    assert dm.dropped == ["000007"]  # its only object is difficult
    assert [s.extra["image_id"] for s in dm.test_set.samples] == ["000005", "000009"]
    assert dm.test_set.samples[0].boxes.tolist() == [[20.0, 10.0, 40.0, 30.0]]


def test_voc_original_resolution_needs_batch_one(tmp_path: Path) -> None:
    make_voc(tmp_path)
    with pytest.raises(ValueError, match="batch_size=1"):
        VOCDataModule(str(tmp_path), image_size=None, batch_size=2)
    dm = VOCDataModule(str(tmp_path), image_size=None, batch_size=1, split="test")
    dm.setup()
    batch = next(iter(dm.test_dataloader()))
    assert batch["image"].shape == (1, 3, H, W)
    assert batch["boxes"][0].tolist()[0] == [40.0, 5.0, 70.0, 35.0]
    assert_box_on_content(batch["image"][0], batch["boxes"][0][0])


def test_voc_bad_data(tmp_path: Path) -> None:
    base = make_voc(tmp_path)
    (base / "Annotations" / "000007.xml").unlink()
    with pytest.raises(FileNotFoundError, match="000007.xml"):
        VOCDataModule(str(tmp_path)).setup()
    (base / "Annotations" / "000007.xml").write_text("<annotation><object><name>dog</name>")
    with pytest.raises(ValueError, match="000007.xml"):
        VOCDataModule(str(tmp_path)).setup()
    write_voc_xml(base / "Annotations" / "000007.xml", (W, H), [{"name": "unicorn", "box": (1, 1, 5, 5)}])
    with pytest.raises(ValueError, match="000007.xml.*unicorn"):
        VOCDataModule(str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="VOC2012"):
        VOCDataModule(str(tmp_path), year=2012).setup()


def test_voc_corrupt_image(tmp_path: Path) -> None:
    base = make_voc(tmp_path)
    bad = write_corrupt(base / "JPEGImages" / "000009.jpg")
    dm = VOCDataModule(str(tmp_path), image_size=SIZE, batch_size=3)
    dm.setup()
    with pytest.raises(BadImageError, match="000009.jpg"):
        next(iter(dm.test_dataloader()))
    dm = VOCDataModule(str(tmp_path), image_size=SIZE, batch_size=3, on_bad_image="skip")
    dm.setup()
    assert next(iter(dm.test_dataloader()))["image_id"] == ["000005", "000007", "000005"]
    assert dm.skipped == [str(bad)]


def test_parse_voc_xml_reads_size_and_flags(tmp_path: Path) -> None:
    path = write_voc_xml(tmp_path / "a.xml", (W, H), VOC_IMAGES["000005"])
    size, objects = parse_voc_xml(path)
    assert size == (W, H) and [o.name for o in objects] == ["dog", "person"]
    assert [o.difficult for o in objects] == [False, True] and objects[0].xmax == 40.0


# ----------------------------------------------------------------------------------- ImageNet boxes

WNIDS = ["n01440764", "n01443537", "n15075141"]
# image id -> (class folder, objects as written: 0-based inclusive corners); the first is drawn
IN_IMAGES = {
    "ILSVRC2012_val_00000001": ("n01443537", [("n01443537", 20, 10, 39, 29), ("n01443537", 0, 0, 79, 39)]),
    "ILSVRC2012_val_00000002": ("n15075141", [("n15075141", 44, 4, 75, 35), ("n01440764", 0, 0, 9, 9)]),
    "ILSVRC2012_val_00000003": ("n01440764", [("n01440764", 5, 5, 30, 30)]),
}


def make_imagenet_val(root: Path) -> tuple[Path, Path, Path]:
    """``root/imagenet/val/<wnid>/*.JPEG``, ``root/boxes/*.xml`` and ``root/LOC_val_solution.csv``."""
    for wnid in WNIDS:
        (root / "imagenet" / "val" / wnid).mkdir(parents=True)
    rows = ["ImageId,PredictionString"]
    for image_id, (wnid, objects) in IN_IMAGES.items():
        _, x1, y1, x2, y2 = objects[0]
        write_image(root / "imagenet" / "val" / wnid / f"{image_id}.JPEG", (W, H), rect=(x1, y1, x2 + 1, y2 + 1))
        write_voc_xml(root / "boxes" / f"{image_id}.xml", (W, H), [{"name": o[0], "box": o[1:]} for o in objects])
        rows.append(f"{image_id}," + " ".join(" ".join(str(v) for v in o) for o in objects) + " ")
    write_lines(root / "LOC_val_solution.csv", rows)
    return root / "imagenet", root / "boxes", root / "LOC_val_solution.csv"


@pytest.mark.parametrize("source", ["xml", "csv"])
def test_imagenet_boxes_from_xml_or_csv(tmp_path: Path, source: str) -> None:
    root, xml_dir, csv_file = make_imagenet_val(tmp_path)
    dm = ImageNetBoxesDataModule(str(root), boxes=str(xml_dir if source == "xml" else csv_file), image_size=SIZE, batch_size=3)
    assert dm.classes == WNIDS and dm.num_classes == 3
    dm.setup()
    samples = {Path(s.path).stem: s for s in dm.test_set.samples}
    # 0-based inclusive corners -> half-open (xmax + 1, ymax + 1); only boxes of the image's class.
    assert samples["ILSVRC2012_val_00000001"].boxes.tolist() == [[20, 10, 40, 30], [0, 0, 80, 40]]
    assert samples["ILSVRC2012_val_00000002"].boxes.tolist() == [[44, 4, 76, 36]]
    assert [s.label for s in dm.test_set.samples] == [0, 1, 2]  # sorted wnids
    batch = next(iter(dm.test_dataloader()))
    sx, sy = SIZE / W, SIZE / H
    torch.testing.assert_close(batch["boxes"][1], torch.tensor([[20 * sx, 10 * sy, 40 * sx, 30 * sy], [0, 0, 32.0, 32.0]]))
    for image, boxes in zip(batch["image"], batch["boxes"]):
        assert_box_on_content(image, boxes[0])


def test_imagenet_boxes_bad_data(tmp_path: Path) -> None:
    root, xml_dir, csv_file = make_imagenet_val(tmp_path)
    write_lines(csv_file, ["ImageId,PredictionString", "ILSVRC2012_val_00000001,n01443537 1 2 3"])
    with pytest.raises(ValueError, match="LOC_val_solution.csv' row 2"):
        ImageNetBoxesDataModule(str(root), boxes=str(csv_file)).setup()
    write_lines(csv_file, ["ImageId,PredictionString", "ILSVRC2012_val_00000001,n01443537 1 2 3 4"])
    with pytest.raises(ValueError, match="no row for image.*ILSVRC2012_val_00000003.JPEG"):
        ImageNetBoxesDataModule(str(root), boxes=str(csv_file)).setup()
    write_voc_xml(xml_dir / "ILSVRC2012_val_00000003.xml", (W, H), [{"name": "n01443537", "box": (1, 1, 5, 5)}])
    with pytest.raises(ValueError, match="ILSVRC2012_val_00000003.xml.*no box of class n01440764"):
        ImageNetBoxesDataModule(str(root), boxes=str(xml_dir)).setup()
    (xml_dir / "ILSVRC2012_val_00000003.xml").unlink()
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_val_00000003.xml"):
        ImageNetBoxesDataModule(str(root), boxes=str(xml_dir)).setup()
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageNetBoxesDataModule(str(root), boxes=str(tmp_path / "nowhere")).setup()
