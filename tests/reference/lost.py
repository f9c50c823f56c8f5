"""LOST's object discovery rules as its code computes them: the test oracle for
:mod:`simpool_lightning.metrics.discovery`.

Transcribed from valeoai/LOST at commit ``fcedbecb644f18358a660ce58c739cc6374feda8`` (Apache-2.0):
``object_discovery.py`` (``lost``, ``patch_scoring``, ``detect_box``, ``dino_seg``),
``datasets.py`` (``bbox_iou``, ``extract_gt_COCO``) and the hit rule of ``main_lost.py``. Inputs
keep LOST's shapes: features ``(1, N, C)``, ``dims = [rows, cols]``, ``scales = [sy, sx]``,
``init_image_size = (3, H, W)``, attentions ``(1, heads, 1 + N, 1 + N)`` with the [CLS] row first.
Written for plain reading, not speed; only the parts of LOST that decide a box or a hit are kept
(no visualisation, no GIoU variants). One change: sorts are stable (see ``patch_scoring``).
"""
from __future__ import annotations

import numpy as np
import scipy.ndimage
import torch


def patch_scoring(M: torch.Tensor, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    A = M.clone()
    A.fill_diagonal_(0)
    A[A < 0] = 0
    cent = -torch.sum(A > threshold, dim=1).type(torch.float32)
    # LOST calls argsort without stable=True, which leaves the order of equal degrees to the
    # device's sort (not index order on CPU); the one change here: ties in index order.
    sel = torch.argsort(cent, descending=True, stable=True)
    return sel, cent


def detect_box(A, seed, dims, initial_im_size=None, scales=None):
    w_featmap, h_featmap = dims
    correl = A.reshape(w_featmap, h_featmap).float()
    labeled_array, _ = scipy.ndimage.label(correl.cpu().numpy() > 0.0)
    cc = labeled_array[np.unravel_index(seed.cpu().numpy(), (w_featmap, h_featmap))]
    if cc == 0:
        raise ValueError("The seed is in the background component.")
    mask = np.where(labeled_array == cc)
    ymin, ymax = min(mask[0]), max(mask[0]) + 1
    xmin, xmax = min(mask[1]), max(mask[1]) + 1
    r_xmin, r_xmax = scales[1] * xmin, scales[1] * xmax
    r_ymin, r_ymax = scales[0] * ymin, scales[0] * ymax
    pred = [r_xmin, r_ymin, r_xmax, r_ymax]
    if initial_im_size:
        pred[2] = min(pred[2], initial_im_size[1])
        pred[3] = min(pred[3], initial_im_size[0])
    return pred, [ymin, xmin, ymax, xmax]


def lost(feats, dims, scales, init_image_size, k_patches=100):
    """Returns ``(pred, A, scores, seed, similars, M)``; LOST returns the first four."""
    A = (feats @ feats.transpose(1, 2)).squeeze()
    sorted_patches, scores = patch_scoring(A)
    seed = sorted_patches[0]
    potentials = sorted_patches[:k_patches]
    similars = potentials[A[seed, potentials] > 0.0]
    M = torch.sum(A[similars, :], dim=0)
    pred, _ = detect_box(M, seed, dims, scales=scales, initial_im_size=init_image_size[1:])
    return np.asarray(pred), A, scores, seed, similars, M


def dino_seg(attn, dims, patch_size, head=0):
    w_featmap, h_featmap = dims
    nh = attn.shape[1]
    official_th = 0.6
    attentions = attn[0, :, 0, 1:].reshape(nh, -1)
    val, idx = torch.sort(attentions, stable=True)  # stable: as in patch_scoring
    val /= torch.sum(val, dim=1, keepdim=True)
    cumval = torch.cumsum(val, dim=1)
    th_attn = cumval > (1 - official_th)
    idx2 = torch.argsort(idx)
    for h in range(nh):
        th_attn[h] = th_attn[h][idx2[h]]
    th_attn = th_attn.reshape(nh, w_featmap, h_featmap).float()
    labeled_array, _ = scipy.ndimage.label(th_attn[head].cpu().numpy())
    size_components = [np.sum(labeled_array == c) for c in range(np.max(labeled_array))]
    if len(size_components) > 1:
        biggest_component = np.argmax(size_components[1:]) + 1
    else:
        biggest_component = 0
    mask = np.where(labeled_array == biggest_component)
    ymin, ymax = min(mask[0]), max(mask[0]) + 1
    xmin, xmax = min(mask[1]), max(mask[1]) + 1
    return [xmin * patch_size, ymin * patch_size, xmax * patch_size, ymax * patch_size]


def bbox_iou(box1, box2, eps=1e-7):
    """``datasets.bbox_iou`` with ``x1y1x2y2=True`` and no GIoU / DIoU / CIoU."""
    box2 = box2.T
    b1_x1, b1_y1, b1_x2, b1_y2 = box1[0], box1[1], box1[2], box1[3]
    b2_x1, b2_y1, b2_x2, b2_y2 = box2[0], box2[1], box2[2], box2[3]
    inter = (torch.min(b1_x2, b2_x2) - torch.max(b1_x1, b2_x1)).clamp(0) * (
        torch.min(b1_y2, b2_y2) - torch.max(b1_y1, b2_y1)
    ).clamp(0)
    w1, h1 = b1_x2 - b1_x1, b1_y2 - b1_y1 + eps
    w2, h2 = b2_x2 - b2_x1, b2_y2 - b2_y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    return inter / union


def is_hit(pred: np.ndarray, gt_bbxs: np.ndarray) -> bool:
    """``main_lost.py``: ``torch.any(bbox_iou(pred, gt) >= 0.5)``."""
    ious = bbox_iou(torch.from_numpy(pred), torch.from_numpy(gt_bbxs))
    return bool(torch.any(ious >= 0.5))


def extract_gt_coco(annotations: list[dict], remove_iscrowd: bool = True) -> np.ndarray:
    """``datasets.extract_gt_COCO``: non-crowd boxes, ``[x, y, x + w, y + h]`` each rounded by Python's ``round``."""
    boxes = []
    for obj in annotations:
        if remove_iscrowd and obj["iscrowd"] == 1:
            continue
        x, y, w, h = obj["bbox"]
        boxes.append([int(round(v)) for v in (x, y, x + w, y + h)])
    return np.asarray(boxes)
