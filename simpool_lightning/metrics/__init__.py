"""Metrics: tensors in, numbers out. Imports neither models nor data.

Localization of attention maps (mask IoU, CorLoc, MaxBoxAccV2), object discovery as LOST
computes it (seed, expansion, box, and its CorLoc hit rule), k-NN voting, revisited
retrieval mAP and top-k accuracy, as functions and torchmetrics ``Metric`` classes whose state
syncs across processes. The classifier and DINO modules log them; the evaluators of
:mod:`simpool_lightning.evaluation` run models and feed them.
"""
from .accuracy import topk_accuracy, topk_values
from .discovery import DiscoveryCorLoc, LOSTResult, dino_seg_box, lost, lost_degrees, lost_iou
from .knn import KNNAccuracy, gather_features, knn_classify, knn_topk_correct
from .localization import (
    CorLoc,
    MaskIoU,
    box_iou,
    largest_component_box,
    resize_attention,
    threshold_by_mass,
    threshold_by_value,
)
from .maxboxacc import MaxBoxAccV2, resize_scoremaps
from .retrieval import PROTOCOLS, average_precision, compute_map, revisited_map

__all__ = [
    "PROTOCOLS",
    "CorLoc",
    "DiscoveryCorLoc",
    "KNNAccuracy",
    "LOSTResult",
    "MaskIoU",
    "MaxBoxAccV2",
    "average_precision",
    "box_iou",
    "compute_map",
    "dino_seg_box",
    "gather_features",
    "knn_classify",
    "knn_topk_correct",
    "largest_component_box",
    "lost",
    "lost_degrees",
    "lost_iou",
    "resize_attention",
    "resize_scoremaps",
    "revisited_map",
    "threshold_by_mass",
    "threshold_by_value",
    "topk_accuracy",
    "topk_values",
]
