"""Deprecated alias of :mod:`simpool_lightning.metrics.accuracy`, kept for one release."""
import warnings

from ..metrics.accuracy import *  # noqa: F401,F403
from ..metrics.accuracy import __all__  # noqa: F401

warnings.warn(
    "simpool_lightning.evaluation.accuracy moved to simpool_lightning.metrics.accuracy; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
