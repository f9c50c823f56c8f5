"""The `simpool` CLI on the quickstart config, shortened with overrides."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simpool_lightning.cli import main
from simpool_lightning.data.synthetic import SHAPE_NAMES

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")


def short(tmp_path: Path) -> list[str]:
    """Overrides that make the quickstart a few seconds long and write under tmp_path (its run folder)."""
    return [
        "-c", QUICKSTART,
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.limit_predict_batches=1",
        "--data.init_args.train_size=64",
        "--data.init_args.val_size=32",
        "--data.init_args.batch_size=16",
        "--data.init_args.num_workers=0",
        "--model.init_args.backbone_kwargs.depth=1",
    ]


def test_fit_validate_test_predict(tmp_path, capsys):
    main(["fit", *short(tmp_path)])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    assert ckpt.is_file()
    assert (tmp_path / "config.yaml").is_file()
    for command in ("validate", "test"):
        main([command, *short(tmp_path), f"--ckpt_path={ckpt}"])
    out = capsys.readouterr().out
    assert "val/acc1" in out and "test/acc1" in out and "test/mask_iou" in out

    preds = tmp_path / "preds"
    main(["predict", *short(tmp_path), f"--ckpt_path={ckpt}", f"--prediction_writer.output_dir={preds}"])
    arrays = np.load(preds / "predictions.npz")
    n = len(arrays["topk_classes"])
    size = 48  # the quickstart's image_size
    assert n > 0 and arrays["topk_classes"].shape == (n, 4) and arrays["attention"].shape == (n, size, size)
    np.testing.assert_allclose(arrays["attention"].sum((1, 2)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(arrays["topk_probs"].sum(1), 1.0, rtol=1e-4)  # all 4 classes
    rows = list(csv.DictReader(open(preds / "predictions.csv")))
    assert len(rows) == n
    assert {row["top1_class"] for row in rows} <= set(SHAPE_NAMES[:4])
    assert {row["label"] for row in rows} <= set(SHAPE_NAMES[:4])


def test_second_fit_continues_from_the_first_with_ckpt_path_last(tmp_path):
    main(["fit", *short(tmp_path)])  # one epoch of 2 steps
    main(["fit", *short(tmp_path), "--trainer.max_epochs=2", "--ckpt_path=last"])
    assert torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    # The second fit (its own TensorBoard event file, in the same run folder) trained and validated epoch 1 alone.
    first, second = sorted(tmp_path.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime)
    events = EventAccumulator(str(second))
    events.Reload()
    assert [e.value for e in events.Scalars("epoch")] == [1.0]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--model.init_args.lerning_rate=0.1", "lerning_rate"),
        ("--model.init_args.pool=simpoool", "unknown pool 'simpoool'"),
        ("--model.init_args.backbone=vit_does_not_exist", "unknown timm backbone 'vit_does_not_exist'"),
    ],
)
def test_bad_config_fails_before_training_naming_the_key(tmp_path, capsys, override, message):
    # jsonargparse reports unknown keys on stderr and exits; the model raises on bad values.
    with pytest.raises((SystemExit, ValueError)) as err:
        main(["fit", *short(tmp_path), override])
    assert message in capsys.readouterr().err + str(err.value)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained


def test_unknown_key_in_a_config_file_is_an_error(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    text = Path(QUICKSTART).read_text()
    assert "\ntrainer:\n" in text
    config.write_text(text.replace("\ntrainer:\n", "\ntrainer:\n  max_epoch: 3\n"))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code not in (0, None)
    assert "max_epoch" in capsys.readouterr().err
