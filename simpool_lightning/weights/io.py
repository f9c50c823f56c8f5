"""Reading a weights file onto the CPU: ``.safetensors``, or anything ``torch.load`` reads.

``weights_only=True`` unpickles tensors, plain containers and :data:`SAFE_GLOBALS`: the authors'
checkpoints (timm's ``CheckpointSaver`` and DINO's ``main_dino.py``) store their training args as an
``argparse.Namespace``, a plain attribute bag whose unpickling runs no code of the file's choosing,
so official files read with the default. Any other class is refused, with the opt-out named.
"""
from __future__ import annotations

import argparse
import os
import pickle
from typing import Any, Mapping, Union

import torch
from safetensors.torch import load_file as load_safetensors
from torch import Tensor

__all__ = ["SAFE_GLOBALS", "StateDict", "read_file", "strip_prefix"]

StateDict = dict[str, Tensor]

# Classes weights_only=True may rebuild beyond torch's own allow-list.
SAFE_GLOBALS: tuple[type, ...] = (argparse.Namespace,)


def read_file(path: Union[str, os.PathLike], weights_only: bool, what: str, opt_out: str) -> Any:
    """The object stored in ``path``, with every tensor on the CPU.

    Args:
        path: the file.
        weights_only: refuse to unpickle anything but tensors, plain containers and
            :data:`SAFE_GLOBALS` (``argparse.Namespace``).
        what: how errors name the file (``"pretrained_path 'x.pth'"``).
        opt_out: how the caller turns ``weights_only`` off, for the refusal's message.

    Raises:
        FileNotFoundError: no such file. ``pickle.UnpicklingError``: ``weights_only`` refused it.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} does not exist")
    if path.endswith(".safetensors"):  # tensors only, nothing to unpickle
        return load_safetensors(path)
    try:
        with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            return torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as err:
        if not weights_only:
            raise
        raise pickle.UnpicklingError(
            f"{what} holds objects other than tensors, plain containers and argparse.Namespace, which "
            f"weights_only=True refuses to unpickle. Unpickling can run arbitrary code: only if you trust this "
            f"file, {opt_out}. torch said: {str(err).splitlines()[0]}"
        ) from err


def strip_prefix(state: Mapping[str, Tensor], prefix: str) -> StateDict:
    """Drop ``prefix`` when every key has it (DDP's ``module.``)."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)
