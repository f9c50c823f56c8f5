"""What every DataModule shares: loaders over dict samples with the project's collate."""
from __future__ import annotations

from typing import Optional

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset

from .collate import collate_samples

__all__ = ["BaseDataModule"]


class BaseDataModule(pl.LightningDataModule):
    """Loaders for ``train_set`` / ``val_set`` / ``test_set`` that a subclass builds in ``setup``.

    ``test`` falls back to the validation split and ``predict`` to the test split when a dataset
    has no separate one. Under DDP, Lightning inserts the distributed sampler.

    Args:
        batch_size: per-process batch size.
        num_workers: loader worker processes.
        pin_memory: pin host memory (useful on GPU).
    """

    def __init__(self, batch_size: int = 64, num_workers: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    def _loader(self, dataset: Optional[Dataset], split: str, train: bool = False) -> DataLoader:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {split} split (was setup() called?)")
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=train,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, "train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
