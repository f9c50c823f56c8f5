"""Weights: any checkpoint kind read into our parameter names. Pure functions on dicts; no model is built.

- :mod:`.io`: reading a file (``torch.load`` with ``weights_only``, safetensors).
- :mod:`.official`: the authors' supervised and DINO layouts, renamed both ways, and what their
  keys and args tell of the architecture.
- :mod:`.pos_embed`: the DINO fork's SimPool-mode ViT resamples its position embedding at every
  forward; the import does it once.
- :mod:`.pretrained`: what ``pretrained_path`` accepts (our Lightning checkpoints, official files,
  plain timm files) as a backbone state under ``PooledBackbone``'s names.
- :mod:`.errors`: the one :class:`WeightsMismatchError` for keys or shapes that do not fit.

Models load what this layer returns; :mod:`simpool_lightning.interop` builds whole models on it.
"""
from .errors import WeightsMismatchError, check_fits
from .io import StateDict, read_file, strip_prefix
from .official import OfficialCheckpoint, parse_official
from .pretrained import PretrainedWeights, read_pretrained

__all__ = [
    "OfficialCheckpoint",
    "PretrainedWeights",
    "StateDict",
    "WeightsMismatchError",
    "check_fits",
    "parse_official",
    "read_file",
    "read_pretrained",
    "strip_prefix",
]
