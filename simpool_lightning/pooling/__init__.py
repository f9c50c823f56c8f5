"""The pooling zoo: every method the paper compares, behind one registry."""
from .base import Pool, to_tokens
from .registry import create_pool, is_pool, list_pools, register_pool

# Importing a family module registers its pools.
from .avgmax import AvgMaxPool, AvgPool, CatAvgMaxPool, MaxPool
from .simpool import SimPool
from .cait import CaiTPool
from .cbam import CBAMPool
from .ge import GatherExcitePool
from .gem import GeMPool
from .how import HOWPool
from .lse import LSEPool
from .otk import OTKPool
from .se import SEPool
from .slot import SlotPool
from .vit import ViTPool
