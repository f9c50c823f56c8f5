"""Deprecated alias of :mod:`simpool_lightning.metrics.knn`, kept for one release."""
import warnings

from ..metrics.knn import *  # noqa: F401,F403
from ..metrics.knn import __all__  # noqa: F401

warnings.warn(
    "simpool_lightning.evaluation.knn moved to simpool_lightning.metrics.knn; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
