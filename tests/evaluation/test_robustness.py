"""BackgroundRobustnessEvaluator through `simpool test -c configs/downstream/in9.yaml` on fabricated ImageNet-9.

The classifier is a real (tiny) ImageClassifier checkpoint whose forward is replaced by one whose
prediction is written in each image's grey level, so the accuracy of every variant is known by hand.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from simpool_lightning.data import SyntheticShapesDataModule
from simpool_lightning.data.imagenet9 import IN1K_TO_IN9_GROUPS
from simpool_lightning.evaluation import BackgroundRobustnessEvaluator
from simpool_lightning.models import ImageClassifier
from tests.cli_runs import simpool_test as run_test
from tests.data.downstream_files import write_image
from tests.data.test_downstream_imagenet9 import FOLDERS

ROOT = Path(__file__).resolve().parents[2]
CONFIG = str(ROOT / "configs" / "downstream" / "in9.yaml")
VIT = dict(img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2)

# An image of grey level 20 * code makes the controlled classifier predict: for code k < 9, class k
# of ImageNet-9 (an ImageNet-1k model: the first ImageNet-1k class of group k); for OUTSIDE, ImageNet-1k
# class 999 (toilet tissue), in none of the nine groups, and class 0 (dog) for a 9-class model.
OUTSIDE = 9
PREDICTION = {1000: [group[0] for group in IN1K_TO_IN9_GROUPS] + [999], 9: list(range(9)) + [0]}
PER_CLASS = 2
# (class, image) -> code; every other image is predicted right. 18 images per variant.
CODES = {
    "original": {(0, 1): OUTSIDE},
    "mixed_same": {(1, 1): OUTSIDE, (2, 1): 3, (4, 0): 5},
    "mixed_rand": {(0, 1): OUTSIDE, (1, 0): OUTSIDE, (2, 1): 0, (3, 1): 8, (5, 0): 6, (7, 1): 0},
}


def make_coded_in9(root: Path) -> None:
    for variant, codes in CODES.items():
        for c, folder in enumerate(FOLDERS):
            for i in range(PER_CLASS):
                grey = 20 * codes.get((c, i), c)
                path = root / "bg_challenge" / variant / "val" / folder / f"n{c:04d}{i:04d}.JPEG"
                write_image(path, (224, 224), rect=(0, 0, 224, 224), color=(grey, grey, grey))


def controlled_forward(self: ImageClassifier, images: Tensor) -> Tensor:
    grey = images[:, 0].mean((1, 2)) * IMAGENET_DEFAULT_STD[0] + IMAGENET_DEFAULT_MEAN[0]
    codes = (grey * 255 / 20).round().long()
    num_classes = self.net.head[-1].out_features  # not hparams: under the CLI they are the evaluator's
    classes = torch.tensor(PREDICTION[num_classes], device=images.device)[codes]
    return F.one_hot(classes, num_classes).float()


def save_classifier(path: Path, num_classes: int) -> str:
    model = ImageClassifier("vit_tiny_patch16_224", VIT, pool="simpool", num_classes=num_classes)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.strategy.connect(model)
    trainer.save_checkpoint(path)
    return str(path)


def simpool_test(tmp_path: Path, checkpoint: str) -> dict[str, float]:
    """`simpool test` with the IN-9 config on CPU; the metrics its CSV logger wrote."""
    return run_test(
        CONFIG, tmp_path,
        f"--data.init_args.root={tmp_path}",
        f"--data.init_args.variants={list(CODES)}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=8",
        f"--model.init_args.checkpoint={checkpoint}",
    )  # fmt: skip


@pytest.mark.parametrize(
    "num_classes, expected",
    [
        # ImageNet-1k: OUTSIDE is wrong. original 17/18; mixed_same 15/18; mixed_rand 12/18.
        (1000, {"original": 17, "mixed_same": 15, "mixed_rand": 12}),
        # 9 classes: OUTSIDE predicts dog, right for a dog: original 18/18; mixed_same 15/18 (the
        # OUTSIDE image is a bird); mixed_rand 13/18 (the dog right, the bird wrong).
        (9, {"original": 18, "mixed_same": 15, "mixed_rand": 13}),
    ],
)
def test_per_variant_accuracy_and_bg_gap(tmp_path, monkeypatch, num_classes, expected):
    make_coded_in9(tmp_path)
    checkpoint = save_classifier(tmp_path / "classifier.ckpt", num_classes)
    monkeypatch.setattr(ImageClassifier, "forward", controlled_forward)
    metrics = simpool_test(tmp_path, checkpoint)
    total = len(FOLDERS) * PER_CLASS
    assert metrics == pytest.approx(
        {
            **{f"test/{variant}/acc1": correct / total for variant, correct in expected.items()},
            "test/bg_gap": (expected["mixed_same"] - expected["mixed_rand"]) / total,
        }
    )


def test_wrong_class_count_is_an_error_naming_the_checkpoint(tmp_path):
    checkpoint = save_classifier(tmp_path / "ten.ckpt", 10)
    make_coded_in9(tmp_path)
    with pytest.raises(ValueError, match=r"ten\.ckpt.*\(B, 1000\) logits.*\(B, 9\) logits.*returned \(8, 10\)"):
        simpool_test(tmp_path, checkpoint)


def test_needs_the_imagenet9_datamodule():
    evaluator = BackgroundRobustnessEvaluator(ImageClassifier("vit_tiny_patch16_224", VIT, num_classes=9))
    data = SyntheticShapesDataModule(num_classes=9, image_size=32, train_size=8, val_size=8, batch_size=8)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    with pytest.raises(RuntimeError, match="needs an ImageNet9DataModule"):
        trainer.test(evaluator, datamodule=data, verbose=False)
