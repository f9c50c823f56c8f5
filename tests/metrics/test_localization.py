"""Localization metrics on hand-worked cases, MaxBoxAccV2 against a transcription of wsolevaluation; DDP-style merging of their states."""
from __future__ import annotations

import math
from collections import deque

import cv2
import numpy as np
import pytest
import torch

from simpool_lightning.metrics import (
    CorLoc,
    MaskIoU,
    MaxBoxAccV2,
    largest_component_box,
    resize_attention,
    threshold_by_mass,
    threshold_by_value,
)
from simpool_lightning.metrics.localization import _label
from simpool_lightning.metrics.maxboxacc import resize_scoremaps
from tests.reference import wsolevaluation


def box_map(h: int, w: int, *boxes: tuple[int, int, int, int], value: float = 1.0) -> torch.Tensor:
    """An (h, w) map holding `value` inside each xyxy box (pixel convention of the module)."""
    m = torch.zeros(h, w)
    for x1, y1, x2, y2 in boxes:
        m[y1:y2, x1:x2] = value
    return m


# ---------------------------------------------------------------- thresholding


def test_threshold_by_mass_keeps_smallest_set_reaching_mass():
    attn = torch.tensor([[[0.5, 0.25], [0.125, 0.125]]])
    # Sorted 0.5, 0.25, 0.125, 0.125; mass before each: 0, 0.5, 0.75, 0.875.
    # mass 0.6: 0.5 and 0.25 are needed (0 and 0.5 < 0.6); 0.125 is not (0.75 >= 0.6).
    assert threshold_by_mass(attn, 0.6).tolist() == [[[True, True], [False, False]]]
    # mass 0.75 is reached exactly by the top two.
    assert threshold_by_mass(attn, 0.75).tolist() == [[[True, True], [False, False]]]
    # mass 0.8 needs one 0.125; its tie is kept too (4 locations, not the minimal 3).
    assert threshold_by_mass(attn, 0.8).tolist() == [[[True, True], [True, True]]]
    # Scale does not matter: the mass is relative to each map's total.
    assert torch.equal(threshold_by_mass(attn * 7, 0.6), threshold_by_mass(attn, 0.6))


def test_threshold_by_mass_edge_cases():
    # mass 1 keeps all attention but not the locations with none.
    attn = torch.tensor([[[0.5, 0.5], [0.0, 0.0]]])
    assert threshold_by_mass(attn, 1.0).tolist() == [[[True, True], [False, False]]]
    assert not threshold_by_mass(torch.zeros(2, 3, 3), 0.6).any()
    with pytest.raises(ValueError, match="non-negative"):
        threshold_by_mass(-attn, 0.6)
    with pytest.raises(ValueError, match="mass"):
        threshold_by_mass(attn, 0.0)
    with pytest.raises(ValueError, match=r"\(B, h, w\)"):
        threshold_by_mass(attn[0], 0.6)


def test_threshold_by_value_is_relative_to_max():
    attn = torch.tensor([[[1.0, 0.5], [0.25, 0.0]]])
    assert threshold_by_value(attn, 0.5).tolist() == [[[True, True], [False, False]]]
    assert torch.equal(threshold_by_value(attn * 3, 0.5), threshold_by_value(attn, 0.5))
    assert threshold_by_value(attn, 1.0).sum() == 1
    assert not threshold_by_value(torch.zeros(1, 2, 2), 0.0).any()
    with pytest.raises(ValueError, match="threshold"):
        threshold_by_value(attn, 1.5)


# ---------------------------------------------------------------- connected components

MASK = torch.tensor(
    [
        [0, 0, 0, 0, 0, 0],
        [0, 1, 1, 0, 0, 0],
        [0, 1, 1, 0, 0, 1],
        [0, 0, 0, 1, 0, 1],
        [0, 0, 0, 0, 0, 1],
        [0, 0, 0, 0, 0, 0],
    ],
    dtype=torch.bool,
)


