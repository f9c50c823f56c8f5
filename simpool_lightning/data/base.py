"""What every DataModule shares: loaders over dict samples with the project's collate, and a
training loader that resumes exactly part-way through an epoch."""
from __future__ import annotations

import os
import random
import warnings
from typing import Any, Iterator, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.distributed as dist
from pytorch_lightning.utilities.seed import isolate_rng
from pytorch_lightning.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .collate import collate_samples

__all__ = [
    "BaseDataModule",
    "EpochSampler",
    "ResumableLoader",
    "UnpaddedDistributedSampler",
    "derive_seed",
    "global_seed",
    "seed_all",
]


def global_seed() -> int:
    """The run's seed: the one ``seed_everything`` (the config's ``seed_everything``) set, else 0.

    Lightning keeps it in ``PL_GLOBAL_SEED``, the same place its own distributed sampler reads it
    from, so every process of a run agrees on it.
    """
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


def derive_seed(*keys: int) -> int:
    """A 63-bit seed that is a pure function of ``keys`` (non-negative ints), independent across keys."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, np.uint64)[0] >> np.uint64(1))


def seed_all(seed: int, accelerators: bool = True) -> None:
    """Seed Python's, numpy's and torch's global generators with ``seed``: torch's on every device,
    or with ``accelerators=False`` on the CPU alone (what data loading draws from; cheaper, as
    ``torch.manual_seed`` spends about 0.1 ms on each device type it seeds)."""
    if accelerators:
        torch.manual_seed(seed)
    else:
        torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


# Independent streams of derive_seed: the data's augmentation, the model's dropout and mixup.
DATA_STREAM, MODEL_STREAM = 0, 1


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


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


class EpochSampler(DistributedSampler):
    """Training order: a shuffle that is a pure function of ``(seed, epoch)``, sharded over ranks.

    torch's ``DistributedSampler`` with one change: iteration skips the first ``start`` indices of
    this rank's share, so an epoch can be continued where a checkpoint left it. Lightning calls
    ``set_epoch`` every epoch and, the sampler being a ``DistributedSampler``, leaves it in place
    under DDP. ``len`` stays the whole epoch's share, as Lightning counts batches against it.
    """

    def __init__(self, dataset: Dataset, seed: int) -> None:
        num_replicas, rank = _world()
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start :])


class ResumableLoader(DataLoader):
    """The training loader: its position is part of the checkpoint, so a resumed fit sees exactly
    the batches an uninterrupted one would.

    Order comes from an :class:`EpochSampler`. :meth:`position` (the epoch and the number of
    batches handed out in it) goes into checkpoints through :class:`BaseDataModule`'s
    ``state_dict``; after :meth:`resume` the next iteration of that epoch continues with the next
    batch. The run's seed is part of the position too, so a resumed run keeps the order it started
    with.

    Augmentation randomness: in-process loading (``num_workers=0``) seeds the global generators
    for each batch from ``(seed, epoch, rank, batch)`` and restores them afterwards, so a batch's
    random flips and crops do not depend on what ran before it, and loading leaves the model's
    random stream alone. Worker processes are seeded from the loader's own generator (seeded with
    the run's seed), so runs repeat; after a resume mid-epoch, though, workers draw fresh streams:
    the same samples in the same order, but different augmentation draws.

    Exact resumption needs the same ``batch_size`` and number of processes as the interrupted run;
    continuing an epoch saved with others is refused.
    """

    def __init__(
        self, dataset: Dataset, batch_size: int, seed: int, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=EpochSampler(dataset, seed),
            drop_last=True,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
            collate_fn=collate_samples,
            generator=torch.Generator().manual_seed(seed),
        )
        self.batches = 0  # handed out in the current epoch
        self._resume: Optional[dict[str, int]] = None

    @property
    def seed(self) -> int:
        return self.sampler.seed  # type: ignore[attr-defined]

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        # A generator: its body runs at the first next(), after Lightning has called set_epoch.
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        start, resume, self._resume = 0, self._resume, None
        if resume is not None and resume["epoch"] == sampler.epoch and 0 < resume["batches"] < len(self):
            for key, now in (("batch_size", self.batch_size), ("num_replicas", sampler.num_replicas)):
                if resume[key] != now:
                    raise ValueError(
                        f"the checkpoint stopped mid-epoch with {key}={resume[key]} and this run has {key}={now}: "
                        f"resuming mid-epoch needs the same {key} (or resume from an end-of-epoch checkpoint)"
                    )
            start = resume["batches"]
        sampler.start = start * self.batch_size  # type: ignore[operator]
        self.batches = start
        iterator = super().__iter__()
        end = object()
        while True:
            if self.num_workers == 0:
                # isolate_rng restores the generators on a normal exit only: the epoch's end is a
                # sentinel, not StopIteration.
                with isolate_rng(include_cuda=False):
                    seed = derive_seed(self.seed, DATA_STREAM, sampler.epoch, sampler.rank, self.batches)
                    seed_all(seed, accelerators=False)
                    batch = next(iterator, end)
            else:
                batch = next(iterator, end)
            if batch is end:
                return
            self.batches += 1
            yield batch

    def position(self) -> dict[str, int]:
        """Where training stands in the loader: seed, epoch, batches handed out, and the settings
        they depend on."""
        sampler: EpochSampler = self.sampler  # type: ignore[assignment]
        return {
            "seed": self.seed,
            "epoch": sampler.epoch,
            "batches": self.batches,
            "batch_size": self.batch_size,  # type: ignore[dict-item]
            "num_replicas": sampler.num_replicas,
        }

    def resume(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`position`: the next iteration, if it is of the same epoch, starts
        with the batch after it (an epoch that has moved on starts from its beginning)."""
        expected = set(self.position())
        if set(state) != expected:
            raise ValueError(
                f"train loader position in the checkpoint has keys {sorted(state)}, expected {sorted(expected)}"
            )
        self.sampler.seed = state["seed"]  # type: ignore[attr-defined]
        self.generator.manual_seed(state["seed"])  # type: ignore[union-attr]
        self._resume = dict(state)


