"""LOST's object discovery (seed, expansion, box), its DINO-seg baseline and LOST's CorLoc hit rule:
hand-worked grids, then random inputs against the transcription of LOST's code in tests/reference/lost.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from simpool_lightning.metrics.discovery import DiscoveryCorLoc, dino_seg_box, lost, lost_degrees, lost_iou
from tests.reference import lost as reference

# A 3 x 4 patch grid of 2-d features, flat index = 4 * row + col:
#    0 b   1 b   2 o   3 b
#    4 b   5 b   6 o   7 o
#    8 b   9 o  10 z  11 t
# o = (1, 0): an object (2, 6, 7) and a look-alike patch (9); b = (-1, 1): background;
# t = (1, 3): positive with every other kind; z = (-1, 2): positive with b and t, negative with o.
O, B, T, Z = (1.0, 0.0), (-1.0, 1.0), (1.0, 3.0), (-1.0, 2.0)
GRID_KINDS = "bbob" "bboo" "bozt"
FEATURES = torch.tensor([{"o": O, "b": B, "t": T, "z": Z}[k] for k in GRID_KINDS])
PATCH = (16, 16)
IMAGE = (40, 60)  # (H, W) before padding to the 48 x 64 grid


def test_lost_by_hand_seed_degrees_expansion_and_box() -> None:
    # Dot products: o.o = 1, o.b = -1, o.t = 1, o.z = -1, b.b = 2, b.t = 2, b.z = 3, t.z = 5, z.z = 5, t.t = 10.
    # Degrees (other patches with a positive dot product): o-like (2, 6, 7, 9): 3 other o + t = 4;
    # b (0, 1, 3, 4, 5, 8): 5 other b + t + z = 7; z (10): 6 b + t = 7; t (11): 4 o + 6 b + z = 11.
    result = lost(FEATURES, (3, 4), PATCH, IMAGE, k_patches=100)
    assert result.degrees.tolist() == [7, 7, 4, 7, 7, 7, 4, 4, 7, 4, 7, 11]
    # Increasing degree, ties by index: the seed is patch 2, the first object patch.
    assert result.order.tolist() == [2, 6, 7, 9, 0, 1, 3, 4, 5, 8, 10, 11]
    assert result.seed == 2
    # Expansion over all 12 patches: those with A[2, p] > 0 are the o-like ones and t.
    assert result.similars.tolist() == [2, 6, 7, 9, 11]
    # M = A summed over those rows = (4 o + t) . f = (5, 3) . f: o 5, b -2, z 1, t 14.
    assert result.scores.tolist() == [-2, -2, 5, -2, -2, -2, 5, 5, -2, 5, 1, 14]
    # M > 0 is {2, 6, 7, 9, 10, 11}, all 4-connected through 10 and 11: rows 0..2, columns 1..3, so
    # the patch box (1, 0, 4, 3), in pixels (16, 0, 64, 48), clipped to the 60 x 40 image.
    assert result.mask.nonzero().tolist() == [[0, 2], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]
    assert result.box.tolist() == [16.0, 0.0, 60.0, 40.0]


def test_lost_by_hand_k_patches_limits_the_expansion() -> None:
    # With the 4 lowest-degree patches only, t (degree 11, ranked last) is not expanded: M = 4 o . f,
    # so z gets -4 and drops out; 9 is cut off from the seed (its neighbours 5, 8 and 10 are all
    # negative) and the seed's component {2, 6, 7, 11} spans columns 2..3: (32, 0, 64, 48), clipped.
    result = lost(FEATURES, (3, 4), PATCH, IMAGE, k_patches=4)
    assert result.similars.tolist() == [2, 6, 7, 9]
    assert result.scores.tolist() == [-4, -4, 4, -4, -4, -4, 4, 4, -4, 4, -4, 4]
    assert result.mask.nonzero().tolist() == [[0, 2], [1, 2], [1, 3], [2, 3]]
    assert result.box.tolist() == [32.0, 0.0, 60.0, 40.0]


def test_lost_refuses_bad_input_and_a_zero_seed() -> None:
    with pytest.raises(ValueError, match=r"grid 3 x 3 has 9"):
        lost(FEATURES, (3, 3), PATCH, IMAGE)
    with pytest.raises(ValueError, match=r"\(N, C\)"):
        lost(FEATURES[None], (3, 4), PATCH, IMAGE)
    with pytest.raises(ValueError, match="k_patches"):
        lost(FEATURES, (3, 4), PATCH, IMAGE, k_patches=0)
    zero = FEATURES.clone()
    zero[5] = 0  # degree 0: the seed, with no positive score anywhere
    with pytest.raises(ValueError, match="seed patch 5 has no positive score"):
        lost(zero, (3, 4), PATCH, IMAGE)


def test_lost_degrees_ignore_the_diagonal_and_negatives() -> None:
    a = torch.tensor([[5.0, -1.0, 2.0], [-1.0, 3.0, 0.0], [2.0, 0.0, 1.0]])
    assert lost_degrees(a).tolist() == [1, 0, 1]


# A 3 x 4 attention map per case; DINO-seg keeps, in increasing order, locations whose normalised
# cumulative sum exceeds 0.4, labels 4-connected components in raster order and applies LOST's rule.
DINO_SEG_CASES = [
    # One component {2, 6, 7} (cumulative 0.5, 0.75, 1): the only label is 1, range(1) holds label 0
    # alone, so LOST boxes the background: all of the grid.
    ([[0, 0, 5, 0], [0, 0, 5, 5], [1, 0, 0, 4]], [0, 0, 64, 48]),
    # Kept {6, 7, 8} (the first 5 in index order stops at 5/21 < 0.4): labels {6, 7} = 1, {8} = 2;
    # range(2) = labels 0 and 1, so {6, 7}: row 1, columns 2..3.
    ([[0, 0, 5, 0], [0, 0, 5, 5], [6, 0, 0, 0]], [32, 16, 64, 32]),
    # Kept {10, 11, 0, 2} (3s at 0.15, 0.3, 0.45, 0.6, then 4s): labels {0} = 1, {2} = 2,
    # {10, 11} = 3. The largest, with the highest label, is never a candidate: {0} wins.
    ([[4, 0, 4, 0], [0, 0, 0, 0], [3, 3, 3, 3]], [0, 0, 16, 16]),
]


@pytest.mark.parametrize("values, expected", DINO_SEG_CASES)
def test_dino_seg_by_hand_follows_losts_component_rule(values: list, expected: list) -> None:
    attention = torch.tensor(values, dtype=torch.float32)
    assert dino_seg_box(attention, PATCH).tolist() == expected
    assert reference.dino_seg(_cls_attention(attention[None]), (3, 4), 16, head=0) == expected


def _cls_attention(maps: torch.Tensor) -> torch.Tensor:
    """``(heads, h, w)`` -> LOST's ``(1, heads, 1 + N, 1 + N)`` with the maps in the [CLS] row."""
    heads, n = maps.shape[0], maps[0].numel()
    attn = torch.rand(1, heads, 1 + n, 1 + n)
    attn[0, :, 0, 1:] = maps.reshape(heads, n)
    return attn


