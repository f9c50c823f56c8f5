"""What every DataModule shares: loaders over dict samples with the project's collate."""
from __future__ import annotations

from typing import Iterator, Optional

import pytorch_lightning as pl
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .collate import collate_samples

__all__ = ["BaseDataModule", "UnpaddedDistributedSampler"]


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sampler: rank r takes samples r, r + world, ... and nothing more.

    torch's ``DistributedSampler`` pads every rank to the same length by repeating samples, so
    synced metrics would count those samples twice; here ranks may get one sample fewer instead.
    Being a ``DistributedSampler``, Lightning leaves it in place.
    """

    def __init__(self, dataset: Dataset) -> None:
        super().__init__(dataset, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(dataset), self.num_replicas))  # type: ignore[arg-type]
        self.total_size = len(dataset)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


class BaseDataModule(pl.LightningDataModule):
    """Loaders for ``train_set`` / ``val_set`` / ``test_set`` that a subclass builds in ``setup``.

    ``test`` falls back to the validation split and ``predict`` to the test split when a dataset
    has no separate one. Under DDP, Lightning inserts the distributed sampler for training;
    evaluation uses :class:`UnpaddedDistributedSampler`, so every sample is evaluated exactly once.

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
        sampler = None
        if not train and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            sampler = UnpaddedDistributedSampler(dataset)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            sampler=sampler,
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
