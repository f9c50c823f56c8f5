"""The downstream configs through the `simpool` CLI: fine-tuning from the quickstart's checkpoint, and
localization on fabricated CUB and VOC, object discovery on VOC and COCO-20k, all shrunk with overrides to run on CPU in seconds."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from simpool_lightning.cli import main
from simpool_lightning.data import COCO20kDataModule
from simpool_lightning.models import ImageClassifier
from tests.cli_runs import on_cpu, simpool_test
from tests.data.test_downstream_classification import make_cifar10
from tests.data.test_downstream_cub import make_cub
from tests.data.test_downstream_coco import make_coco
from tests.data.test_downstream_voc import make_voc
from tests.evaluation.test_discovery_eval import last_block_qkv, lost_padding
from tests.reference import lost as lost_reference

ROOT = Path(__file__).resolve().parents[1]
DOWNSTREAM = ROOT / "configs" / "downstream"
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
# The quickstart's model with one block at 32 px and patch 4, as quickstart_checkpoint() trains it.
QUICKSTART_VIT = "{img_size: 32, patch_size: 4, embed_dim: 96, depth: 1, num_heads: 3, mlp_ratio: 2.0}"


def quickstart_checkpoint(tmp_path: Path) -> Path:
    """``simpool fit -c configs/quickstart.yaml`` shrunk to two steps; its last.ckpt under ``tmp_path``."""
    checkpoints = tmp_path / "quickstart"
    callbacks = json.dumps(
        [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint", "init_args": {"dirpath": str(checkpoints), "save_last": True}}]
    )
    main([
        "fit", "-c", QUICKSTART,
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={checkpoints}",
        f"--trainer.callbacks={callbacks}",
        "--data.init_args.train_size=64",
        "--data.init_args.val_size=32",
        "--data.init_args.batch_size=16",
        "--data.init_args.image_size=32",
        "--model.init_args.backbone_kwargs.img_size=32",  # the config interpolates it when the file is read
        "--model.init_args.backbone_kwargs.patch_size=4",
        "--model.init_args.backbone_kwargs.depth=1",
    ])
    path = checkpoints / "last.ckpt"
    assert path.is_file()
    return path


class RecordStart(pl.Callback):
    """Keeps the model's backbone weights and head shape as training starts (step 0)."""

    seen: dict[str, object] = {}

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        RecordStart.seen = {
            "backbone": {k: v.detach().clone() for k, v in pl_module.backbone.state_dict().items()},
            "head": tuple(pl_module.net.head[1].weight.shape),
        }


def test_finetune_cifar10_starts_from_the_quickstart_checkpoint(tmp_path: Path) -> None:
    ckpt = quickstart_checkpoint(tmp_path)
    make_cifar10(tmp_path / "data")
    RecordStart.seen = {}
    run = tmp_path / "finetune"
    main([
        "fit", "-c", str(DOWNSTREAM / "finetune_cifar10.yaml"), *on_cpu(run),
        f"--data.init_args.root={tmp_path / 'data'}",
        "--data.init_args.image_size=32",
        "--data.init_args.batch_size=4",
        "--model.init_args.backbone=vit_tiny_patch16_224",
        f"--model.init_args.backbone_kwargs={QUICKSTART_VIT}",
        "--model.init_args.pool_kwargs={num_heads: 3}",  # the quickstart's SimPool: three heads, no gamma
        f"--model.init_args.pretrained_path={ckpt}",
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.callbacks+=tests.test_downstream_cli.RecordStart",
    ])
    source = torch.load(ckpt, weights_only=True)["state_dict"]
    start = RecordStart.seen["backbone"]
    assert start and sorted(start) == sorted(k[len("net.backbone."):] for k in source if k.startswith("net.backbone."))
    for name, value in start.items():
        assert torch.equal(value, source["net.backbone." + name]), name
    assert source["net.head.1.weight"].shape == (4, 96) and RecordStart.seen["head"] == (10, 96)

    # Training moved the weights, and the fine-tuned checkpoint stands on its own.
    tuned = torch.load(next(run.rglob("last.ckpt")), weights_only=True)
    assert tuned["global_step"] == 2
    assert not torch.equal(tuned["state_dict"]["net.backbone.pool.wq.weight"], source["net.backbone.pool.wq.weight"])
    assert tuned["hyper_parameters"]["pretrained_path"] is None


