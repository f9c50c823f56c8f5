"""Localization quality of attention maps: mask IoU (Jaccard) and CorLoc, and the thresholding they share.

Box convention, used for predicted and ground-truth boxes alike: ``(x1, y1, x2, y2)`` in pixel
units with the pixel in row ``i``, column ``j`` covering ``[j, j + 1) x [i, i + 1)``. A connected
component spanning columns ``x0 .. x1`` and rows ``y0 .. y1`` (inclusive) therefore has the box
``(x0, y0, x1 + 1, y1 + 1)``, and box areas are plain ``(x2 - x1) * (y2 - y1)`` as in
:func:`torchvision.ops.box_iou`. Pascal VOC's 1-based inclusive ``(xmin, ymin, xmax, ymax)`` is
``(xmin - 1, ymin - 1, xmax, ymax)`` here.

MaxBoxAccV2, which follows wsolevaluation's own conventions (inclusive boxes, OpenCV contours), is
in :mod:`.maxboxacc`. CorLoc's components are 8-connected by default
(``connectivity=8``); 4 is available.

Every metric keeps sums as states with ``dist_reduce_fx="sum"``, so torchmetrics synchronises them
across DDP processes and :meth:`torchmetrics.Metric.merge_state` merges them.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import Tensor
from torchmetrics import Metric
from torchvision.ops import box_iou

__all__ = [
    "CorLoc",
    "MaskIoU",
    "box_iou",
    "largest_component_box",
    "resize_attention",
    "threshold_by_mass",
    "threshold_by_value",
]

_MODES = ("mass", "value")


def _describe(x: object) -> str:
    return f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__


def _check_maps(attn: Tensor) -> None:
    if not isinstance(attn, Tensor) or attn.dim() != 3 or not attn.is_floating_point():
        raise ValueError(f"attn must be a floating tensor of shape (B, h, w), got {_describe(attn)}")


def resize_attention(attn: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinearly resize attention maps ``(B, h, w)`` to ``(B, *size)`` (float32).

    ``align_corners=False``, as in DINO's and LOST's upsampling of patch attention.
    """
    _check_maps(attn)
    attn = attn.float()
    if tuple(attn.shape[-2:]) == tuple(size):
        return attn
    return F.interpolate(attn[:, None], size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def threshold_by_mass(attn: Tensor, mass: float = 0.6) -> Tensor:
    """Keep the highest-attention locations that together hold ``mass`` of each map's total.

    As in DINO's attention visualisation: locations are taken in decreasing attention until their
    sum reaches ``mass`` times the map's sum. Ties are kept together: every location whose value
    equals the last one needed is kept, so the result does not depend on the sort order (and may
    hold a little more than the minimal set). A map that sums to zero gives an empty mask.

    Args:
        attn: non-negative maps ``(B, h, w)``; they need not be normalised.
        mass: fraction of the total attention to keep, in ``(0, 1]``.

    Returns:
        Boolean masks ``(B, h, w)``.
    """
    _check_maps(attn)
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if (attn < 0).any():
        raise ValueError("attn must be non-negative for thresholding by mass")
    flat = attn.flatten(1).double()  # float64: the cumulative sum decides ties at the cut
    values, _ = flat.sort(dim=1, descending=True)
    cumulative = values.cumsum(dim=1)
    # The total is the last cumulative sum, not a separate sum, so that locations of zero attention
    # after it see exactly `mass_before == 1` and are never needed, even with mass == 1.
    total = cumulative[:, -1:]
    mass_before = (cumulative - values) / total.clamp_min(torch.finfo(values.dtype).tiny)
    # A location is needed while the mass of the locations ranked above it is still short of `mass`.
    num_needed = (mass_before < mass).sum(dim=1, keepdim=True)
    cut = values.gather(1, num_needed - 1)
    keep = (flat >= cut) & (total > 0)
    return keep.view_as(attn)


def threshold_by_value(attn: Tensor, threshold: float) -> Tensor:
    """Keep the locations whose attention is at least ``threshold`` times the map's maximum.

    ``attn >= threshold * attn.amax()`` per map; the threshold is relative, so maps of any scale
    compare alike. A map with no positive value gives an empty mask.

    Args:
        attn: maps ``(B, h, w)``.
        threshold: fraction of the per-map maximum, in ``[0, 1]``.

    Returns:
        Boolean masks ``(B, h, w)``.
    """
    _check_maps(attn)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    peak = attn.flatten(1).amax(dim=1)[:, None, None]
    return (attn >= threshold * peak) & (peak > 0)


def _structure(connectivity: int) -> np.ndarray:
    """A 3-d structuring element that links pixels within a 2-d slice only, never across slices."""
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1 if connectivity == 4 else 2)
    return structure