class BaseDataModule(pl.LightningDataModule):
    """Loaders for ``train_set`` / ``val_set`` / ``test_set`` that a subclass builds in ``setup``.

    ``test`` falls back to the validation split and ``predict`` to the test split when a dataset
    has no separate one. Training goes through a :class:`ResumableLoader` (shuffled by the run's
    seed and the epoch, sharded over processes); evaluation under DDP uses
    :class:`UnpaddedDistributedSampler`, so every sample is evaluated exactly once.

    The training loader's position is this DataModule's checkpoint state (``state_dict`` /
    ``load_state_dict``), so ``fit(ckpt_path=...)`` from a checkpoint saved mid-epoch continues
    with the batch after it. It goes through the DataModule, not Lightning's stateful-loader
    protocol: Lightning restores DataModules before anything asks for the training loader, but
    drops a loader's own state when ``configure_optimizers`` has already built the loader through
    ``trainer.estimated_stepping_batches``, as our models do (Lightning issue #20550).

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
        self._resume_position: Optional[dict[str, int]] = None

    def state_dict(self) -> dict[str, Any]:
        # The loader the fit iterates, not the newest train_dataloader() (KNNCallback asks for one
        # for its reference set at epoch ends).
        loader = None if self.trainer is None else self.trainer.train_dataloader
        return {"train_loader": loader.position()} if isinstance(loader, ResumableLoader) else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "train_loader" not in state_dict:
            raise ValueError(
                f"{type(self).__name__} state in the checkpoint has no 'train_loader' (keys: {sorted(state_dict)})"
            )
        self._resume_position = state_dict["train_loader"]
        # The loader resumes where it was, but is not a Lightning "stateful" loader (see above), so
        # Lightning's warning that mid-epoch resumption replays the epoch does not apply.
        warnings.filterwarnings(
            "ignore", "You're resuming from a checkpoint that ended before the epoch ended", PossibleUserWarning
        )

    def _require(self, dataset: Optional[Dataset], split: str) -> Dataset:
        if dataset is None:
            raise RuntimeError(f"{type(self).__name__} has no {split} split (was setup() called?)")
        return dataset

    def _loader(self, dataset: Optional[Dataset], split: str) -> DataLoader:
        dataset = self._require(dataset, split)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=UnpaddedDistributedSampler(dataset) if _world()[0] > 1 else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_samples,
        )

    def train_dataloader(self) -> ResumableLoader:
        loader = ResumableLoader(
            self._require(self.train_set, "train"), self.batch_size, global_seed(), self.num_workers, self.pin_memory
        )
        if self._resume_position is not None:
            loader.resume(self._resume_position)
            self._resume_position = None
        return loader

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set if self.test_set is not None else self.val_set, "test")

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()
