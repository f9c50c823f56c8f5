"""`simpool predict` on a folder of your own images (issue #21): rows, pictures, class names, bad files.

A tiny ImageClassifier is fitted through the CLI once (so its checkpoint records its model and its
DataModule, as the quickstart's does), then predicts with ``configs/predict_images.yaml`` on a folder
of fabricated images of mixed sizes and modes.
"""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from simpool_lightning.callbacks import CONTOUR_COLOR, PredictionWriter
from simpool_lightning.cli import main
from simpool_lightning.data import BadImageError, ImageFilesDataModule
from simpool_lightning.data.synthetic import SHAPE_NAMES
from simpool_lightning.interop import export_official
from simpool_lightning.models import DINO, ImageClassifier
from tests.trainers import trainer as make_trainer

ROOT = Path(__file__).resolve().parents[1]
PREDICT_IMAGES = str(ROOT / "configs" / "predict_images.yaml")
VIT = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two training steps of a tiny ViT + SimPool on 4 SyntheticShapes classes, through `simpool fit`."""
    root = tmp_path_factory.mktemp("fit")
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 1,
            "logger": False, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(root),
            "callbacks": [{"class_path": "pytorch_lightning.callbacks.ModelCheckpoint",
                           "init_args": {"dirpath": str(root / "checkpoints"), "filename": "last"}}],
        },
        "model": {"class_path": "simpool_lightning.models.ImageClassifier",
                  "init_args": {"backbone": "vit_tiny_patch16_224", "backbone_kwargs": VIT, "num_classes": 4, "warmup_epochs": 0}},
        "data": {"class_path": "simpool_lightning.data.SyntheticShapesDataModule",
                 "init_args": {"num_classes": 4, "image_size": 32, "train_size": 32, "val_size": 16, "batch_size": 16}},
    }
    (root / "fit.yaml").write_text(yaml.safe_dump(config))
    main(["fit", "-c", str(root / "fit.yaml")])
    return root / "checkpoints" / "last.ckpt"


def photos(folder: Path) -> dict[str, tuple[int, int]]:
    """Fabricated images of every kind, and one corrupt file; name -> upright (width, height)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def rgb(width: int, height: int) -> Image.Image:
        return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))

    rgb(40, 30).save(folder / "rgb.jpg", quality=90)
    rgb(25, 50).convert("L").save(folder / "gray.png")
    Image.fromarray(rng.integers(0, 256, (33, 33, 4), dtype=np.uint8), "RGBA").save(folder / "rgba.png")
    rgb(36, 20).convert("P").save(folder / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 48 x 24, shown rotated a quarter turn clockwise: 24 x 48
    rgb(48, 24).save(folder / "rotated.jpg", exif=exif.tobytes())
    rgb(30, 20).save(folder / "photo.webp")
    Image.fromarray(np.full((20, 64), 50000, dtype=np.uint16)).save(folder / "deep.png")
    png = (folder / "gray.png").read_bytes()
    (folder / "corrupt.png").write_bytes(png[: len(png) // 2])
    (folder / "notes.txt").write_text("not an image: folders list image files only")
    return {"rgb": (40, 30), "gray": (25, 50), "rgba": (33, 33), "palette": (36, 20), "rotated": (24, 48),
            "photo": (30, 20), "deep": (64, 20)}


def rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def on_cpu_in(out: Path) -> list[str]:
    """One CPU process, everything written (outputs, the run's config.yaml) under ``out``."""
    return ["--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={out}",
            f"--prediction_writer.output_dir={out}"]


def predict(checkpoint: Path, folder: Path, out: Path, *overrides: str) -> None:
    main(["predict", "-c", PREDICT_IMAGES, f"--ckpt_path={checkpoint}", f"--data.init_args.paths={folder}",
          *on_cpu_in(out), *overrides])


def test_the_checkpoint_keeps_the_datamodules_class_names(checkpoint):
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["classes"] == list(SHAPE_NAMES[:4])
    assert ImageClassifier.load_from_checkpoint(checkpoint).classes == list(SHAPE_NAMES[:4])


def test_raise_names_the_corrupt_file(checkpoint, tmp_path):
    photos(tmp_path / "photos")
    with pytest.raises(BadImageError, match=r"corrupt\.png"):
        predict(checkpoint, tmp_path / "photos", tmp_path / "out")
    assert not (tmp_path / "out" / "predictions.csv").exists()


def test_skip_reports_it_and_every_other_image_gets_a_row_and_a_picture_of_its_size(checkpoint, tmp_path):
    expected = photos(tmp_path / "photos")
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match=r"1 unreadable image\(s\) skipped.*corrupt\.png"):
        predict(checkpoint, tmp_path / "photos", out, "--data.init_args.on_bad_image=skip")
    assert (out / "skipped.txt").read_text() == f"{tmp_path / 'photos' / 'corrupt.png'}\n"

    table = rows(out / "predictions.csv")
    assert sorted(Path(r["path"]).stem for r in table) == sorted(expected)
    assert all(Path(r["path"]).parent == tmp_path / "photos" for r in table)
    for row in table:
        assert row["top1_class"] in SHAPE_NAMES[:4] and row["attention"] == "SimPool's attention"
        picture = Image.open(out / row["overlay"])
        assert row["overlay"] == f"overlays/{Path(row['path']).stem}.png"
        assert picture.size == expected[Path(row["path"]).stem]  # the original's size, upright
        assert "SimPool's attention" in picture.text["Description"]
        pixels = np.asarray(picture)
        assert (pixels == np.asarray(CONTOUR_COLOR, dtype=np.uint8)).all(-1).any()  # a contour is drawn

    arrays = np.load(out / "predictions.npz")
    assert arrays["path"].tolist() == [r["path"] for r in table]
    assert arrays["attention"].shape == (len(table), 32, 32)  # the checkpoint's input size, read from it
    assert arrays["size"].tolist() == [list(expected[Path(p).stem][::-1]) for p in arrays["path"]]
    np.testing.assert_allclose(arrays["attention"].sum((1, 2)), 1.0, rtol=1e-5)


def test_class_names_come_from_the_checkpoint_not_the_data(checkpoint, tmp_path):
    renamed = tmp_path / "renamed.ckpt"
    saved = torch.load(checkpoint, weights_only=True)
    saved["classes"] = ["alpha", "beta", "gamma", "delta"]
    torch.save(saved, renamed)
    # Labelled prediction data whose own classes are the shape names: the checkpoint's names win.
    out = tmp_path / "out"
    main(["predict", f"--ckpt_path={renamed}", "--data=SyntheticShapesDataModule", "--data.init_args.num_classes=4",
          "--data.init_args.image_size=32", "--data.init_args.val_size=8", "--trainer.logger=false", *on_cpu_in(out),
          "--prediction_writer.save_overlays=true"])
    table = rows(out / "predictions.csv")
    assert len(table) == 8 and "path" not in table[0]
    for row in table:
        assert {row["label"], row["top1_class"], row["top4_class"]} <= {"alpha", "beta", "gamma", "delta"}
        # No files to read: the picture is the model's input, named by the image's index.
        assert row["overlay"] == f"overlays/{int(row['index']):06d}.png"
        assert Image.open(out / row["overlay"]).size == (32, 32)


def test_dino_and_token_models_say_which_map_they_show(tmp_path):
    photos(tmp_path / "photos")
    data = ImageFilesDataModule(str(tmp_path / "photos"), image_size=32, on_bad_image="skip", batch_size=4)
    token = ImageClassifier("vit_tiny_patch16_224", VIT, pool="token", num_classes=3)
    dino = DINO("resnet18", {"layers": [1, 1, 1, 1], "channels": [8, 16, 32, 64]}, out_dim=64, head_hidden_dim=32,
                head_bottleneck_dim=16)
    said = {token: "the last block's [CLS] attention, averaged over its 2 heads", dino: "SimPool's attention, of the teacher"}
    for model, words in said.items():
        out = tmp_path / type(model).__name__
        make_trainer(tmp_path, callbacks=[PredictionWriter(str(out))]).predict(model, data)
        table = rows(out / "predictions.csv")
        assert len(table) == 7 and {r["attention"] for r in table} == {words}
        assert ("top1_class" in table[0]) == isinstance(model, ImageClassifier)  # DINO has no classes
        assert all(words in Image.open(out / r["overlay"]).text["Description"] for r in table)
        assert all(r["top1_class"] in {"0", "1", "2"} for r in table if "top1_class" in r)  # no names: indices


def test_an_official_file_through_the_cli(tmp_path):
    official = tmp_path / "official.pth.tar"
    # vit_tiny's 3 heads: the head count is not in the weights, so the official file keeps timm's.
    export_official(ImageClassifier("vit_tiny_patch16_224", dict(VIT, embed_dim=48, num_heads=3), num_classes=5), official)
    photos(tmp_path / "photos")
    out = tmp_path / "out"
    main(["predict", "-c", PREDICT_IMAGES, f"--official={official}",
          f"--official_kwargs={json.dumps({'backbone': 'vit_tiny_patch16_224', 'pool_kwargs': {'gamma': None}})}",
          f"--data.init_args.paths={tmp_path / 'photos' / '*.png'}", "--data.init_args.on_bad_image=skip", *on_cpu_in(out)])
    table = rows(out / "predictions.csv")
    assert sorted(Path(r["path"]).name for r in table) == ["deep.png", "gray.png", "palette.png", "rgba.png"]
    assert all(r["top1_class"] in {str(i) for i in range(5)} for r in table)  # official files name no classes
    assert np.load(out / "predictions.npz")["attention"].shape[1:] == (32, 32)  # the ViT's own input size


def test_a_model_from_two_places_or_none_is_an_error(checkpoint, tmp_path):
    shutil.copy(checkpoint, tmp_path / "c.ckpt")
    with pytest.raises(ValueError, match="--official .* and a model from the config or --ckpt_path"):
        main(["predict", "-c", PREDICT_IMAGES, f"--ckpt_path={tmp_path / 'c.ckpt'}", f"--official={tmp_path / 'c.ckpt'}",
              f"--data.init_args.paths={tmp_path}", *on_cpu_in(tmp_path)])
    with pytest.raises(ValueError, match="no model"):
        main(["predict", "-c", PREDICT_IMAGES, f"--data.init_args.paths={tmp_path}", *on_cpu_in(tmp_path)])