def test_lost_iou_is_losts_bbox_iou_with_its_eps() -> None:
    # Exclusive corners: (0, 0, 10, 10) against (0, 0, 10, 20) is 100 / 200 = 0.5, a hit at >= 0.5.
    assert lost_iou(torch.tensor([0, 0, 10, 10]), torch.tensor([[0, 0, 10, 20]])).item() == 0.5
    # eps matters only for tiny boxes: 1-pixel-high boxes get heights 1 + 1e-7 in float32.
    box, gt = torch.tensor([0, 0, 1, 1]), torch.tensor([[0, 0, 2, 1], [5, 5, 6, 6]])
    ours = lost_iou(box, gt)
    theirs = reference.bbox_iou(box, gt)
    assert ours.dtype == torch.float32 and torch.equal(ours, theirs)
    assert ours[0].item() < 0.5 and ours[1].item() == 0.0


@pytest.mark.parametrize("seed", range(6))
def test_lost_equals_the_reference_on_random_keys(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    h, w, c = (14, 14, 64) if seed % 2 else (9, 17, 48)
    # Keys with a shared direction, as trained keys have, so that degrees spread and ties are rare.
    feats = torch.randn(h * w, c, generator=g) + 0.3 * torch.randn(1, c, generator=g)
    image = (h * 16 - seed, w * 16 - 2 * seed)
    for k in (100, 7):
        ours = lost(feats, (h, w), PATCH, image, k_patches=k)
        pred, _, scores, seed_patch, similars, m = reference.lost(feats[None], [h, w], [16, 16], (3, *image), k_patches=k)
        assert ours.seed == int(seed_patch)
        assert torch.equal(ours.degrees, (-scores).long())
        assert torch.equal(ours.similars, similars)
        assert torch.equal(ours.scores, m)
        assert ours.box.tolist() == pred.tolist()


@pytest.mark.parametrize("seed", range(6))
def test_dino_seg_equals_the_reference_on_random_maps(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    heads, h, w = 3, 12, 15
    # Blobs of different sharpness, so that 1, 2 or more components are kept.
    maps = torch.rand(heads, h, w, generator=g) ** (2 + 4 * torch.rand(heads, 1, 1, generator=g))
    attn = _cls_attention(maps)
    for head in range(heads):
        assert dino_seg_box(maps[head], PATCH).tolist() == reference.dino_seg(attn, (h, w), 16, head=head)


def test_corloc_counts_losts_hits_and_skips_images_without_boxes() -> None:
    g = torch.Generator().manual_seed(0)
    gts = []
    for i in range(40):
        c = torch.randint(0, 60, (int(i % 4), 2, 2), generator=g).sort(dim=1).values
        gts.append(torch.cat([c[:, 0], c[:, 1] + 1], dim=1))
    # Predictions: the last ground-truth box moved by up to 6 pixels per corner, so some hit and some miss.
    preds = torch.stack([gt[-1] if len(gt) else torch.tensor([0, 0, 10, 10]) for gt in gts])
    preds = preds + torch.randint(-6, 7, preds.shape, generator=g)
    metric = DiscoveryCorLoc()
    metric.update(preds[:25], gts[:25])
    metric.update(preds[25:], gts[25:])
    scored = [i for i in range(40) if len(gts[i])]
    hits = [reference.is_hit(preds[i].numpy(), gts[i].numpy()) for i in scored]
    assert metric.total.item() == len(scored) == 30
    assert metric.correct.item() == sum(hits) and 0 < sum(hits) < 30
    assert metric.compute().item() == pytest.approx(sum(hits) / 30)
    with pytest.raises(ValueError, match=r"gt_boxes\[1\] must have shape \(K, 4\)"):
        metric.update(preds[:2], [gts[1], torch.zeros(3)])
    with pytest.raises(ValueError, match="one \\(K, 4\\) tensor per image"):
        metric.update(preds[:2], gts[:3])


def test_reference_extract_gt_coco_rounds_half_to_even() -> None:
    # LOST rounds x, y, x + w, y + h with Python's round: 2.5 -> 2, 3.5 -> 4.
    anns = [{"bbox": [2.5, 3.5, 10.0, 1.0], "iscrowd": 0}, {"bbox": [0, 0, 5, 5], "iscrowd": 1}]
    assert reference.extract_gt_coco(anns).tolist() == [[2, 4, 12, 4]]
    assert np.asarray(torch.tensor([2.5, 3.5, 12.5, 4.5]).round()).tolist() == [2.0, 4.0, 12.0, 4.0]
