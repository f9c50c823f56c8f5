"""benchmarks/attention_quality.py: the columns that say where a map sits, on maps whose answer is known."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from simpool_lightning.models import ImageClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import attention_quality as aq  # noqa: E402  (a script beside the others, not a package)

SMALL = ["--val-size", "48", "--batch-size", "16", "--image-size", "48", "--patch-size", "6"]


def _masks(args) -> np.ndarray:
    data = aq.shapes(args)
    data.setup("validate")
    return np.concatenate([b["mask"].numpy() for b in data.val_dataloader()])


def _dilate(mask: np.ndarray, reach: int) -> np.ndarray:
    """Every pixel within ``reach`` pixels of the mask along both axes (a square neighbourhood), by shifts."""
    padded = np.pad(mask, reach)
    out = np.zeros_like(mask)
    for dy in range(2 * reach + 1):
        for dx in range(2 * reach + 1):
            out |= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]]
    return out


def test_a_uniform_map_puts_the_area_fractions_on_and_beside_the_object() -> None:
    args = aq.parse_args(SMALL)
    row = aq.evaluate("uniform", aq.prior_maps(torch.ones(48, 48)), args)
    masks = _masks(args)
    on = masks.mean(axis=(1, 2))
    beside = np.array([(_dilate(m, 6) & ~m).mean() for m in masks])
    assert row["on_object"] == pytest.approx(on.mean(), rel=1e-5)
    assert row["beside_object"] == pytest.approx(beside.mean(), rel=1e-5)
    assert 0 < row["beside_object"] < 1 - row["on_object"]


def test_a_map_on_the_object_alone_has_nothing_beside_it_and_its_peak_on_it() -> None:
    args = aq.parse_args(SMALL)

    def on_object(images: torch.Tensor, labels: torch.Tensor):
        mask = next(batches)["mask"].float()  # the same batches, in the same order, as evaluate reads
        return None, mask / mask.sum((1, 2), keepdim=True)

    data = aq.shapes(args)
    data.setup("validate")
    batches = iter(data.val_dataloader())
    row = aq.evaluate("mask", on_object, args)
    assert row["on_object"] == pytest.approx(1.0, rel=1e-6)
    assert row["beside_object"] == 0.0
    assert row["peak_on_object"] == 1.0
    assert row["mask_iou"] > 0.5  # 60% of the mass of a flat map on the mask is most of the mask


def test_rows_are_named_from_the_model_simpool_by_its_heads_and_gamma() -> None:
    def model(pool: str, **pool_kwargs) -> ImageClassifier:
        vit = dict(img_size=32, patch_size=8, embed_dim=24, depth=1, num_heads=3)
        return ImageClassifier("vit_tiny_patch16_224", vit, pool=pool, pool_kwargs=pool_kwargs or None, num_classes=4)

    assert aq.row_name(model("simpool", num_heads=3)) == "simpool (3 heads)"
    assert aq.row_name(model("simpool")) == "simpool (1 head)"
    assert aq.row_name(model("simpool", gamma=1.25)) == "simpool (gamma 1.25, 1 head)"
    assert aq.row_name(model("token")) == "token ([CLS] attention)"
    assert aq.row_name(model("avg")) == "avg (GAP-CAM)"


def test_the_per_epoch_curve_reports_the_tables_metrics(capsys: pytest.CaptureFixture[str]) -> None:
    tiny = [
        "--pools", "simpool", "--epochs", "1", "--train-size", "64", "--val-size", "32", "--batch-size", "32",
        "--image-size", "32", "--patch-size", "8", "--embed-dim", "32", "--depth", "1", "--num-heads", "2",
        "--simpool-heads", "2", "--every-epoch",
    ]
    row = aq.main(tiny)[0]
    curve = [line for line in capsys.readouterr().out.splitlines() if line.startswith("# simpool epoch 1:")]
    assert len(curve) == 1, curve
    logged = dict(item.split() for item in curve[0].split(": ", 1)[1].split(", "))
    # The model's own validation metrics are the table's, on the same maps; printed to 3 decimals,
    # so they agree to half the last digit (plus the float error of that difference).
    half_digit = 0.5e-3 + 1e-9
    assert float(logged["acc1"]) == pytest.approx(row["acc"], abs=half_digit)
    assert float(logged["mask_iou"]) == pytest.approx(row["mask_iou"], abs=half_digit)
    assert float(logged["corloc"]) == pytest.approx(row["corloc"], abs=half_digit)
