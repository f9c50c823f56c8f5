"""SimPool and the paper's pooling zoo in a PyTorch Lightning experiment framework."""
from .pooling import SimPool, create_pool, list_pools, register_pool

__version__ = "0.1.0"

__all__ = ["SimPool", "create_pool", "list_pools", "register_pool", "__version__"]
