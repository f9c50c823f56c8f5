"""A trained model as a frozen feature extractor, for k-NN and linear probes on any checkpoint."""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Any, Iterator, Optional, Union

import pytorch_lightning as pl
import torch
from pytorch_lightning.core.mixins.hparams_mixin import _given_hyperparameters
from torch import Tensor, nn

__all__ = ["FrozenEvaluator", "FrozenFeatures", "load_feature_model"]


def _import_class(path: str) -> type:
    """``"pkg.module.Class"``, or a bare name from :mod:`simpool_lightning.models` (``"DINO"``)."""
    module_name, _, name = path.rpartition(".")
    module = importlib.import_module(module_name or "simpool_lightning.models")
    if not hasattr(module, name):
        raise ValueError(f"{module.__name__} has no class {name!r} (from model={path!r})")
    return getattr(module, name)


@contextlib.contextmanager
def _own_hyperparameters() -> Iterator[None]:
    """Let a model built inside another module's ``__init__`` save its own hyperparameters.

    LightningCLI builds the outer module (an evaluator) inside a context that hands its
    hyperparameters to every ``save_hyperparameters`` call, nested ones included, so a model built
    by the evaluator would record the evaluator's arguments. Inside this context it records its own.
    """
    token = _given_hyperparameters.set(None)
    try:
        yield
    finally:
        _given_hyperparameters.reset(token)


def load_feature_model(
    model: Union[str, nn.Module],
    checkpoint: Optional[str] = None,
    model_kwargs: Optional[dict[str, Any]] = None,
) -> nn.Module:
    """Build or load a model that has ``features(images) -> (B, D)``.

    Args:
        model: a LightningModule class path (``"simpool_lightning.models.DINO"``, or ``"DINO"``),
            or a built module.
        checkpoint: a Lightning checkpoint. With a class path the model is rebuilt from the
            checkpoint's hyperparameters (``load_from_checkpoint``); with a module its
            ``state_dict`` is loaded into it, strictly. ``None`` keeps the fresh weights (a
            randomly initialised baseline).
        model_kwargs: with a class path, the constructor arguments when there is no checkpoint,
            or overrides of the saved hyperparameters when there is one.
    """
    if isinstance(model, str):
        cls = _import_class(model)
        if checkpoint is not None:
            if not (isinstance(cls, type) and issubclass(cls, pl.LightningModule)):
                raise TypeError(f"loading a checkpoint needs a LightningModule class, got {model}")
            if not os.path.isfile(checkpoint):
                raise FileNotFoundError(f"checkpoint {checkpoint!r} does not exist")
        with _own_hyperparameters():
            if checkpoint is None:
                model = cls(**(model_kwargs or {}))
            else:
                model = cls.load_from_checkpoint(checkpoint, map_location="cpu", **(model_kwargs or {}))
    elif checkpoint is not None:
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        model.load_state_dict(state.get("state_dict", state))
    if not callable(getattr(model, "features", None)):
        raise TypeError(f"{type(model).__name__} has no features(images) method to evaluate")
    return model


def _feature_dim(model: nn.Module) -> int:
    dim = getattr(model, "feature_dim", None)
    if dim is None:
        dim = getattr(getattr(model, "backbone", None), "out_dim", None)
    if not isinstance(dim, int):
        raise ValueError(
            f"cannot tell the feature width of {type(model).__name__}: give it a feature_dim attribute "
            f"or a backbone with out_dim"
        )
    return dim


class FrozenFeatures(nn.Module):
    """``model.features`` with every weight frozen and the model held in eval mode.

    Eval mode stays on whatever ``train()`` is called (Lightning calls it on the whole module at
    every epoch), so BatchNorm statistics never change and dropout is off. The forward runs
    without gradients.

    Attributes:
        model: the wrapped model. ``out_dim``: its feature width ``D``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model.requires_grad_(False).eval()
        self.out_dim = _feature_dim(model)

    def train(self, mode: bool = True) -> "FrozenFeatures":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, D)``."""
        return self.model.features(images)


class FrozenEvaluator(pl.LightningModule):
    """Base of the evaluators run by ``simpool validate|test``: the same work for both stages.

    A subclass implements :meth:`_start` (reset its state; optional), :meth:`_step` (one batch of
    any of the datamodule's loaders) and :meth:`_end` (compute and log under ``stage``, ``"val"``
    or ``"test"``).
    """

    def _start(self) -> None:
        """Called before the first batch of a ``validate`` or ``test`` run."""

    def _step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _step(batch, dataloader_idx)")

    def _end(self, stage: str) -> None:
        raise NotImplementedError(f"{type(self).__name__} must implement _end(stage)")

    def on_validation_epoch_start(self) -> None:
        self._start()

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, dataloader_idx)

    def on_validation_epoch_end(self) -> None:
        self._end("val")

    def on_test_epoch_start(self) -> None:
        self._start()

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self._step(batch, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._end("test")