def test_localization_configs_score_a_checkpoint_on_cub_and_voc(tmp_path: Path, capsys) -> None:
    ckpt = quickstart_checkpoint(tmp_path)
    make_cub(tmp_path / "data")
    make_voc(tmp_path / "data")
    common = [*on_cpu(tmp_path / "eval"), f"--data.init_args.root={tmp_path / 'data'}", "--data.init_args.image_size=32",
              f"--model.init_args.checkpoint={ckpt}"]
    capsys.readouterr()
    main(["test", "-c", str(DOWNSTREAM / "loc_cub.yaml"), *common, "--data.init_args.masks=true"])
    out = capsys.readouterr().out
    for key in ("test/MaxBoxAccV2", "test/BoxAcc@0.3", "test/BoxAcc@0.5", "test/BoxAcc@0.7", "test/corloc", "test/mask_iou"):
        assert key in out, key
    # Discovery at 32 x 32 (the checkpoint's ViT takes one input size).
    main(["test", "-c", str(DOWNSTREAM / "corloc_voc07.yaml"), *common, "--model.init_args.model=simpool_lightning.models.ImageClassifier",
          "--model.init_args.model_kwargs=null"])  # fmt: skip
    out = capsys.readouterr().out
    assert "test/corloc_lost" in out and "test/corloc_dino_seg" in out and "test/MaxBoxAccV2" not in out


def test_corloc_coco20k_runs_losts_protocol_end_to_end(tmp_path: Path) -> None:
    """configs/downstream/corloc_coco20k.yaml on a fabricated COCO layout, each image at its own size as LOST
    feeds it; CorLoc equals LOST's count with LOST's code on the last block's keys, computed here apart."""
    ckpt = quickstart_checkpoint(tmp_path)
    file_list = make_coco(tmp_path / "coco")
    backbone_kwargs = {**torch.load(ckpt, weights_only=True)["hyper_parameters"]["backbone_kwargs"], "dynamic_img_size": True}
    metrics = simpool_test(
        str(DOWNSTREAM / "corloc_coco20k.yaml"), tmp_path / "eval",
        f"--data.init_args.root={tmp_path / 'coco'}",
        f"--data.init_args.file_list={file_list}",
        f"--model.init_args.checkpoint={ckpt}",
        "--model.init_args.model=simpool_lightning.models.ImageClassifier",
        f"--model.init_args.model_kwargs={json.dumps({'backbone_kwargs': backbone_kwargs})}",
        "--model.init_args.methods=[lost, dino_seg, attention_mass]",
    )  # fmt: skip
    assert set(metrics) == {"test/corloc_lost", "test/corloc_dino_seg", "test/corloc_attention_mass"}

    model = ImageClassifier.load_from_checkpoint(ckpt, backbone_kwargs=backbone_kwargs).eval()
    patch = backbone_kwargs["patch_size"]
    data = COCO20kDataModule(str(tmp_path / "coco"), file_list=str(file_list), image_size=None, batch_size=1)
    data.setup("test")
    hits = []
    with torch.no_grad():
        for batch in data.test_dataloader():
            image, gt = batch["image"], batch["boxes"][0]
            _, keys, _ = last_block_qkv(model.backbone.model, lost_padding(image, patch))
            h, w = image.shape[-2:]
            pred = lost_reference.lost(keys, [-(-h // patch), -(-w // patch)], [patch, patch], (3, h, w))[0]
            hits.append(lost_reference.is_hit(pred, gt.long().numpy()))
    assert len(hits) == 3
    assert metrics["test/corloc_lost"] == pytest.approx(sum(hits) / 3)
