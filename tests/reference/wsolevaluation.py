"""A plain transcription of wsolevaluation's box localization metric (the oracle for ``MaxBoxAccV2``).

Source: clovaai/wsolevaluation at commit 96f4b88679af41f005824661f47e6fe3628af2aa, read and
rewritten step by step, one loop iteration per CAM threshold as the original runs it:

- ``inference.py`` ``CAMComputer.compute_and_evaluate_cams``: the model's CAM, as float64
  (``t2n``), is resized to the image with ``cv2.resize(..., interpolation=cv2.INTER_CUBIC)`` and
  min-max normalised by ``normalize_scoremap`` (a constant or NaN map becomes zeros);
- ``evaluation.py`` ``compute_bboxes_from_scoremaps``: the map is quantised to 8 bits
  (``(scoremap * 255).astype(np.uint8)``); at CAM threshold ``t`` pixels above
  ``int(t * max)`` are kept (``cv2.THRESH_BINARY``); every contour of ``cv2.findContours`` with
  ``cv2.RETR_TREE`` (holes included) gives the box ``(x, y, x + w, y + h)`` of its
  ``boundingRect``, with ``x + w`` and ``y + h`` clipped to ``width - 1`` and ``height - 1``; no
  contour gives the one box ``(0, 0, 0, 0)``;
- ``calculate_multiple_iou``: IoU with inclusive coordinates (``+ 1`` in widths and heights),
  0 where the union is not positive;
- ``BoxEvaluator.accumulate`` / ``compute``: per threshold the best IoU over (boxes x ground-truth
  boxes); an image is correct at ``(t, delta)`` when it reaches ``delta / 100``;
  ``BoxAcc(delta)`` is the best percentage over ``t``;
- ``config.py`` defaults: ``cam_curve_interval = 0.001`` (``np.arange(0, 1, 0.001)``),
  ``iou_threshold_list = [30, 50, 70]``, ``box_v2_metric = True`` (so ``multi_contour_eval`` and
  ``multi_iou_eval``: MaxBoxAccV2 is the average of the three BoxAccs).

Ground-truth boxes are given in the score map's frame instead of being read from metadata and
scaled by ``resize_bbox``; they are truncated with ``int`` as ``resize_bbox`` truncates.
``cv2.resize`` gets ``(width, height)``; the original passes ``images.shape[2:]``, i.e.
``(height, width)``, which is the same for its square 224 x 224 inputs.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

CONTOUR_INDEX = 1 if cv2.__version__.split(".")[0] == "3" else 0


def normalize_scoremap(cam: np.ndarray) -> np.ndarray:
    if np.isnan(cam).any():
        return np.zeros_like(cam)
    if cam.min() == cam.max():
        return np.zeros_like(cam)
    cam = cam - cam.min()
    cam = cam / cam.max()
    return cam


def resize_and_normalize(cam: np.ndarray, height: int, width: int) -> np.ndarray:
    resized = cv2.resize(cam.astype(np.float64), (width, height), interpolation=cv2.INTER_CUBIC)
    return normalize_scoremap(resized)


def multiple_iou(box_a: np.ndarray, box_b: np.ndarray) -> np.ndarray:
    """(num_a, 4) x (num_b, 4) int boxes, x0y0x1y1 inclusive -> (num_a, num_b) IoU."""
    num_a, num_b = box_a.shape[0], box_b.shape[0]
    a = np.tile(box_a, num_b).reshape(num_a, num_b, 4)
    b = np.transpose(np.tile(box_b, num_a).reshape(num_b, num_a, 4), (1, 0, 2))
    min_x = np.maximum(a[:, :, 0], b[:, :, 0])
    min_y = np.maximum(a[:, :, 1], b[:, :, 1])
    max_x = np.minimum(a[:, :, 2], b[:, :, 2])
    max_y = np.minimum(a[:, :, 3], b[:, :, 3])
    area_intersect = np.maximum(0, max_x - min_x + 1) * np.maximum(0, max_y - min_y + 1)
    area_a = (a[:, :, 2] - a[:, :, 0] + 1) * (a[:, :, 3] - a[:, :, 1] + 1)
    area_b = (b[:, :, 2] - b[:, :, 0] + 1) * (b[:, :, 3] - b[:, :, 1] + 1)
    denominator = area_a + area_b - area_intersect
    degenerate = np.where(denominator <= 0)
    denominator[degenerate] = 1
    ious = area_intersect / denominator
    ious[degenerate] = 0
    return ious


def boxes_from_scoremap(scoremap: np.ndarray, cam_thresholds: Sequence[float]) -> tuple[list[np.ndarray], list[int]]:
    height, width = scoremap.shape
    image = np.expand_dims((scoremap * 255).astype(np.uint8), 2)
    all_boxes, counts = [], []
    for threshold in cam_thresholds:
        _, binary = cv2.threshold(image, int(threshold * np.max(image)), 255, cv2.THRESH_BINARY)
        contours = cv2.findContours(binary, cv2.RETR_TREE, cv2.CHAIN_APPROX_SIMPLE)[CONTOUR_INDEX]
        if len(contours) == 0:
            all_boxes.append(np.asarray([[0, 0, 0, 0]]))
            counts.append(1)
            continue
        boxes = []
        for contour in contours:
            x, y, w, h = cv2.boundingRect(contour)
            boxes.append([x, y, min(x + w, width - 1), min(y + h, height - 1)])
        all_boxes.append(np.asarray(boxes))
        counts.append(len(contours))
    return all_boxes, counts


class BoxEvaluator:
    """``accumulate(scoremap, gt_boxes)`` per image, then ``compute()`` -> (BoxAcc per delta in %, MaxBoxAccV2 in %)."""

    def __init__(self, cam_curve_interval: float = 0.001, iou_threshold_list: Sequence[int] = (30, 50, 70)) -> None:
        self.cam_threshold_list = list(np.arange(0, 1, cam_curve_interval))
        self.iou_threshold_list = list(iou_threshold_list)
        self.num_correct = {d: np.zeros(len(self.cam_threshold_list)) for d in self.iou_threshold_list}
        self.cnt = 0

    def accumulate(self, scoremap: np.ndarray, gt_boxes: Sequence[Sequence[float]]) -> None:
        gt = np.array([[int(v) for v in box] for box in gt_boxes])
        boxes, counts = boxes_from_scoremap(scoremap, self.cam_threshold_list)
        iou = multiple_iou(np.concatenate(boxes, axis=0), gt)
        best_per_box = iou.max(1)
        sliced, idx = [], 0
        for n in counts:
            sliced.append(max(best_per_box[idx : idx + n]))
            idx += n
        for delta in self.iou_threshold_list:
            self.num_correct[delta][np.where(np.asarray(sliced) >= (delta / 100))[0]] += 1
        self.cnt += 1

    def compute(self) -> tuple[list[float], float]:
        box_acc = [(self.num_correct[d] * 100.0 / float(self.cnt)).max() for d in self.iou_threshold_list]
        return box_acc, float(np.average(box_acc))
