"""Deprecated alias of :mod:`simpool_lightning.metrics.localization` and :mod:`~simpool_lightning.metrics.maxboxacc`, kept for one release."""
import warnings

from ..metrics.localization import *  # noqa: F401,F403
from ..metrics.localization import __all__ as _localization_all
from ..metrics.maxboxacc import *  # noqa: F401,F403
from ..metrics.maxboxacc import __all__ as _maxboxacc_all

__all__ = [*_localization_all, *_maxboxacc_all]

warnings.warn(
    "simpool_lightning.evaluation.localization moved to simpool_lightning.metrics.localization; the old path goes in the next release",
    DeprecationWarning,
    stacklevel=2,
)
