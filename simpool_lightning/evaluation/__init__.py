"""Evaluators: LightningModules and callbacks that load or run a model and feed its features or
attention maps to :mod:`simpool_lightning.metrics`.

``FrozenEvaluator`` subclasses (k-NN, localization, object discovery, background robustness,
retrieval) run under ``simpool validate|test``; ``LinearProbe`` trains a linear head on frozen
features; ``KNNCallback`` runs k-NN during a fit. The metric names are re-exported here, where they
lived before, for one release: import them from :mod:`simpool_lightning.metrics`.
"""
from ..metrics import (
    CorLoc,
    MaskIoU,
    MaxBoxAccV2,
    box_iou,
    largest_component_box,
    resize_attention,
    threshold_by_mass,
    threshold_by_value,
    PROTOCOLS,
    average_precision,
    compute_map,
    gather_features,
    knn_classify,
    revisited_map,
)
from .discovery_eval import DISCOVERY_METHODS, DiscoveryEvaluator
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
    "DISCOVERY_METHODS",
    "DiscoveryEvaluator",
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
