"""Deprecated alias of :mod:`simpool_lightning.metrics.retrieval`, kept for one release."""
import warnings

from ..metrics.retrieval import *  # noqa: F401,F403
from ..metrics.retrieval import __all__  # noqa: F401

warnings.warn(
    "simpool_lightning.evaluation.retrieval moved to simpool_lightning.metrics.retrieval; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