def test_largest_component_box_connectivity():
    # 8-connected: the 2x2 block and the diagonal pixel (3, 3) form one component of 5 pixels,
    # columns and rows 1..3, so the box is (1, 1, 4, 4); the right column has 3 pixels.
    assert largest_component_box(MASK).tolist() == [1.0, 1.0, 4.0, 4.0]
    # 4-connected: the block alone (4 pixels) beats the column (3) and the single pixel.
    assert largest_component_box(MASK, connectivity=4).tolist() == [1.0, 1.0, 3.0, 3.0]


def test_largest_component_box_ties_and_empty():
    two = torch.zeros(5, 5, dtype=torch.bool)
    two[3, 0:2] = True  # met second in raster order
    two[0, 3:5] = True  # met first
    assert largest_component_box(two).tolist() == [3.0, 0.0, 5.0, 1.0]
    assert largest_component_box(torch.zeros(4, 4, dtype=torch.bool)) is None
    with pytest.raises(ValueError, match="bool"):
        largest_component_box(MASK.float())
    with pytest.raises(ValueError, match="connectivity"):
        largest_component_box(MASK, connectivity=6)


def flood_fill_boxes(mask: np.ndarray, connectivity: int) -> set[tuple[int, int, int, int]]:
    """Independent oracle: boxes of components by breadth-first search."""
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)]
    if connectivity == 8:
        steps += [(1, 1), (1, -1), (-1, 1), (-1, -1)]
    seen = np.zeros_like(mask)
    boxes = set()
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        seen[y, x] = True
        queue, ys, xs = deque([(y, x)]), [], []
        while queue:
            cy, cx = queue.popleft()
            ys.append(cy)
            xs.append(cx)
            for dy, dx in steps:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        boxes.add((min(xs), min(ys), max(xs) + 1, max(ys) + 1))
    return boxes


@pytest.mark.parametrize("connectivity", [4, 8])
def test_component_boxes_match_flood_fill(connectivity):
    rng = np.random.default_rng(0)
    masks = rng.random((12, 9, 11)) > 0.6
    _, index, boxes = _label(masks, connectivity)
    for n, mask in enumerate(masks):
        got = {tuple(int(v) for v in b) for b in boxes[index == n].tolist()}
        assert got == flood_fill_boxes(mask, connectivity)


# ---------------------------------------------------------------- MaskIoU


def test_mask_iou_perfect_and_wrong():
    mask = box_map(8, 8, (2, 2, 6, 6)).bool()[None]
    # Uniform attention on the mask: all locations tie, so all are kept whatever the mass.
    perfect = MaskIoU(mass=0.6)
    perfect.update(mask.float() / mask.sum(), mask)
    assert perfect.compute().item() == 1.0
    wrong = MaskIoU(mass=0.6)
    wrong.update(box_map(8, 8, (6, 6, 8, 8))[None], mask)
    assert wrong.compute().item() == 0.0


def test_mask_iou_is_a_mean_over_images():
    left = box_map(4, 4, (0, 0, 2, 4)).bool()  # mask: left half, 8 px
    top = box_map(4, 4, (0, 0, 4, 2))  # attention: top half, 8 px
    metric = MaskIoU(mode="value", threshold=0.5)
    metric.update(torch.stack([left.float(), top]), torch.stack([left, left]))
    # Image 1: IoU 1. Image 2: intersection 4 (top-left 2x2), union 12, IoU 1/3.
    # Mean of images 2/3; the pooled ratio (8 + 4) / (8 + 12) = 0.6 would be different.
    assert metric.compute().item() == pytest.approx(2 / 3)


def test_mask_iou_upsamples_attention():
    # Bilinear 2x upsampling (align_corners=False) of [[1, 0], [0, 0]]: along each axis the
    # weight of the first cell is 1, 0.75, 0.25, 0, so the top-left 2x2 holds 1, 0.75, 0.75,
    # 0.5625 and everything else is at most 0.25: threshold 0.5 keeps exactly that 2x2.
    attn = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert resize_attention(attn, (4, 4))[0, :2, :2].tolist() == [[1.0, 0.75], [0.75, 0.5625]]
    mask = box_map(4, 4, (0, 0, 2, 2)).bool()[None]
    metric = MaskIoU(mode="value", threshold=0.5)
    metric.update(attn, mask)
    assert metric.compute().item() == 1.0