def _label(masks: np.ndarray, connectivity: int) -> tuple[np.ndarray, Tensor, Tensor]:
    """Connected components of a stack of masks, labelled in one scipy call.

    Args:
        masks: boolean ``(N, h, w)``.
        connectivity: 4 or 8.

    Returns:
        ``(labels, index, boxes)``: labels ``(N, h, w)`` (0 for background, component ``p`` is
        ``p + 1``), the mask each component belongs to ``(P,)`` (int64) and its box ``(P, 4)``
        (float32, see the module's box convention); components are ordered by mask, then by
        raster order of their first pixel.
    """
    labels, num = ndimage.label(masks, structure=_structure(connectivity))
    extents = np.array(
        [(s[0].start, s[2].start, s[1].start, s[2].stop, s[1].stop) for s in ndimage.find_objects(labels)],
        dtype=np.int64,
    ).reshape(num, 5)
    return labels, torch.from_numpy(extents[:, 0]), torch.from_numpy(extents[:, 1:]).float()


def _largest_boxes(masks: np.ndarray, connectivity: int) -> list[Optional[Tensor]]:
    """Box ``(4,)`` of the largest component of each mask in ``(N, h, w)``, ``None`` for an empty mask."""
    labels, index, boxes = _label(masks, connectivity)
    sizes = torch.from_numpy(np.bincount(labels.ravel(), minlength=len(index) + 1)[1:])
    out: list[Optional[Tensor]] = [None] * masks.shape[0]
    for n in index.unique().tolist():
        (members,) = (index == n).nonzero(as_tuple=True)
        # argmax takes the first of equal sizes: ties go to the component met first in raster order.
        out[n] = boxes[members[sizes[members].argmax()]]
    return out


def largest_component_box(mask: Tensor, connectivity: int = 8) -> Optional[Tensor]:
    """Box of the largest connected component of a mask.

    Args:
        mask: boolean ``(h, w)``.
        connectivity: 8 (default, diagonal neighbours connect) or 4.

    Returns:
        float32 ``(4,)`` box ``(x1, y1, x2, y2)`` (see the module's box convention), or ``None``
        when the mask is empty. Of equally large components, the one whose first pixel comes first
        in raster order wins.
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool tensor of shape (h, w), got {_describe(mask)}")
    return _largest_boxes(mask[None].cpu().numpy(), connectivity)[0]


def _binarize(attn: Tensor, mode: str, mass: float, threshold: float) -> Tensor:
    return threshold_by_mass(attn, mass) if mode == "mass" else threshold_by_value(attn, threshold)


def _check_threshold_args(mode: str, mass: float, threshold: float) -> None:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")


def _check_boxes(attn: Tensor, boxes: Sequence[Tensor]) -> list[Tensor]:
    """Validate ground-truth boxes against maps ``(B, h, w)``; return them as float32 CPU tensors."""
    _check_maps(attn)
    if len(boxes) != attn.shape[0]:
        raise ValueError(
            f"boxes must hold one (K, 4) tensor per image: attn has batch size {attn.shape[0]}, "
            f"boxes has {len(boxes)} entries"
        )
    out = []
    for i, b in enumerate(boxes):
        b = torch.as_tensor(b)
        if b.dim() != 2 or b.shape[1] != 4:
            raise ValueError(f"boxes[{i}] must have shape (K, 4) in xyxy pixel coordinates, got {tuple(b.shape)}")
        out.append(b.detach().float().cpu())
    return out


class MaskIoU(Metric):
    """Jaccard index between thresholded attention maps and ground-truth foreground masks.

    Each map is binarised (by mass or by relative value, see :func:`threshold_by_mass` and
    :func:`threshold_by_value`), the IoU with its mask is computed per image, and the result is the
    mean over images (not the IoU of the pooled pixel counts). An image where both the prediction
    and the mask are empty scores 1.

    Args:
        mode: ``"mass"`` keeps ``mass`` of the attention; ``"value"`` keeps locations at or above
            ``threshold`` times the map's maximum.
        mass: used when ``mode == "mass"``, in ``(0, 1]``.
        threshold: used when ``mode == "value"``, in ``[0, 1]``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    iou_sum: Tensor
    total: Tensor

    def __init__(self, mode: str = "mass", mass: float = 0.6, threshold: float = 0.5, **kwargs) -> None:
        super().__init__(**kwargs)
        _check_threshold_args(mode, mass, threshold)
        self.mode, self.mass, self.threshold = mode, mass, threshold
        self.add_state("iou_sum", default=torch.tensor(0.0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, attn: Tensor, mask: Tensor) -> None:
        """Accumulate a batch.

        Args:
            attn: attention maps ``(B, h, w)``; resized bilinearly to ``(H, W)`` when they differ.
            mask: ground-truth foreground, bool ``(B, H, W)``.
        """
        _check_maps(attn)
        if not isinstance(mask, Tensor) or mask.dim() != 3 or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor of shape (B, H, W), got {_describe(mask)}")
        if attn.shape[0] != mask.shape[0]:
            raise ValueError(
                f"attn (B, h, w) and mask (B, H, W) must have the same batch size, "
                f"got {tuple(attn.shape)} and {tuple(mask.shape)}"
            )
        pred = _binarize(resize_attention(attn, tuple(mask.shape[-2:])), self.mode, self.mass, self.threshold)
        mask = mask.to(pred.device)
        inter = (pred & mask).flatten(1).sum(1)
        union = (pred | mask).flatten(1).sum(1)
        iou = torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(inter, dtype=torch.float))
        self.iou_sum += iou.sum().to(self.iou_sum)
        self.total += iou.numel()

    def compute(self) -> Tensor:
        """Mean per-image IoU in ``[0, 1]`` (a float32 scalar)."""
        return self.iou_sum / self.total


