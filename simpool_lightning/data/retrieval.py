"""Revisited Oxford 5k and Paris 6k (Radenović et al., CVPR 2018) for instance retrieval.

Layout: ``root/<dataset>/gnd_<dataset>.pkl`` and ``root/<dataset>/jpg/<name>.jpg``. The pickle is a
dict: ``imlist`` (database names), ``qimlist`` (query names), ``gnd`` (one dict per query: ``bbx``,
the query's crop box ``(x1, y1, x2, y2)`` in pixels, and database index lists ``easy``, ``hard``,
``junk``). :func:`simpool_lightning.metrics.retrieval.revisited_map` scores with ``gnd``.

As the protocol says, a query is its image cropped to ``bbx`` (rounded to whole pixels, as PIL's
``crop`` does); database images are whole. (DINO's ``eval_image_retrieval.py`` feeds the whole
query image instead, and so do the numbers made with it: ``crop_queries=False``.) Each image is then
shrunk so that its long side is at most ``image_size``, keeping its aspect (PIL ``thumbnail``,
Lanczos: what DINO's retrieval evaluation does; smaller images are not enlarged). Images keep their
own shapes, so batches hold one image. Multi-scale descriptors (e.g. scales 1, 1/sqrt(2), 1/2) are
the evaluator's business.
"""
from __future__ import annotations

import pickle
from typing import Any, Literal, Optional

import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from .downstream import DownstreamDataModule, require_file
from .io import FileSample, OnBadImage

__all__ = ["RETRIEVAL_DATASETS", "load_revisited_gnd", "RevisitedRetrievalDataModule"]

RETRIEVAL_DATASETS = ("roxford5k", "rparis6k")


def load_revisited_gnd(path: str) -> dict[str, Any]:
    """Read and check a revisited ground-truth pickle (``imlist``, ``qimlist``, ``gnd``).

    Raises:
        FileNotFoundError: no such file.
        ValueError: a key is missing, ``gnd`` and ``qimlist`` differ in length, a query has no
            4-number ``bbx``, or an index lies outside ``imlist``; the message names the file.
    """
    path = require_file(path, "revisited ground-truth pickle")
    try:
        with open(path, "rb") as f:
            cfg = pickle.load(f, encoding="latin1")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"cannot unpickle {str(path)!r}: {err}") from err
    missing = [k for k in ("imlist", "qimlist", "gnd") if not isinstance(cfg, dict) or k not in cfg]
    if missing:
        raise ValueError(f"{str(path)!r} must be a dict with 'imlist', 'qimlist' and 'gnd'; missing {missing}")
    if len(cfg["gnd"]) != len(cfg["qimlist"]):
        raise ValueError(f"{str(path)!r} has {len(cfg['qimlist'])} queries in 'qimlist' but {len(cfg['gnd'])} entries in 'gnd'")
    num_db = len(cfg["imlist"])
    for q, g in enumerate(cfg["gnd"]):
        if g.get("bbx") is None or len(g["bbx"]) != 4:
            raise ValueError(f"{str(path)!r}: query {q} ({cfg['qimlist'][q]!r}) needs a 'bbx' of 4 numbers, got {g.get('bbx')!r}")
        for key in ("easy", "hard", "junk"):
            indices = [int(i) for i in g.get(key, [])]
            if indices and not (0 <= min(indices) and max(indices) < num_db):
                raise ValueError(f"{str(path)!r}: query {q} {key!r} indexes outside the {num_db} database images")
    return cfg


class _RetrievalTransform:
    """Crop to ``sample["crop"]`` where present, shrink the long side to ``max_size``, normalise."""

    def __init__(self, max_size: Optional[int]) -> None:
        self.max_size = max_size
        self.to_tensor = v2.Compose(
            [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD))]
        )

    def __call__(self, sample: dict[str, Any]) -> dict[str, Any]:
        sample = dict(sample)
        image: Image.Image = sample.pop("image")
        crop = sample.pop("crop", None)
        if crop is not None:
            image = image.crop(tuple(round(float(c)) for c in crop))
        if self.max_size is not None:
            image.thumbnail((self.max_size, self.max_size), Image.Resampling.LANCZOS)
        return {**sample, "image": self.to_tensor(image)}


