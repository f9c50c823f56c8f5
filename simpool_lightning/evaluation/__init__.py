"""Evaluation of pooled features and attention maps: localization metrics, k-NN, retrieval, linear probes.

The metric code takes tensors (attention maps, features, labels, boxes) and no model;
``KNNEvaluator`` and ``LinearProbe`` are LightningModules that run a frozen model's ``features`` through it.
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
from .frozen import FrozenEvaluator, FrozenFeatures, load_feature_model
from .knn_eval import KNNCallback, KNNEvaluator, extract_features, reference_split
from .linear import LinearProbe
from .localization_eval import LocalizationEvaluator
from .retrieval_eval import MULTISCALE, RetrievalEvaluator
from .robustness import BackgroundRobustnessEvaluator

__all__ = [
    "MULTISCALE",
    "PROTOCOLS",
    "BackgroundRobustnessEvaluator",
    "CorLoc",
    "FrozenEvaluator",
    "FrozenFeatures",
    "KNNCallback",
    "KNNEvaluator",
    "LinearProbe",
    "LocalizationEvaluator",
    "MaskIoU",
    "MaxBoxAccV2",
    "RetrievalEvaluator",
    "average_precision",
    "box_iou",
    "compute_map",
    "extract_features",
    "gather_features",
    "knn_classify",
    "largest_component_box",
    "load_feature_model",
    "reference_split",
    "resize_attention",
    "revisited_map",
    "threshold_by_mass",
    "threshold_by_value",
]
