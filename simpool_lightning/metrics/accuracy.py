"""Top-1 / top-5 accuracy, as every classifier and k-NN evaluation here logs it."""
from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["topk_accuracy", "topk_values"]


def topk_values(num_classes: int) -> tuple[int, ...]:
    """The ``k`` of the top-k accuracies worth logging: 1 and 5, or 1 alone for at most 5 classes
    (where top-5 is 1.0 by construction and says nothing)."""
    return (1, 5) if num_classes > 5 else (1,)


def topk_accuracy(num_classes: int, prefix: str) -> MetricCollection:
    """``{prefix}acc1`` and, with more than 5 classes, ``{prefix}acc5``."""
    return MetricCollection(
        {f"acc{k}": MulticlassAccuracy(num_classes, top_k=k, average="micro") for k in topk_values(num_classes)},
        prefix=prefix,
        compute_groups=False,
    )