class RevisitedRetrievalDataModule(DownstreamDataModule):
    """Database images and cropped queries of revisited Oxford or Paris, for retrieval evaluation.

    Loaders: ``val_dataloader`` and ``test_dataloader`` return ``[database, queries]`` (Lightning's
    ``dataloader_idx`` 0 and 1), unshuffled, one image a batch; there is no training loader.

    Batch: ``image`` ``(1, 3, h, w)`` (long side at most ``image_size``), ``label`` ``(1,)`` = -1 (no
    classes), ``index`` ``(1,)``: the position in ``imlist`` (database) or ``qimlist`` / ``gnd``
    (queries), which is what the features must be ordered by (a ``DistributedSampler`` or a skipped
    image changes the order, never the index).

    Args:
        root: the folder that holds ``roxford5k/`` or ``rparis6k/``.
        dataset: ``"roxford5k"`` or ``"rparis6k"``.
        image_size: the largest long side; ``None`` keeps full resolution.
        crop_queries: crop each query to its ``bbx`` (the protocol); ``False`` keeps the whole
            query image, as DINO's retrieval evaluation does.
        num_workers, pin_memory, on_bad_image: see :class:`~.downstream.DownstreamDataModule`.
            With ``"skip"`` an unreadable image is replaced by the next one, whose ``index`` then
            shows twice: the evaluator must notice, since every database image counts in mAP.

    Attributes (after ``setup``): ``gnd`` (list of per-query dicts), ``imlist``, ``qimlist``.
    """

    def __init__(
        self,
        root: str,
        dataset: Literal["roxford5k", "rparis6k"] = "roxford5k",
        image_size: Optional[int] = 224,
        crop_queries: bool = True,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
    ) -> None:
        super().__init__(root, image_size, 1, num_workers, pin_memory, on_bad_image)
        if dataset not in RETRIEVAL_DATASETS:
            raise ValueError(f"dataset must be one of {RETRIEVAL_DATASETS}, got {dataset!r}")
        self.dataset = dataset
        self.crop_queries = crop_queries
        self.gnd: list[dict[str, Any]] = []
        self.imlist: list[str] = []
        self.qimlist: list[str] = []
        self.database_set: Optional[Dataset] = None
        self.query_set: Optional[Dataset] = None

    def _read_classes(self) -> list[str]:
        return []

    def _build(self) -> tuple[None, None, None]:
        base = self.root / self.dataset
        cfg = load_revisited_gnd(str(base / f"gnd_{self.dataset}.pkl"))
        self.gnd, self.imlist, self.qimlist = list(cfg["gnd"]), list(cfg["imlist"]), list(cfg["qimlist"])
        images = require_file(base / "jpg", f"{self.dataset} image folder")
        transform = _RetrievalTransform(self.image_size)

        def sample(name: str, index: int, crop: Optional[Any] = None) -> FileSample:
            extra: dict[str, Any] = {"index": torch.tensor(index)}
            if crop is not None:
                extra["crop"] = [float(c) for c in crop]
            return FileSample(str(images / f"{name}.jpg"), -1, extra=extra)

        self.database_set = self._files([sample(n, i) for i, n in enumerate(self.imlist)], transform)
        queries = [sample(n, i, g["bbx"] if self.crop_queries else None) for i, (n, g) in enumerate(zip(self.qimlist, self.gnd))]
        self.query_set = self._files(queries, transform)
        # Neither is a "val" or "test" split: the loaders below hand out the pair.
        return None, None, None

    @property
    def skipped(self) -> list[str]:
        return [path for s in (self.database_set, self.query_set) if s is not None for path in s.skipped]

    def _pair(self, split: str) -> list[DataLoader]:
        return [self._loader(self.database_set, f"{split} database"), self._loader(self.query_set, f"{split} query")]

    def val_dataloader(self) -> list[DataLoader]:
        return self._pair("val")

    def test_dataloader(self) -> list[DataLoader]:
        return self._pair("test")