class CorLoc(Metric):
    """Correct localization: the fraction of images whose predicted box hits a ground-truth box.

    As in object discovery (LOST and its successors): the predicted box is the box of the largest
    connected component of the thresholded attention map, and an image is correct when its IoU with
    *any* ground-truth box is at least ``iou_threshold``. An empty thresholded map predicts no box
    and counts as wrong; images without ground-truth boxes are skipped (not counted), as LOST skips
    them.

    Args:
        iou_threshold: IoU needed for a hit, in ``(0, 1]``.
        mode, mass, threshold: how maps are binarised, as in :class:`MaskIoU`.
        connectivity: 8 or 4, for the connected components.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(
        self,
        iou_threshold: float = 0.5,
        mode: str = "mass",
        mass: float = 0.6,
        threshold: float = 0.5,
        connectivity: int = 8,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_threshold_args(mode, mass, threshold)
        if not 0.0 < iou_threshold <= 1.0:
            raise ValueError(f"iou_threshold must be in (0, 1], got {iou_threshold}")
        _structure(connectivity)
        self.iou_threshold, self.mode, self.mass, self.threshold = iou_threshold, mode, mass, threshold
        self.connectivity = connectivity
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, attn: Tensor, boxes: Sequence[Tensor]) -> None:
        """Accumulate a batch.

        Args:
            attn: attention maps ``(B, H, W)`` at the resolution the boxes are given in (see
                :func:`resize_attention`).
            boxes: ``B`` ground-truth tensors ``(K, 4)``, xyxy in pixels of ``attn``.
        """
        gt = _check_boxes(attn, boxes)
        masks = _binarize(attn.float(), self.mode, self.mass, self.threshold).cpu().numpy()
        correct = total = 0
        for pred, gt_boxes in zip(_largest_boxes(masks, self.connectivity), gt):
            if gt_boxes.shape[0] == 0:
                continue
            total += 1
            correct += int(pred is not None and bool((box_iou(pred[None], gt_boxes) >= self.iou_threshold).any()))
        self.correct += correct
        self.total += total

    def compute(self) -> Tensor:
        """Fraction of correct images in ``[0, 1]`` (a float32 scalar)."""
        return self.correct.float() / self.total
