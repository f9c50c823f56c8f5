"""Top-1 / top-5 accuracy as one torchmetrics collection, as every classifier here logs it."""
from __future__ import annotations

from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

__all__ = ["topk_accuracy"]


def topk_accuracy(num_classes: int, prefix: str) -> MetricCollection:
    """``{prefix}acc1`` and ``{prefix}acc5`` (``acc{num_classes}`` when there are fewer than 5 classes)."""
    top5 = min(5, num_classes)
    return MetricCollection(
        {
            "acc1": MulticlassAccuracy(num_classes, top_k=1, average="micro"),
            f"acc{top5}": MulticlassAccuracy(num_classes, top_k=top5, average="micro"),
        },
        prefix=prefix,
        compute_groups=False,
    )
