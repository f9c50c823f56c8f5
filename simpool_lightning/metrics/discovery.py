"""Unsupervised single-object discovery as LOST computes it, and CorLoc as LOST scores it.

Follows valeoai/LOST at commit ``fcedbecb644f18358a660ce58c739cc6374feda8`` (Siméoni et al.,
"Localizing Objects with Self-Supervised Transformers and no Labels", BMVC 2021), the code behind
the SimPool paper's Table 6 (Sec. 4.3, "Unsupervised object discovery"; protocol in Sec. 4.1,
"Downstream tasks"):

- :func:`lost` is ``object_discovery.lost`` with ``patch_scoring`` and ``detect_box``: the
  similarity graph of the patch features ``A = F F^T``; the seed is the patch of lowest degree
  (fewest *other* patches with ``A > 0``); the expansion sums the rows of ``A`` over the
  ``k_patches`` lowest-degree patches that have ``A > 0`` with the seed; the box is that of the
  4-connected component of ``sum > 0`` that holds the seed (``scipy.ndimage.label``'s default
  structure), in patch units ``(x0, y0, x1 + 1, y1 + 1)``, times the patch size, with ``x2`` and
  ``y2`` clipped to the unpadded image (LOST pads images to a multiple of the patch size).
- :func:`dino_seg_box` is ``object_discovery.dino_seg``, LOST's "DINO-seg" baseline (the paper's
  other column): keep the locations that hold the top ``mass`` (0.6) of the map, label 4-connected
  components, box the largest, times the patch size, no clipping. It keeps LOST's selection rule
  exactly, including two quirks of that code: the component with the highest label is never a
  candidate, and when at most one component is a candidate the box is that of label 0, the
  *background* (the locations left out). The paper's DINO-seg numbers were produced by that rule.
- :func:`lost_iou` is ``datasets.bbox_iou`` (from YOLOv5): exclusive corners (no ``+ 1``),
  ``eps = 1e-7`` added to the heights and to the union, computed in float32 as LOST does with its
  integer boxes; :class:`DiscoveryCorLoc` counts an image as found when that IoU is ``>= 0.5``
  with *any* ground-truth box (``main_lost.py``).

Deliberate differences: ties in degree (seed choice, expansion order) and in attention (DINO-seg's
cut) go to the lowest patch index (a stable sort; LOST's ``argsort`` leaves tie order to the
device's sort, which is the same on CPU); an empty ground truth is skipped instead of crashing.
Features and maps are handled one image at a time, as LOST does, so each similarity matrix is
the same float32 product.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "DiscoveryCorLoc",
    "LOSTResult",
    "dino_seg_box",
    "lost",
    "lost_degrees",
    "lost_iou",
]

LOST_EPS = 1e-7  # datasets.bbox_iou's eps


def _describe(x: object) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_grid(grid: Sequence[int], num: int, what: str) -> tuple[int, int]:
    h, w = (int(v) for v in grid)
    if h * w != num:
        raise ValueError(f"{what} has {num} locations, but the grid {h} x {w} has {h * w}")
    return h, w


def _scaled_box(extent: tuple[int, int, int, int], scale: Sequence[float]) -> Tensor:
    """Patch-unit ``(x0, y0, x1, y1)`` times ``scale = (sy, sx)``, as LOST's ``scales[1] * xmin`` ..."""
    x0, y0, x1, y1 = extent
    sy, sx = scale
    return torch.tensor([sx * x0, sy * y0, sx * x1, sy * y1], dtype=torch.float64)


def _extent(where: np.ndarray) -> tuple[int, int, int, int]:
    """Box ``(xmin, ymin, xmax + 1, ymax + 1)`` of the true locations of a ``(h, w)`` mask."""
    rows, cols = np.nonzero(where)
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


def lost_degrees(similarity: Tensor) -> Tensor:
    """LOST's ``patch_scoring``: for each patch, how many *other* patches have positive similarity.

    Args:
        similarity: ``(N, N)`` matrix ``A = F F^T``.

    Returns:
        ``(N,)`` int64 degrees; LOST ranks patches by increasing degree.
    """
    a = similarity.clone()
    a.fill_diagonal_(0)
    return (a > 0).sum(dim=1)