def test_mask_iou_empty_prediction_and_mask_agree():
    metric = MaskIoU()
    metric.update(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4, dtype=torch.bool))
    assert metric.compute().item() == 1.0


def test_mask_iou_rejects_bad_input():
    metric = MaskIoU()
    with pytest.raises(ValueError, match="batch size"):
        metric.update(torch.rand(2, 4, 4), torch.zeros(3, 4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        metric.update(torch.rand(2, 4, 4), torch.zeros(2, 4, 4))
    with pytest.raises(ValueError, match="mode"):
        MaskIoU(mode="otsu")


# ---------------------------------------------------------------- CorLoc


def test_corloc_perfect_wrong_and_any_box():
    gt = torch.tensor([[2.0, 2.0, 6.0, 6.0]])
    metric = CorLoc()
    metric.update(box_map(8, 8, (2, 2, 6, 6))[None], [gt])
    assert metric.compute().item() == 1.0
    metric = CorLoc()
    metric.update(box_map(8, 8, (6, 6, 8, 8))[None], [gt])
    assert metric.compute().item() == 0.0
    # Any ground-truth box will do: the prediction matches the second of two.
    metric = CorLoc()
    metric.update(box_map(8, 8, (6, 6, 8, 8))[None], [torch.tensor([[0.0, 0.0, 3.0, 3.0], [6.0, 6.0, 8.0, 8.0]])])
    assert metric.compute().item() == 1.0


def test_corloc_iou_threshold_is_inclusive_and_largest_component_wins():
    attn = torch.stack(
        [
            # Predicted box (0, 0, 4, 4), 16 px, holds the gt (0, 0, 4, 2), 8 px: IoU exactly 0.5.
            box_map(8, 8, (0, 0, 4, 4)),
            # Largest component (3x3, bottom right) is off the gt; the 2x2 on the gt loses.
            box_map(8, 8, (0, 0, 2, 2)) + box_map(8, 8, (5, 5, 8, 8)),
            # No attention: no box, wrong.
            torch.zeros(8, 8),
            # No ground truth: skipped.
            box_map(8, 8, (0, 0, 4, 4)),
        ]
    )
    gt = [
        torch.tensor([[0.0, 0.0, 4.0, 2.0]]),
        torch.tensor([[0.0, 0.0, 2.0, 2.0]]),
        torch.tensor([[0.0, 0.0, 2.0, 2.0]]),
        torch.zeros(0, 4),
    ]
    metric = CorLoc(mode="value", threshold=0.5)
    metric.update(attn, gt)
    assert (metric.correct.item(), metric.total.item()) == (1, 3)
    assert metric.compute().item() == pytest.approx(1 / 3)


def test_corloc_rejects_bad_boxes():
    metric = CorLoc()
    with pytest.raises(ValueError, match="batch size 2"):
        metric.update(torch.rand(2, 4, 4), [torch.zeros(1, 4)])
    with pytest.raises(ValueError, match=r"boxes\[1\]"):
        metric.update(torch.rand(2, 4, 4), [torch.zeros(1, 4), torch.zeros(4)])


# ---------------------------------------------------------------- MaxBoxAccV2
# Default protocol: wsolevaluation's released code (tests/reference/wsolevaluation.py transcribes
# it). Maps are 8-bit quantised, so a map value v in [0, 1] is int(255 v) and is kept at CAM
# threshold t = i / 1000 while int(255 v) > int(255 t). Boxes are (x, y, x + w, y + h) of each
# OpenCV contour, right and bottom clipped to W - 1, H - 1, and IoU counts both corners (+ 1).


def test_maxboxacc_v2_ring_whose_object_is_its_hole():
    # A ring of ones, outside (8, 8, 24, 24), hole (12, 12, 20, 20), on a 32 x 32 map; the object is
    # the hole. At every threshold the ring is kept and RETR_TREE gives two contours:
    #   outer: boundingRect (8, 8, 16, 16) -> box (8, 8, 24, 24), inclusive 17 x 17;
    #   hole:  traced on the ring pixels around it, rows and columns 11 .. 20 -> (11, 11, 21, 21), 11 x 11.
    # Ground truth (12, 12, 20, 20) is 9 x 9 = 81 inclusive and lies inside both:
    #   IoU(hole box) = 81 / 121 = 0.669, IoU(outer box) = 81 / 289 = 0.28.
    # So BoxAcc@0.3 = BoxAcc@0.5 = 1, BoxAcc@0.7 = 0: MaxBoxAccV2 = 2/3.
    ring = box_map(32, 32, (8, 8, 24, 24)) - box_map(32, 32, (12, 12, 20, 20))
    gt = [torch.tensor([[12.0, 12.0, 20.0, 20.0]])]
    metric = MaxBoxAccV2()
    metric.update(ring[None], gt)
    assert metric.hits.sum(1).tolist() == [1000, 1000, 0]
    result = metric.compute()
    assert [result[f"BoxAcc@{d}"].item() for d in (0.3, 0.5, 0.7)] == [1.0, 1.0, 0.0]
    assert result["MaxBoxAccV2"].item() == pytest.approx(2 / 3)
    # The components reading sees only the ring's box (8, 8, 24, 24): IoU 64 / 256 = 0.25 everywhere.
    components = MaxBoxAccV2(protocol="components")
    components.update(ring[None], gt)
    assert components.compute()["MaxBoxAccV2"].item() == 0.0


def test_maxboxacc_v2_two_blobs_with_the_object_on_the_smaller():
    # A bright 10 x 10 decoy (1.0 -> 255) and a dim 4 x 4 object (0.5 -> int(127.5) = 127), gt on the object.
    # The object is kept while int(255 t) < 127, i.e. for t = 0.000 .. 0.498 (int(0.499 * 255) = 127):
    # 499 thresholds, at which it is one of two contours and its box (2, 2, 6, 6) matches the gt
    # exactly (IoU 1); above, only the decoy is left (IoU 0). Every contour counts, so the largest
    # (the decoy) does not hide the object: MaxBoxAccV2 = 1.
    cam = box_map(32, 32, (18, 18, 28, 28)) + box_map(32, 32, (2, 2, 6, 6), value=0.5)
    metric = MaxBoxAccV2()
    metric.update(cam[None], [torch.tensor([[2.0, 2.0, 6.0, 6.0]])])
    assert metric.hits.sum(1).tolist() == [499, 499, 499]
    assert metric.hits[:, :499].all() and not metric.hits[:, 499:].any()
    assert metric.compute()["MaxBoxAccV2"].item() == 1.0
    # Float thresholds (the components reading) keep the object while 0.5 > t: 500 thresholds.
    components = MaxBoxAccV2(protocol="components")
    components.update(cam[None], [torch.tensor([[2.0, 2.0, 6.0, 6.0]])])
    assert components.hits.sum(1).tolist() == [500, 500, 500]


def test_maxboxacc_v2_box_touching_the_image_border():
    # A 4 x 4 blob in the bottom-right corner of a 16 x 16 map: boundingRect (12, 12, 4, 4) gives
    # (12, 12, 16, 16), clipped to (12, 12, 15, 15): inclusive 4 x 4 = 16. Its ground truth
    # (12, 12, 16, 16) is inclusive 5 x 5 = 25, so IoU = 16 / 25 = 0.64: a hit at 0.3 and 0.5, not 0.7.
    # The same blob inside the frame, (4, 4, 8, 8), is not clipped: IoU 25 / 25 = 1.
    # BoxAcc = 1, 1, 1/2: MaxBoxAccV2 = 5/6.
    maps = torch.stack([box_map(16, 16, (12, 12, 16, 16)), box_map(16, 16, (4, 4, 8, 8))])
    gt = [torch.tensor([[12.0, 12.0, 16.0, 16.0]]), torch.tensor([[4.0, 4.0, 8.0, 8.0]])]
    metric = MaxBoxAccV2()
    metric.update(maps, gt)
    result = metric.compute()
    assert [result[f"BoxAcc@{d}"].item() for d in (0.3, 0.5, 0.7)] == [1.0, 1.0, 0.5]
    assert result["MaxBoxAccV2"].item() == pytest.approx(5 / 6)
    components = MaxBoxAccV2(protocol="components")  # no clipping, plain IoU: both exact
    components.update(maps, gt)
    assert components.compute()["MaxBoxAccV2"].item() == 1.0


def test_maxboxacc_v2_constant_map_predicts_the_box_0_0_0_0():
    # A constant map normalises to zeros: nothing exceeds any threshold, no contour, and the
    # reference's stand-in box (0, 0, 0, 0) is one pixel inclusive. Against the gt (0, 0, 1, 1)
    # (2 x 2 = 4 inclusive) its IoU is 1/4: a hit at delta 0.25, not at 0.3. A map with a NaN
    # counts as zeros too; against a gt away from the corner the stand-in box scores 0.
    corner, away = torch.tensor([[0.0, 0.0, 1.0, 1.0]]), torch.tensor([[2.0, 2.0, 6.0, 6.0]])
    metric = MaxBoxAccV2(iou_thresholds=(0.25, 0.3))
    metric.update(torch.full((1, 8, 8), 0.5), [corner])
    assert metric.hits.sum(1).tolist() == [1000, 0]
    nan_map = torch.rand(1, 8, 8)
    nan_map[0, 3, 3] = float("nan")
    metric.update(torch.cat([nan_map, torch.full((1, 8, 8), -2.0)]), [corner, away])
    result = metric.compute()
    assert result["BoxAcc@0.25"].item() == pytest.approx(2 / 3) and result["BoxAcc@0.3"].item() == 0.0


def random_scoremaps(seed: int, n: int, grid: tuple[int, int], size: tuple[int, int]):
    """Low-resolution random maps (as a model gives them) and 1 to 3 random boxes each with
    fractional coordinates, in the frame of `size`."""
    rng = np.random.default_rng(seed)
    cams = rng.random((n, *grid)).astype(np.float32)
    height, width = size
    boxes = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        x1, y1 = rng.uniform(0, width - 2, k), rng.uniform(0, height - 2, k)
        x2, y2 = rng.uniform(x1 + 1, width), rng.uniform(y1 + 1, height)
        boxes.append(torch.tensor(np.stack([x1, y1, x2, y2], axis=1), dtype=torch.float32))
    return cams, boxes


@pytest.mark.parametrize("seed, grid, size", [(0, (6, 6), (48, 48)), (1, (5, 7), (40, 56)), (2, (14, 14), (112, 112))])
def test_maxboxacc_v2_equals_wsolevaluation_on_random_maps(seed, grid, size):
    cams, boxes = random_scoremaps(seed, 24, grid, size)
    cams[3] = 0.25  # a constant map
    metric = MaxBoxAccV2()
    metric.update(resize_scoremaps(torch.from_numpy(cams), size), boxes)
    reference = wsolevaluation.BoxEvaluator()
    for cam, gt in zip(cams, boxes):
        reference.accumulate(wsolevaluation.resize_and_normalize(cam, *size), gt.tolist())
    # The per-threshold counts are integers: equal exactly; the scores to float32 rounding.
    assert metric.hits.tolist() == [reference.num_correct[d].astype(int).tolist() for d in (30, 50, 70)]
    box_acc, max_box_acc_v2 = reference.compute()
    result = metric.compute()
    assert [result[f"BoxAcc@{d}"].item() * 100 for d in (0.3, 0.5, 0.7)] == pytest.approx(box_acc, abs=1e-4)
    assert result["MaxBoxAccV2"].item() == pytest.approx(max_box_acc_v2 / 100, abs=1e-6)


def test_resize_scoremaps_is_opencv_bicubic_in_float64():
    cam = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    out = resize_scoremaps(cam[None], (4, 6))
    assert out.dtype == torch.float64 and out.shape == (1, 4, 6)
    expected = cv2.resize(cam.double().numpy(), (6, 4), interpolation=cv2.INTER_CUBIC)
    assert np.array_equal(out[0].numpy(), expected)
    assert out.min() < 0  # bicubic overshoots; the metric's normalisation takes care of it
    assert torch.equal(resize_scoremaps(cam[None], (2, 2))[0], cam.double())
    with pytest.raises(ValueError, match=r"attn must be a floating tensor of shape \(B, h, w\)"):
        resize_scoremaps(cam, (4, 4))


def test_maxboxacc_v2_threshold_grid_and_arguments():
    grid = MaxBoxAccV2().cam_thresholds
    assert torch.equal(grid, torch.from_numpy(np.arange(0, 1, 0.001))) and len(grid) == 1000
    assert MaxBoxAccV2().hits.shape == (3, 1000)
    assert len(MaxBoxAccV2(num_thresholds=100).cam_thresholds) == 100
    with pytest.raises(ValueError, match="iou_thresholds"):
        MaxBoxAccV2(iou_thresholds=(0.5, 1.5))
    with pytest.raises(ValueError, match="protocol must be one of"):
        MaxBoxAccV2(protocol="opencv")
    with pytest.raises(ValueError, match="connectivity=4 applies to protocol='components' only"):
        MaxBoxAccV2(connectivity=4)
    MaxBoxAccV2(protocol="components", connectivity=4)
    metric = MaxBoxAccV2()
    with pytest.raises(ValueError, match=r"boxes\[0\] must be xyxy with non-negative coordinates"):
        metric.update(torch.rand(1, 8, 8), [torch.tensor([[-1.0, 0.0, 4.0, 4.0]])])
    with pytest.raises(ValueError, match=r"boxes\[0\] must be xyxy"):
        metric.update(torch.rand(1, 8, 8), [torch.tensor([[4.0, 0.0, 2.0, 4.0]])])
    with pytest.raises(ValueError, match="infinite"):
        metric.update(torch.full((1, 8, 8), float("inf")), [torch.tensor([[0.0, 0.0, 4.0, 4.0]])])


def test_maxboxacc_v2_skips_images_without_boxes():
    metric = MaxBoxAccV2()
    metric.update(torch.stack([box_map(8, 8, (2, 2, 6, 6))] * 2), [torch.tensor([[2.0, 2.0, 6.0, 6.0]]), torch.zeros(0, 4)])
    assert metric.total.item() == 1 and metric.compute()["MaxBoxAccV2"].item() == 1.0


# The earlier connected-component reading, kept as protocol="components".


def nested_map() -> torch.Tensor:
    """Image A: a 2x2 core (1.0) inside a 4x4 (0.6) inside a 6x6 (0.3), top left of 8x8."""
    return torch.maximum(
        torch.maximum(box_map(8, 8, (0, 0, 6, 6), value=0.3), box_map(8, 8, (0, 0, 4, 4), value=0.6)),
        box_map(8, 8, (0, 0, 2, 2), value=1.0),
    )


def decoy_map() -> torch.Tensor:
    """Image B: a weak 3x3 (0.3) on the object, a strong 4x4 decoy (1.0) at the bottom right."""
    return box_map(8, 8, (0, 0, 3, 3), value=0.3) + box_map(8, 8, (4, 4, 8, 8), value=1.0)


GT_A = torch.tensor([[0.0, 0.0, 4.0, 4.0]])
GT_B = torch.tensor([[0.0, 0.0, 3.0, 3.0]])


def test_maxboxacc_v2_components_hand_worked():
    # CAM thresholds t = 0, 0.25, 0.5, 0.75; a location is kept when its normalised value > t.
    # Image A, gt (0, 0, 4, 4), 16 px:
    #   t = 0, 0.25: the 6x6, IoU 16/36 = 0.44;  t = 0.5: the 4x4, IoU 1;  t = 0.75: the 2x2, IoU 4/16 = 0.25.
    # Image B (fed as 2 * map + 1: min-max normalisation undoes it), gt (0, 0, 3, 3):
    #   t = 0, 0.25: two components, the object's 3x3 (IoU 1) and the decoy; all contours count,
    #   so the best IoU is 1 (the largest contour alone, the decoy, would score 0);
    #   t = 0.5, 0.75: the decoy only, IoU 0.
    # Hits over t per delta:
    #   delta 0.3: A 1 1 1 0, B 1 1 0 0 -> 2 2 1 0 -> BoxAcc 2/2 = 1
    #   delta 0.5: A 0 0 1 0, B 1 1 0 0 -> 1 1 1 0 -> BoxAcc 1/2
    #   delta 0.7: as 0.5                       -> BoxAcc 1/2
    # MaxBoxAccV2 = (1 + 1/2 + 1/2) / 3 = 2/3: no single threshold suits both images.
    metric = MaxBoxAccV2(num_thresholds=4, protocol="components")
    metric.update(torch.stack([nested_map(), 2 * decoy_map() + 1]), [GT_A, GT_B])
    assert metric.hits.tolist() == [[2, 2, 1, 0], [1, 1, 1, 0], [1, 1, 1, 0]]
    result = metric.compute()
    assert set(result) == {"MaxBoxAccV2", "BoxAcc@0.3", "BoxAcc@0.5", "BoxAcc@0.7"}
    assert result["BoxAcc@0.3"].item() == 1.0
    assert result["BoxAcc@0.5"].item() == 0.5
    assert result["BoxAcc@0.7"].item() == 0.5
    assert result["MaxBoxAccV2"].item() == pytest.approx(2 / 3)


def test_maxboxacc_v2_components_perfect_wrong_and_constant_maps():
    gt = torch.tensor([[2.0, 2.0, 6.0, 6.0]])
    metric = MaxBoxAccV2(num_thresholds=10, protocol="components")
    metric.update(box_map(8, 8, (2, 2, 6, 6))[None], [gt])
    assert metric.compute()["MaxBoxAccV2"].item() == 1.0
    metric = MaxBoxAccV2(num_thresholds=10, protocol="components")
    # A constant map normalises to zeros and predicts nothing; the other misses the object.
    metric.update(torch.stack([torch.full((8, 8), 0.5), box_map(8, 8, (6, 6, 8, 8))]), [gt, gt])
    assert metric.compute()["MaxBoxAccV2"].item() == 0.0


# ---------------------------------------------------------------- DDP-style merging


def random_batch(seed: int, n: int = 6):
    g = torch.Generator().manual_seed(seed)
    attn = torch.nn.functional.interpolate(torch.rand(n, 1, 4, 4, generator=g), size=(16, 16), mode="bilinear")[:, 0]
    xy = torch.randint(0, 8, (n, 2), generator=g).float()
    boxes = [torch.cat([p, p + 8])[None] for p in xy]
    mask = torch.zeros(n, 16, 16, dtype=torch.bool)
    for m, b in zip(mask, boxes):
        x1, y1, x2, y2 = b[0].long().tolist()
        m[y1:y2, x1:x2] = True
    return attn, boxes, mask


@pytest.mark.parametrize(
    "make, target",
    [
        (lambda: MaskIoU(mass=0.5), "mask"),
        (lambda: CorLoc(iou_threshold=0.3), "boxes"),
        (lambda: MaxBoxAccV2(), "boxes"),
        (lambda: MaxBoxAccV2(num_thresholds=20, protocol="components"), "boxes"),
    ],
)
def test_merged_halves_equal_single_instance(make, target):
    attn, boxes, mask = random_batch(0)
    gt = mask if target == "mask" else boxes
    whole = make()
    whole.update(attn, gt)
    rank0, rank1 = make(), make()
    rank0.update(attn[:4], gt[:4])
    rank1.update(attn[4:], gt[4:])
    # merge_state applies each state's dist_reduce_fx, as the sync across processes does.
    rank0.merge_state(rank1)
    expected, merged = whole.compute(), rank0.compute()
    if isinstance(expected, dict):
        assert expected.keys() == merged.keys()
        for key in expected:
            assert torch.allclose(merged[key], expected[key]), key
        assert not math.isnan(expected["MaxBoxAccV2"].item())
    else:
        assert torch.allclose(merged, expected)
