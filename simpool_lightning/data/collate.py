"""Batching of sample dicts into the batch contract of DESIGN.md."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.data import default_collate

__all__ = ["collate_samples"]


def _stack(tensors: list[Tensor]) -> Tensor:
    # torch's default_collate stacks plain tensors; in a worker process it stacks straight into
    # shared memory, where the batch must go to reach the main process (a separate stack would copy
    # the batch twice).
    return default_collate([t.as_subclass(Tensor) for t in tensors])


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch sample dicts.

    Returns:
        ``image`` ``(B, 3, H, W)`` float, ``label`` ``(B,)`` long, ``mask`` ``(B, H, W)`` bool where
        samples have one, ``boxes`` a list of ``(K, 4)`` xyxy float tensors (K varies per image);
        other tensor entries are stacked, anything else is listed.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    keys = samples[0].keys()
    batch: dict[str, Any] = {}
    for key in keys:
        values = [s[key] for s in samples]
        if key == "boxes":
            batch[key] = [torch.as_tensor(v, dtype=torch.float32).as_subclass(Tensor).reshape(-1, 4) for v in values]
        elif key == "label":
            batch[key] = torch.as_tensor([int(v) for v in values], dtype=torch.long)
        elif key == "mask":
            batch[key] = _stack([torch.as_tensor(v).reshape(v.shape[-2:]) for v in values]).bool()
        elif isinstance(values[0], Tensor):
            batch[key] = _stack(values)
        elif isinstance(values[0], (list, tuple)) and values[0] and all(isinstance(t, Tensor) for t in values[0]):
            if any(len(v) != len(values[0]) for v in values):
                raise ValueError(f"samples hold different numbers of {key!r} tensors: {sorted({len(v) for v in values})}")
            batch[key] = [_stack([v[i] for v in values]) for i in range(len(values[0]))]
        else:
            batch[key] = values
    return batch
