"""LocalizationEvaluator: hand-checked scores from maps we control, refusal of pools without attention, DINO checkpoints."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import pytest
import pytorch_lightning as pl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from simpool_lightning.data import VOCDataModule
from simpool_lightning.evaluation import CorLoc, LocalizationEvaluator
from simpool_lightning.metrics import MaxBoxAccV2
from simpool_lightning.models import DINO, ImageClassifier
from simpool_lightning.models.classifier import attention_to_maps
from tests.reference import wsolevaluation
from tests.data.test_downstream_voc import make_voc
from tests.isolated import run_isolated
from tests.models.test_classifier import TINY_VIT, save_lightning_checkpoint


class FirstChannelAttention(nn.Module):
    """A 'model' whose attention map is its input's first channel (less its minimum), so a test draws the
    map it wants, and the bright rectangle of a fabricated image is where it attends. Its 'feature
    grid' is the image itself."""

    def features(self, images: Tensor) -> Tensor:
        return images.flatten(1)

    def attention_maps(self, images: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        assert size in (None, tuple(images.shape[-2:]))
        return images[:, 0] - images[:, 0].amin((1, 2), keepdim=True)


class PatchAttention(nn.Module):
    """A 'model' with a 4 x 4 feature grid: its map is the first channel averaged over 8 x 8 patches
    of a 32 x 32 image, upsampled like the package's models when given a size."""

    def features(self, images: Tensor) -> Tensor:
        return images.flatten(1)

    def attention_maps(self, images: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        grid = nn.functional.avg_pool2d(images[:, :1], 8)
        return attention_to_maps(grid, size)


def block(x1: int, y1: int, x2: int, y2: int, side: int = 16) -> Tensor:
    out = torch.zeros(side, side)
    out[y1:y2, x1:x2] = 1.0
    return out


def hand_batch() -> dict:
    """Three 16 x 16 images, the attention a block, one ground-truth box and mask each.

    0: map on the box exactly (IoU 1); 1: map the left half of the box (IoU 0.5); 2: map away from it (IoU 0).
    """
    maps = [block(2, 2, 10, 10), block(0, 0, 8, 8), block(8, 8, 16, 16)]
    boxes = [(2, 2, 10, 10), (0, 0, 16, 8), (0, 0, 8, 8)]
    images = torch.stack([torch.stack([m, torch.zeros_like(m), torch.zeros_like(m)]) for m in maps])
    return {
        "image": images,
        "label": torch.zeros(3, dtype=torch.long),
        "boxes": [torch.tensor([b], dtype=torch.float32) for b in boxes],
        "mask": torch.stack([block(*b) > 0 for b in boxes]),
    }


def quiet_trainer() -> pl.Trainer:
    return pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)


def test_scores_of_maps_we_control():
    evaluator = LocalizationEvaluator(FirstChannelAttention())
    batch = hand_batch()
    loader = DataLoader([batch], batch_size=None)
    metrics = quiet_trainer().test(evaluator, loader, verbose=False)[0]
    # BoxAcc (wsolevaluation's inclusive boxes): image 0 hits at every IoU threshold; image 1, box
    # (0, 0, 8, 8) = 9 x 9 against (0, 0, 16, 8) = 17 x 9, IoU 81 / 153 = 0.53, at 0.3 and 0.5; image 2
    # (its box (8, 8, 15, 15) shares one corner pixel with the gt, IoU 1 / 144) never.
    assert metrics["test/BoxAcc@0.3"] == pytest.approx(2 / 3)
    assert metrics["test/BoxAcc@0.5"] == pytest.approx(2 / 3)
    assert metrics["test/BoxAcc@0.7"] == pytest.approx(1 / 3)
    assert metrics["test/MaxBoxAccV2"] == pytest.approx(5 / 9)
    # CorLoc (IoU >= 0.5): images 0 and 1. Mask IoU: (1 + 0.5 + 0) / 3.
    assert metrics["test/corloc"] == pytest.approx(2 / 3)
    assert metrics["test/mask_iou"] == pytest.approx(0.5)

    # Only what the data carries is logged; validate logs under val/.
    boxes_only = {k: v for k, v in batch.items() if k != "mask"}
    metrics = quiet_trainer().validate(evaluator, DataLoader([boxes_only], batch_size=None), verbose=False)[0]
    assert set(metrics) == {"val/MaxBoxAccV2", "val/BoxAcc@0.3", "val/BoxAcc@0.5", "val/BoxAcc@0.7", "val/corloc"}


def patch_batch(seed: int, n: int = 8) -> dict:
    """n random 32 x 32 images (smooth first channel) with 1 or 2 random boxes of side 8 to 16 each."""
    g = torch.Generator().manual_seed(seed)
    images = nn.functional.interpolate(torch.rand(n, 3, 4, 4, generator=g), size=(32, 32), mode="bilinear")
    boxes = []
    for i in range(n):
        xy = torch.rand(1 + i % 2, 2, generator=g) * 16
        boxes.append(torch.cat([xy, xy + 8 + torch.rand(xy.shape, generator=g) * 8], dim=1))
    return {"image": images, "label": torch.zeros(n, dtype=torch.long), "boxes": boxes}


def test_maxboxacc_v2_is_wsolevaluations_on_bicubic_maps():
    batch = patch_batch(0)
    loader = DataLoader([batch], batch_size=None)
    metrics = quiet_trainer().test(LocalizationEvaluator(PatchAttention()), loader, verbose=False)[0]
    # wsolevaluation's inference.py: the 4 x 4 map, as float64, resized to the image by cv2 bicubic,
    # normalised, then its BoxEvaluator.
    grid = PatchAttention().attention_maps(batch["image"]).double().numpy()
    reference = wsolevaluation.BoxEvaluator()
    for cam, gt in zip(grid, batch["boxes"]):
        reference.accumulate(wsolevaluation.resize_and_normalize(cam, 32, 32), gt.tolist())
    box_acc, max_box_acc_v2 = reference.compute()
    assert metrics["test/MaxBoxAccV2"] == pytest.approx(max_box_acc_v2 / 100, abs=1e-6)
    assert [metrics[f"test/BoxAcc@{d}"] * 100 for d in (0.3, 0.5, 0.7)] == pytest.approx(box_acc, abs=1e-4)
    # The resize matters on this batch: the bilinear maps would score 0.208, not 0.25.
    bilinear = MaxBoxAccV2()
    bilinear.update(PatchAttention().attention_maps(batch["image"], size=(32, 32)), batch["boxes"])
    assert max_box_acc_v2 / 100 == pytest.approx(0.25) and bilinear.compute()["MaxBoxAccV2"].item() == pytest.approx(5 / 24)

    # box_protocol="components": the earlier reading, on the bilinear maps CorLoc uses.
    evaluator = LocalizationEvaluator(PatchAttention(), num_thresholds=100, box_protocol="components")
    metrics = quiet_trainer().test(evaluator, loader, verbose=False)[0]
    direct = MaxBoxAccV2(num_thresholds=100, protocol="components")
    direct.update(PatchAttention().attention_maps(batch["image"], size=(32, 32)), batch["boxes"])
    assert metrics["test/MaxBoxAccV2"] == pytest.approx(direct.compute()["MaxBoxAccV2"].item())
    with pytest.raises(ValueError, match="box_protocol must be one of"):
        LocalizationEvaluator(PatchAttention(), box_protocol="bilinear")


def test_batches_without_boxes_or_masks_are_refused():
    batch = {k: v for k, v in hand_batch().items() if k in ("image", "label")}
    with pytest.raises(ValueError, match="'boxes' or 'mask'"):
        quiet_trainer().test(LocalizationEvaluator(FirstChannelAttention()), DataLoader([batch], batch_size=None))


def test_a_pool_without_attention_is_refused_naming_it(tmp_path: Path):
    with pytest.raises(ValueError, match="pools with 'avg', which has no spatial attention"):
        LocalizationEvaluator(ImageClassifier(*TINY_VIT, pool="avg", num_classes=4))
    path = save_lightning_checkpoint(ImageClassifier(*TINY_VIT, pool="gem", num_classes=4), tmp_path / "gem.ckpt")
    with pytest.raises(ValueError, match=r"gem\.ckpt' pools with 'gem'"):
        LocalizationEvaluator("simpool_lightning.models.ImageClassifier", checkpoint=str(path))


def test_a_dino_checkpoint_is_scored_by_its_teachers_maps(tmp_path: Path):
    torch.manual_seed(0)
    dino = DINO(*TINY_VIT, pool="simpool", out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8)
    with torch.no_grad():  # student and teacher differ, as after training
        for p in dino.student.parameters():
            p.mul_(-3.0)
    path = save_lightning_checkpoint(dino, tmp_path / "dino.ckpt")
    evaluator = LocalizationEvaluator("simpool_lightning.models.DINO", checkpoint=str(path))
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(evaluator.attention_maps(images), dino.eval().attention_maps(images, size=(32, 32)))
    make_voc(tmp_path)
    data = VOCDataModule(str(tmp_path), image_size=32, batch_size=2)
    metrics = quiet_trainer().test(evaluator, data, verbose=False)[0]
    assert {"test/MaxBoxAccV2", "test/corloc"} <= set(metrics) and "test/mask_iou" not in metrics

    # The same number as the metric on the teacher's maps directly.
    direct = CorLoc()
    dino.eval()
    with torch.no_grad():
        for batch in data.test_dataloader():
            direct.update(dino.attention_maps(batch["image"], size=(32, 32)), batch["boxes"])
    assert metrics["test/corloc"] == pytest.approx(float(direct.compute()))


class LeftHalfAttention(FirstChannelAttention):
    """Sees only the left half of the image: on the fabricated VOC images it finds the dog and the car,
    not the tv monitor on the right, so the scores are 2 of 3 and an image counted twice would show."""

    def attention_maps(self, images: Tensor, size: Optional[tuple[int, int]] = None) -> Tensor:
        maps = super().attention_maps(images, size)
        maps[..., maps.shape[-1] // 2 :] = 0
        return maps


def _score_voc(root: str, devices: int) -> dict[str, float]:
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_fork" if devices > 1 else "auto",
        logger=False, enable_progress_bar=False, enable_model_summary=False,
    )
    trainer.test(LocalizationEvaluator(LeftHalfAttention()), VOCDataModule(root, image_size=32, batch_size=1), verbose=False)
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def two_processes_score_like_one(tmp_dir: str) -> None:
    make_voc(Path(tmp_dir))
    one, two = _score_voc(tmp_dir, 1), _score_voc(tmp_dir, 2)  # 3 images: shards of 2 and 1, none padded
    assert one == two, (one, two)
    assert one["test/corloc"] == pytest.approx(2 / 3) and one["test/MaxBoxAccV2"] == pytest.approx(2 / 3)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_processes_score_like_one(tmp_path: Path):
    run_isolated("tests.evaluation.test_localization_eval:two_processes_score_like_one", str(tmp_path))
