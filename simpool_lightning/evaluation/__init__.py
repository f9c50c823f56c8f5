"""Evaluation of pooled features and attention maps: localization metrics, k-NN, retrieval.

Pure metric code: every function takes tensors (attention maps, features, labels, boxes) and no model.
"""
from .knn import gather_features, knn_classify
from .localization import (
    CorLoc,
    MaskIoU,
    MaxBoxAccV2,
    box_iou,
    largest_component_box,
    resize_attention,
    threshold_by_mass,
    threshold_by_value,
)
from .retrieval import PROTOCOLS, average_precision, compute_map, revisited_map

__all__ = [
    "PROTOCOLS",
    "CorLoc",
    "MaskIoU",
    "MaxBoxAccV2",
    "average_precision",
    "box_iou",
    "compute_map",
    "gather_features",
    "knn_classify",
    "largest_component_box",
    "resize_attention",
    "revisited_map",
    "threshold_by_mass",
    "threshold_by_value",
]
