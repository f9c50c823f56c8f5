"""RetrievalEvaluator on a fabricated revisited Oxford: a known mAP, multi-scale, the CLI, DDP and bad input.

The database images are uniform colours and the features of the controlled model are the mean colour,
so the cosine ranking of every query is known by hand (see COLOURS).
"""
from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image, ImageDraw
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from simpool_lightning.data import RevisitedRetrievalDataModule
from simpool_lightning.evaluation import MULTISCALE, RetrievalEvaluator, load_feature_model, revisited_map
from simpool_lightning.models import ImageClassifier
from tests.cli_runs import simpool_test as run_test
from tests.data.downstream_files import write_corrupt, write_image
from tests.isolated import run_isolated

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "downstream" / "retrieval_roxford.yaml")
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)
W, H = 64, 48
RED, GREEN = (200, 0, 0), (0, 200, 0)
# Cosine similarity to RED falls from db0 to db4 (1, 0.98, 0.89, 0.71, 0) and to GREEN rises.
COLOURS = {"db0": RED, "db1": (200, 40, 0), "db2": (200, 100, 0), "db3": (200, 200, 0), "db4": GREEN}
IMLIST = list(COLOURS)
QIMLIST = ["q0", "q1"]
BOX = (16, 16, 48, 48)  # q0 is red inside its box and green around it
GND = [
    {"bbx": [float(v) for v in BOX], "easy": [2], "hard": [4], "junk": [0]},
    {"bbx": [0.0, 0.0, float(W), float(H)], "easy": [4], "hard": [], "junk": []},
]
# q0 ranks db0..db4; junk db0 is taken out first. Medium: positives db2, db4 at ranks 1 and 3,
# AP = 1/2 (0 + 1/2) / 2 + 1/2 (1/3 + 2/4) / 2 = 1/3. Hard: db4 at rank 2 (db2 junk too), AP =
# (0 + 1/3) / 2 = 1/6. Easy: db2 at rank 1 (db4 junk), AP = 1/4.
# q1 ranks db4 first: AP 1 for medium and easy; no hard positives, so it is left out of Hard.
EXPECTED = {"mAP_medium": 100 * (1 / 3 + 1) / 2, "mAP_hard": 100 / 6, "mAP_easy": 100 * (1 / 4 + 1) / 2}


def make_coloured_oxford(root: Path) -> Path:
    base = root / "roxford5k"
    base.mkdir(parents=True)
    with open(base / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": IMLIST, "qimlist": QIMLIST, "gnd": GND}, f)
    for name, colour in COLOURS.items():
        write_image(base / "jpg" / f"{name}.jpg", (W, H), rect=(0, 0, W, H), color=colour)
    write_image(base / "jpg" / "q1.jpg", (W, H), rect=(0, 0, W, H), color=GREEN)
    q0 = Image.new("RGB", (W, H), GREEN)
    ImageDraw.Draw(q0).rectangle((BOX[0], BOX[1], BOX[2] - 1, BOX[3] - 1), fill=RED)
    q0.save(base / "jpg" / "q0.jpg", quality=95)
    return base


class MeanColour(nn.Module):
    """Features: the mean RGB of the (un-normalised) image, ``(B, 3)``."""

    feature_dim = 3

    def features(self, images: Tensor) -> Tensor:
        mean = torch.tensor(IMAGENET_DEFAULT_MEAN, device=images.device)
        std = torch.tensor(IMAGENET_DEFAULT_STD, device=images.device)
        return images.mean((2, 3)) * std + mean


class SizeFeatures(nn.Module):
    """Features ``(H, W, 1)`` of the input it is given; records every input size."""

    feature_dim = 3

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[tuple[int, int]] = []

    def features(self, images: Tensor) -> Tensor:
        self.sizes.append(tuple(images.shape[-2:]))
        return torch.tensor([[images.shape[-2], images.shape[-1], 1.0]]).expand(images.shape[0], 3)


def quiet_trainer(**kw) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**args, **kw})