@dataclass
class LOSTResult:
    """What :func:`lost` finds in one image.

    Attributes:
        box: ``(4,)`` float64 ``(x1, y1, x2, y2)`` in pixels (LOST's ``pred``).
        seed: flat index of the seed patch (row-major on the grid).
        degrees: ``(N,)`` degree of every patch.
        order: ``(N,)`` patches by increasing degree (ties: lower index first).
        similars: the expanded set: patches among the first ``k_patches`` of ``order`` with ``A > 0``
            to the seed (the seed included), in that order.
        scores: ``(N,)`` float32 sum of ``A``'s rows over ``similars`` (LOST's ``M``).
        mask: ``(h, w)`` bool, the seed's 4-connected component of ``scores > 0``.
    """

    box: Tensor
    seed: int
    degrees: Tensor
    order: Tensor
    similars: Tensor
    scores: Tensor
    mask: Tensor


def lost(
    features: Tensor,
    grid: Sequence[int],
    patch_size: Sequence[float],
    image_size: Sequence[int],
    k_patches: int = 100,
) -> LOSTResult:
    """LOST on one image: seed, expansion, and the box of the seed's component.

    Args:
        features: ``(N, C)`` patch features in row-major grid order (LOST: the last block's keys,
            [CLS] removed); cast to float32, as LOST computes.
        grid: ``(h, w)`` patches, ``h * w == N``.
        patch_size: ``(sy, sx)`` pixels per patch (LOST's ``scales``).
        image_size: ``(H, W)`` of the image before padding to whole patches; the box's ``x2`` /
            ``y2`` are clipped to it.
        k_patches: how many lowest-degree patches the expansion considers (LOST: 100).

    Raises:
        ValueError: bad shapes, ``k_patches < 1``, or a seed outside ``scores > 0`` (a seed whose
            feature is zero; LOST raises there too).
    """
    if not isinstance(features, Tensor) or features.dim() != 2 or not features.is_floating_point():
        raise ValueError(f"features must be a floating tensor of shape (N, C), got {_describe(features)}")
    if k_patches < 1:
        raise ValueError(f"k_patches must be a positive int, got {k_patches}")
    h, w = _check_grid(grid, features.shape[0], "features")
    feats = features.detach().float()[None]
    similarity = (feats @ feats.transpose(1, 2)).squeeze(0)
    degrees = lost_degrees(similarity)
    # Sorting the negated degree in descending order is LOST's own formulation; stable so that
    # ties go to the lower patch index on every device.
    order = torch.sort(-degrees.float(), descending=True, stable=True).indices
    seed = int(order[0])
    potentials = order[:k_patches]
    similars = potentials[similarity[seed, potentials] > 0.0]
    scores = torch.sum(similarity[similars, :], dim=0)

    labels, _ = ndimage.label(scores.reshape(h, w).cpu().numpy() > 0.0)
    component = labels[seed // w, seed % w]
    if component == 0:
        raise ValueError(f"LOST: the seed patch {seed} has no positive score (its feature is zero); no box")
    mask = labels == component
    box = _scaled_box(_extent(mask), patch_size)
    height, width = (int(v) for v in image_size)
    box[2] = min(box[2].item(), width)
    box[3] = min(box[3].item(), height)
    return LOSTResult(box, seed, degrees, order, similars, scores, torch.from_numpy(mask))


def dino_seg_box(attention: Tensor, patch_size: Sequence[float], mass: float = 0.6) -> Tensor:
    """LOST's DINO-seg baseline on one attention map: the box of its "largest" component.

    Args:
        attention: ``(h, w)`` non-negative map on the patch grid (LOST: one head of the last
            block's [CLS] attention; here any pooling's attention).
        patch_size: ``(sy, sx)`` pixels per patch.
        mass: attention mass kept (LOST, after DINO: 0.6): sorted increasingly, a location is kept
            when the normalised cumulative sum up to it exceeds ``1 - mass``.

    Returns:
        ``(4,)`` float64 box ``(x1, y1, x2, y2)`` in pixels (see the module docstring for LOST's
        choice of component, which this reproduces).

    Raises:
        ValueError: not an ``(h, w)`` floating map, or ``mass`` outside ``(0, 1]``, or a map whose
            chosen component is empty (every location kept, so no background to box).
    """
    if not isinstance(attention, Tensor) or attention.dim() != 2 or not attention.is_floating_point():
        raise ValueError(f"attention must be a floating tensor of shape (h, w), got {_describe(attention)}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    h, w = attention.shape
    values, index = torch.sort(attention.detach().reshape(1, -1).float(), stable=True)
    values = values / torch.sum(values, dim=1, keepdim=True)
    kept_sorted = torch.cumsum(values, dim=1) > (1 - mass)
    kept = kept_sorted[0][torch.argsort(index[0])].reshape(h, w)

    labels, _ = ndimage.label(kept.cpu().numpy())
    # LOST's rule: sizes of labels 0 .. max - 1 only; the largest of labels 1 .. max - 1, or label 0
    # (the background) when that range is empty.
    sizes = [int(np.sum(labels == c)) for c in range(int(labels.max()))]
    chosen = int(np.argmax(sizes[1:])) + 1 if len(sizes) > 1 else 0
    where = labels == chosen
    if not where.any():
        raise ValueError("DINO-seg: the component LOST's rule picks is empty (the whole map was kept)")
    return _scaled_box(_extent(where), patch_size)


def lost_iou(box: Tensor, boxes: Tensor) -> Tensor:
    """IoU of one box with ``K`` boxes as LOST's ``bbox_iou`` computes it.

    Exclusive corners ``(x1, y1, x2, y2)``; intersection sides clamped at 0; ``eps = 1e-7`` added to
    each height and to the union; float32 throughout (LOST's integer boxes meet ``eps`` in float32).

    Args:
        box: ``(4,)``.
        boxes: ``(K, 4)``.

    Returns:
        ``(K,)`` float32.
    """
    b1 = torch.as_tensor(box).float().cpu()
    b2 = torch.as_tensor(boxes).float().cpu()
    if b1.shape != (4,) or b2.dim() != 2 or b2.shape[1] != 4:
        raise ValueError(f"lost_iou needs a (4,) box and (K, 4) boxes, got {tuple(b1.shape)} and {tuple(b2.shape)}")
    x1, y1, x2, y2 = b1.unbind()
    gx1, gy1, gx2, gy2 = b2.unbind(1)
    inter = (torch.minimum(x2, gx2) - torch.maximum(x1, gx1)).clamp(0) * (
        torch.minimum(y2, gy2) - torch.maximum(y1, gy1)
    ).clamp(0)
    w1, h1 = x2 - x1, y2 - y1 + LOST_EPS
    w2, h2 = gx2 - gx1, gy2 - gy1 + LOST_EPS
    union = w1 * h1 + w2 * h2 - inter + LOST_EPS
    return inter / union


class DiscoveryCorLoc(Metric):
    """CorLoc of one predicted box per image, counted as LOST's ``main_lost.py`` counts it.

    An image is found when :func:`lost_iou` of its box with some ground-truth box is
    ``>= iou_threshold``; CorLoc is found / scored. Images without ground-truth boxes are not scored
    (LOST would stop with an error there). States are sums, synchronised across DDP processes.

    Args:
        iou_threshold: LOST: 0.5.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, iou_threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        self.iou_threshold = iou_threshold
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, boxes: Tensor, gt_boxes: Sequence[Tensor]) -> None:
        """Accumulate a batch.

        Args:
            boxes: ``(B, 4)`` predicted xyxy pixel boxes, one per image.
            gt_boxes: ``B`` tensors ``(K, 4)``, xyxy in the same frame.
        """
        boxes = torch.as_tensor(boxes)
        if boxes.dim() != 2 or boxes.shape[1] != 4:
            raise ValueError(f"boxes must have shape (B, 4), got {tuple(boxes.shape)}")
        if len(gt_boxes) != boxes.shape[0]:
            raise ValueError(f"gt_boxes must hold one (K, 4) tensor per image: {boxes.shape[0]} boxes, {len(gt_boxes)} entries")
        correct = total = 0
        for i, (box, gt) in enumerate(zip(boxes, gt_boxes)):
            gt = torch.as_tensor(gt)
            if gt.dim() != 2 or gt.shape[1] != 4:
                raise ValueError(f"gt_boxes[{i}] must have shape (K, 4) in xyxy pixels, got {tuple(gt.shape)}")
            if gt.shape[0] == 0:
                continue
            total += 1
            correct += int(bool((lost_iou(box, gt) >= self.iou_threshold).any()))
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        """Fraction of scored images found, in ``[0, 1]`` (a float32 scalar)."""
        return self.correct.float() / self.total
