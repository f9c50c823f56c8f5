"""Deprecated alias of :mod:`simpool_lightning.metrics.localization`, kept for one release."""
import warnings

from ..metrics.localization import *  # noqa: F401,F403
from ..metrics.localization import __all__  # noqa: F401

warnings.warn(
    "simpool_lightning.evaluation.localization moved to simpool_lightning.metrics.localization; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
