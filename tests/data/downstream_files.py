"""Fabricate tiny downstream datasets in their real on-disk layouts and file formats."""
from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

Box = tuple[int, int, int, int]


def write_image(path: Path, size: tuple[int, int] = (80, 40), rect: Optional[Box] = None, color=(255, 255, 255)) -> Path:
    """A black JPEG of ``size`` (W, H) with the pixels ``[x1, x2) x [y1, y2)`` of ``rect`` filled with ``color``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", size)
    if rect is not None:
        ImageDraw.Draw(image).rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=color)
    image.save(path, quality=95)
    return path


def write_mask(path: Path, size: tuple[int, int], rect: Box) -> Path:
    """A greyscale PNG like CUB's: 255 inside ``rect``, a soft minority value (51) in a border around it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = Image.new("L", size)
    draw = ImageDraw.Draw(mask)
    draw.rectangle((rect[0] - 2, rect[1] - 2, rect[2] + 1, rect[3] + 1), fill=51)
    draw.rectangle((rect[0], rect[1], rect[2] - 1, rect[3] - 1), fill=255)
    mask.save(path)
    return path


def write_corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    return path


def write_lines(path: Path, lines: Sequence[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def write_voc_xml(path: Path, size: tuple[int, int], objects: Sequence[dict]) -> Path:
    """A Pascal-VOC-style XML; each object dict has ``name``, ``box`` (xmin, ymin, xmax, ymax as written)
    and optionally ``difficult``."""
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = "VOC2007"
    ET.SubElement(root, "filename").text = path.stem + ".jpg"
    s = ET.SubElement(root, "size")
    for key, value in zip(("width", "height", "depth"), (*size, 3)):
        ET.SubElement(s, key).text = str(value)
    for obj in objects:
        o = ET.SubElement(root, "object")
        ET.SubElement(o, "name").text = obj["name"]
        ET.SubElement(o, "pose").text = "Unspecified"
        ET.SubElement(o, "truncated").text = "0"
        ET.SubElement(o, "difficult").text = str(int(obj.get("difficult", 0)))
        b = ET.SubElement(o, "bndbox")
        for key, value in zip(("xmin", "ymin", "xmax", "ymax"), obj["box"]):
            ET.SubElement(b, key).text = str(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(path)
    return path


def region_means(image: torch.Tensor, box: torch.Tensor) -> tuple[float, float]:
    """Mean of a normalised ``(3, H, W)`` image inside the (integer-rounded) box and outside it."""
    x1, y1, x2, y2 = (max(int(round(float(v))), 0) for v in box)
    inside = torch.zeros(image.shape[-2:], dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    gray = image.mean(0)
    return float(gray[inside].mean()), float(gray[~inside].mean())


def assert_box_on_content(image: torch.Tensor, box: torch.Tensor, margin: int = 1) -> None:
    """The bright rectangle of a fabricated image lies where ``box`` says (up to resampling blur)."""
    shrunk = box + torch.tensor([margin, margin, -margin, -margin])
    grown = box + torch.tensor([-margin, -margin, margin, margin])
    inside, _ = region_means(image, shrunk)
    _, outside = region_means(image, grown)
    assert inside > 1.5 and outside < -1.5, (inside, outside, box)


def np_str_cells(values: Sequence[str]) -> np.ndarray:
    """A MATLAB cell row of strings, as ``scipy.io.savemat`` writes object arrays."""
    cells = np.empty((1, len(values)), dtype=object)
    cells[0, :] = list(values)
    return cells
