"""The ViT-S supervised recipe's data path, run as a user runs it: ``simpool fit -c`` on a JPEG tree."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from simpool_lightning.cli import main
from tests.cli_runs import on_cpu

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "supervised" / "vit_s_simpool.yaml"
CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS, BATCH = 4, 64, 8, 16


def _jpeg_tree(root: Path, seed: int = 0) -> Path:
    """Textured JPEGs of assorted sizes and aspect ratios in the ImageFolder layout."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True)
            for i in range(count):
                w, h = (int(v) for v in rng.integers(40, 96, 2))
                coarse = rng.integers(0, 256, (h // 8 + 2, w // 8 + 2, 3), dtype=np.uint8)
                image = Image.fromarray(coarse).resize((w, h), Image.Resampling.BICUBIC)
                image.save(folder / f"{i:04d}.JPEG", quality=90)
    return root


@pytest.mark.slow
def test_the_vit_s_recipe_fits_an_epoch_on_a_jpeg_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The recipe as it is (RandAugment rand-m9-mstd0.5-inc1, random erasing, random interpolation, mixup,
    # EMA, its callbacks), on CPU with a tiny ViT at 32 px; relative paths in the recipe land in tmp_path.
    root = _jpeg_tree(tmp_path / "imagenet")
    monkeypatch.chdir(tmp_path)
    main(
        [
            "fit",
            "-c",
            str(CONFIG),
            *on_cpu(tmp_path / "run"),
            "--trainer.max_epochs=1",
            f"--data.init_args.root={root}",
            "--data.init_args.image_size=32",
            f"--data.init_args.batch_size={BATCH}",
            f"--model.init_args.num_classes={CLASSES}",
            "--model.init_args.backbone_kwargs={img_size: 32, patch_size: 8, embed_dim: 48, depth: 2, num_heads: 2}",
        ]
    )
    (last,) = tmp_path.rglob("last.ckpt")
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert checkpoint["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 1
    assert checkpoint["global_step"] == CLASSES * TRAIN_PER_CLASS // BATCH  # every batch of the epoch
    best = [v for k, v in checkpoint["callbacks"].items() if "val/acc1" in k]
    assert best and best[0]["best_model_score"] is not None  # validation ran through the eval pipeline
