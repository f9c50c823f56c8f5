"""SimPool and the paper's pooling zoo in a PyTorch Lightning experiment framework.

Layers, each importing only those below it (setup.cfg's import-linter contract, checked in CI):

- ``cli``: the ``simpool`` command (LightningCLI).
- ``interop``: builds whole models from the authors' official files and writes them back.
- ``evaluation`` | ``callbacks``: what runs a model: frozen evaluators, linear probe, k-NN
  callback | attention-map logging, prediction writing, pre-emption, per-step seeding.
- ``models``: ``PooledBackbone`` (timm model -> features -> pool), ``ImageClassifier``, ``DINO``.
- ``weights``: any checkpoint kind read into our parameter names; pure functions on dicts.
- ``data`` | ``metrics`` | ``pooling``, independent of each other: DataModules and transforms |
  metrics on tensors (torchmetrics) | the pooling registry and SimPool itself.
"""
from .pooling import SimPool, create_pool, list_pools, register_pool

__version__ = "0.1.0"

__all__ = ["SimPool", "create_pool", "list_pools", "register_pool", "__version__"]
