"""Revisited Oxford / Paris DataModule on a tiny fabricated copy of the real layout."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from simpool_lightning.data import RevisitedRetrievalDataModule

from .downstream_files import write_corrupt, write_image

W, H = 80, 60
IMLIST = ["all_souls_000000", "all_souls_000013", "radcliffe_camera_000519", "magdalen_000078"]
QIMLIST = ["all_souls_000013", "radcliffe_camera_000519"]
# The query region (rounded bbx) is drawn white: the cropped query must come out all white.
GND = [
    {"bbx": [10.4, 5.6, 50.2, 45.0], "easy": [0], "hard": [3], "junk": []},
    {"bbx": [0.0, 0.0, 40.0, 20.0], "easy": np.array([1]), "hard": np.array([], dtype=np.int64), "junk": np.array([0, 3])},
]


def make_revisited(root: Path, dataset: str = "roxford5k", gnd: list | None = None) -> Path:
    base = root / dataset
    base.mkdir(parents=True)
    with open(base / f"gnd_{dataset}.pkl", "wb") as f:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": GND if gnd is None else gnd}, f)
    boxes = {q: tuple(round(v) for v in g["bbx"]) for q, g in zip(QIMLIST, GND)}
    for name in IMLIST:
        write_image(base / "jpg" / f"{name}.jpg", (W, H), rect=boxes.get(name))
    return base


@pytest.mark.parametrize("dataset", ["roxford5k", "rparis6k"])
def test_database_and_cropped_queries(tmp_path: Path, dataset: str) -> None:
    make_revisited(tmp_path, dataset)
    dm = RevisitedRetrievalDataModule(str(tmp_path), dataset=dataset, image_size=32)
    dm.setup("test")
    assert dm.imlist == IMLIST and dm.qimlist == QIMLIST and dm.gnd[0]["hard"] == [3]
    database, queries = dm.test_dataloader()
    db = list(database)
    assert [int(b["index"]) for b in db] == [0, 1, 2, 3] and all(b["label"].tolist() == [-1] for b in db)
    assert db[0]["image"].shape == (1, 3, 24, 32)  # long side 80 -> 32, aspect kept
    q = list(queries)
    # bbx rounds to (10, 6, 50, 45): 40 x 39, long side to 32 keeping the aspect.
    assert [int(b["index"]) for b in q] == [0, 1]
    assert q[0]["image"].shape[-1] == 32 and abs(q[0]["image"].shape[-2] - 39 * 32 / 40) <= 1
    assert q[1]["image"].shape[-2:] == (16, 32)  # 40 x 20
    for b in q:  # the crop is exactly the white region
        assert b["image"].mean(1).min() > 1.5
    assert "crop" not in q[0]


def test_full_resolution(tmp_path: Path) -> None:
    make_revisited(tmp_path)
    dm = RevisitedRetrievalDataModule(str(tmp_path), image_size=None)
    dm.setup()
    database, queries = dm.val_dataloader()
    assert next(iter(database))["image"].shape == (1, 3, H, W)
    assert next(iter(queries))["image"].shape == (1, 3, 39, 40)
    dm = RevisitedRetrievalDataModule(str(tmp_path), image_size=None, crop_queries=False)
    dm.setup()
    assert next(iter(dm.val_dataloader()[1]))["image"].shape == (1, 3, H, W)  # DINO's whole query image


def test_bad_ground_truth(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gnd_roxford5k.pkl"):
        RevisitedRetrievalDataModule(str(tmp_path)).setup()
    make_revisited(tmp_path, gnd=GND[:1])
    with pytest.raises(ValueError, match="gnd_roxford5k.pkl.*2 queries.*1 entries"):
        RevisitedRetrievalDataModule(str(tmp_path)).setup()
    make_revisited(tmp_path / "b", gnd=[GND[0], {**GND[1], "junk": [7]}])
    with pytest.raises(ValueError, match="query 1 'junk' indexes outside the 4 database images"):
        RevisitedRetrievalDataModule(str(tmp_path / "b")).setup()


def test_corrupt_database_image(tmp_path: Path) -> None:
    base = make_revisited(tmp_path)
    bad = write_corrupt(base / "jpg" / "magdalen_000078.jpg")
    dm = RevisitedRetrievalDataModule(str(tmp_path), on_bad_image="skip")
    dm.setup()
    database, _ = dm.test_dataloader()
    assert [int(b["index"]) for b in database] == [0, 1, 2, 0]  # the replacement keeps its own index
    assert dm.skipped == [str(bad)]
    dm = RevisitedRetrievalDataModule(str(tmp_path))
    dm.setup()
    with pytest.raises(ValueError, match="magdalen_000078.jpg"):
        list(dm.test_dataloader()[0])


def test_index_is_a_tensor_batch(tmp_path: Path) -> None:
    make_revisited(tmp_path)
    dm = RevisitedRetrievalDataModule(str(tmp_path))
    dm.setup()
    batch = next(iter(dm.test_dataloader()[1]))
    assert batch["index"].dtype == torch.long and batch["index"].shape == (1,)