def evaluate(root: str, multiscale: bool = False, crop_queries: bool = True, **trainer_kw) -> dict[str, float]:
    trainer = quiet_trainer(**trainer_kw)
    data = RevisitedRetrievalDataModule(root, "roxford5k", image_size=None, crop_queries=crop_queries)
    trainer.test(RetrievalEvaluator(MeanColour(), multiscale=multiscale), datamodule=data, verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.fixture
def oxford(tmp_path: Path) -> Path:
    fixture_root = tmp_path / "data"
    make_coloured_oxford(fixture_root)
    return fixture_root


@pytest.mark.parametrize("multiscale", [False, True])
def test_known_map_with_junk_ignored(oxford, multiscale):
    # Uniform colours look the same at every scale: multi-scale must give the same ranking.
    metrics = evaluate(str(oxford), multiscale)
    assert metrics == pytest.approx({f"test/{k}": v for k, v in EXPECTED.items()}, abs=1e-4)


def test_the_query_is_its_box_unless_told_otherwise(oxford):
    # q0 whole (DINO's evaluation does not crop) is 1/3 red and 2/3 green: it ranks db3, db4, db2,
    # db1, db0 (cosines 0.95, 0.89, 0.80, 0.61, 0.45); under Medium (junk db0) db4 and db2 rank 1
    # and 2: AP = 1/2 (0 + 1/2) / 2 + 1/2 (1/2 + 2/3) / 2 = 5/12, where the red box gives 1/3.
    metrics = evaluate(str(oxford), crop_queries=False)
    assert metrics["test/mAP_medium"] == pytest.approx(100 * (5 / 12 + 1) / 2, abs=1e-4)


def test_multiscale_is_dinos_mean_of_three_scales_then_normalised():
    images = torch.randn(1, 3, 48, 64)
    single = RetrievalEvaluator(SizeFeatures())
    torch.testing.assert_close(single.descriptor(images), F.normalize(torch.tensor([[48.0, 64.0, 1.0]]), dim=1))
    assert single.encoder.model.sizes == [(48, 64)]

    multi = RetrievalEvaluator(SizeFeatures(), multiscale=True)
    assert MULTISCALE == pytest.approx((1.0, 1 / math.sqrt(2), 0.5))
    descriptor = multi.descriptor(images)
    # Bilinear with scale_factor floors the size: 48 / sqrt(2) = 33.9, 64 / sqrt(2) = 45.3.
    assert multi.encoder.model.sizes == [(48, 64), (33, 45), (24, 32)]
    mean = torch.tensor([[(48 + 33 + 24) / 3, (64 + 45 + 32) / 3, 1.0]])
    torch.testing.assert_close(descriptor, mean / mean.norm())


def save_vit(path: Path, **backbone_kwargs) -> str:
    model = ImageClassifier("vit_tiny_patch16_224", {**VIT, **backbone_kwargs}, pool="simpool", num_classes=4)
    trainer = quiet_trainer()
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return str(path)


def simpool_test(tmp_path: Path, root: Path, *overrides: str) -> dict[str, float]:
    return run_test(
        CONFIG, tmp_path, f"--data.init_args.root={root}",
        "--model.init_args.model=simpool_lightning.models.ImageClassifier", *overrides,
    )  # fmt: skip


@pytest.mark.parametrize("multiscale", [False, True])
def test_cli_on_a_vit_checkpoint_matches_a_direct_computation(tmp_path, oxford, multiscale):
    checkpoint = save_vit(tmp_path / "vit.ckpt")
    any_size = {**VIT, "dynamic_img_size": True, "dynamic_img_pad": True}
    metrics = simpool_test(
        tmp_path,
        oxford,
        f"--model.init_args.checkpoint={checkpoint}",
        f"--model.init_args.model_kwargs={json.dumps({'backbone_kwargs': any_size})}",
        f"--model.init_args.multiscale={str(multiscale).lower()}",
    )
    # The same model by hand: each image at its own size (64 x 48 and the 32 x 32 crop), normalised.
    model = load_feature_model("simpool_lightning.models.ImageClassifier", checkpoint, {"backbone_kwargs": any_size}).eval()
    data = RevisitedRetrievalDataModule(str(oxford), "roxford5k")
    data.setup()
    scales = MULTISCALE if multiscale else (1.0,)

    def describe(image: Tensor) -> Tensor:
        resized = [image if s == 1 else F.interpolate(image, scale_factor=s, mode="bilinear", align_corners=False) for s in scales]
        return F.normalize(sum(model.features(x) for x in resized) / len(scales), dim=1)

    with torch.no_grad():
        database, queries = (torch.cat([describe(b["image"]) for b in loader]) for loader in data.test_dataloader())

    expected = revisited_map(queries, database, GND, ("easy", "medium", "hard"))
    assert metrics == pytest.approx({f"test/mAP_{k}": v for k, v in expected.items()}, abs=1e-3)


def test_fixed_size_vit_is_an_error_that_says_how(tmp_path):
    checkpoint = save_vit(tmp_path / "fixed.ckpt")
    with pytest.raises(ValueError, match=r"takes only \(32, 32\) inputs.*dynamic_img_size: true.*dynamic_img_pad: true"):
        RetrievalEvaluator("simpool_lightning.models.ImageClassifier", checkpoint)


def test_missing_ground_truth_names_the_file(tmp_path):
    checkpoint = save_vit(tmp_path / "vit.ckpt")
    (tmp_path / "empty").mkdir()
    any_size = {**VIT, "dynamic_img_size": True, "dynamic_img_pad": True}
    with pytest.raises(FileNotFoundError, match=r"gnd_roxford5k\.pkl"):
        simpool_test(
            tmp_path,
            tmp_path / "empty",
            f"--model.init_args.checkpoint={checkpoint}",
            f"--model.init_args.model_kwargs={json.dumps({'backbone_kwargs': any_size})}",
        )


def test_skipped_database_image_is_an_error(oxford):
    write_corrupt(oxford / "roxford5k" / "jpg" / "db3.jpg")
    data = RevisitedRetrievalDataModule(str(oxford), "roxford5k", image_size=None, on_bad_image="skip")
    with pytest.raises(ValueError, match=r"database image must be described exactly once.*1 are missing \['db3'\].*1 repeated \['db4'\]"):
        quiet_trainer().test(RetrievalEvaluator(MeanColour()), datamodule=data, verbose=False)


def two_processes_give_the_known_map(root: str) -> None:
    # 5 database images over 2 processes: rank 0 describes db0, db2, db4 and rank 1 db1, db3; the
    # gathered features must be back in database order for the known mAP.
    metrics = evaluate(root, strategy="ddp_fork", devices=2)
    assert metrics == pytest.approx({f"test/{k}": v for k, v in EXPECTED.items()}, abs=1e-4)


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_two_processes_give_the_known_map(oxford):
    run_isolated("tests.evaluation.test_retrieval_eval:two_processes_give_the_known_map", str(oxford))
