"""AttentionMapLogger: the fixed image set, PNG files, TensorBoard images, W&B, no-attention models, DDP."""
from __future__ import annotations

import os
import warnings
from types import SimpleNamespace
from unittest import mock

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from simpool_lightning.callbacks import AttentionMapLogger, denormalize, plot_attention
from simpool_lightning.data import SyntheticShapesDataModule
from simpool_lightning.models import ImageClassifier
from tests.trainers import trainer as make_trainer

VIT_KWARGS = dict(img_size=32, patch_size=8, depth=2, embed_dim=64, num_heads=2)


def tiny_model(pool: str = "simpool") -> ImageClassifier:
    return ImageClassifier("vit_tiny_patch16_224", VIT_KWARGS, pool=pool, num_classes=4, warmup_epochs=0)


def tiny_data() -> SyntheticShapesDataModule:
    return SyntheticShapesDataModule(num_classes=4, image_size=32, train_size=16, val_size=12, batch_size=4)


def fit(root: str, callbacks: list[pl.Callback], pool: str = "simpool", epochs: int = 2, **trainer_kwargs) -> pl.Trainer:
    pl.seed_everything(0)
    trainer_kwargs.setdefault("logger", TensorBoardLogger(root, name="", version=0))
    trainer = make_trainer(
        root, max_epochs=epochs, limit_train_batches=2, num_sanity_val_steps=1, callbacks=callbacks, **trainer_kwargs
    )
    trainer.fit(tiny_model(pool), tiny_data())
    return trainer


def test_fit_writes_pngs_and_tensorboard_images(tmp_path):
    every = AttentionMapLogger(num_images=6)  # 6 images span two validation batches of 4
    second = AttentionMapLogger(every_n_epochs=2, num_images=2, save_png=False, tag="val/every_second")
    trainer = fit(str(tmp_path), [every, second])

    log_dir = trainer.log_dir
    assert sorted(os.listdir(os.path.join(log_dir, "attention_maps"))) == ["epoch=000.png", "epoch=001.png"]

    events = EventAccumulator(log_dir, size_guidance={"images": 0})
    events.Reload()
    assert {"val/attention_maps", "val/every_second"} <= set(events.Tags()["images"])
    steps_per_epoch = 2
    assert [e.step for e in events.Images("val/attention_maps")] == [steps_per_epoch, 2 * steps_per_epoch]
    assert [e.step for e in events.Images("val/every_second")] == [2 * steps_per_epoch]
    image = events.Images("val/attention_maps")[0]
    assert image.width > image.height > 0  # one column per image, three rows

    # The fixed set: the first 6 validation images, although the sanity check saw only 4 of them.
    first = torch.stack([tiny_data().val_set[i]["image"] for i in range(6)])
    torch.testing.assert_close(torch.cat(every._images), first)
    assert torch.cat(every._masks).shape == (6, 32, 32)


def test_pngs_without_an_image_logger(tmp_path):
    trainer = fit(str(tmp_path), [AttentionMapLogger(num_images=2, image_size=48)], epochs=1, logger=CSVLogger(str(tmp_path), name=""))
    assert os.listdir(os.path.join(trainer.log_dir, "attention_maps")) == ["epoch=000.png"]


def test_pool_without_attention_warns_once_and_writes_nothing(tmp_path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = fit(str(tmp_path), [AttentionMapLogger(num_images=2)], pool="avg")
    ours = [w for w in caught if "AttentionMapLogger" in str(w.message)]
    assert len(ours) == 1 and "'avg'" in str(ours[0].message)
    assert not os.path.exists(os.path.join(trainer.log_dir, "attention_maps"))


def test_wandb_logger_gets_the_figure(tmp_path):
    """Without wandb installed: a stand-in that passes isinstance(WandbLogger); log_image is Lightning's
    public API, which wraps the arrays in wandb.Image itself."""
    wandb_logger = mock.create_autospec(WandbLogger, instance=True)
    callback = AttentionMapLogger(save_png=False)
    fig = plot_attention(torch.rand(2, 3, 16, 16), torch.rand(2, 16, 16), gt_masks=torch.rand(2, 16, 16) > 0.5)
    trainer = SimpleNamespace(loggers=[wandb_logger], global_step=7, current_epoch=0, default_root_dir=str(tmp_path))
    callback._write(trainer, fig)
    wandb_logger.log_image.assert_called_once()
    kwargs = wandb_logger.log_image.call_args.kwargs
    assert kwargs["key"] == "val/attention_maps" and kwargs["step"] == 7
    (array,) = kwargs["images"]
    assert isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.shape[2] == 3


def test_plot_attention_compares_named_maps():
    images, maps = torch.rand(3, 3, 16, 16), torch.rand(3, 16, 16)
    fig = plot_attention(images, {"[CLS]": maps, "SimPool": maps}, titles=["a", "b", "c"])
    assert len(fig.axes) == 5 * 3  # image row + two rows per set of maps
    with pytest.raises(ValueError, match="SimPool"):
        plot_attention(images, {"SimPool": maps[:, :8]})


def test_denormalize_inverts_normalize():
    rgb = torch.rand(2, 3, 4, 4)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    normalized = (rgb - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    torch.testing.assert_close(denormalize(normalized, mean, std), rgb)


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(every_n_epochs=0), "every_n_epochs"), (dict(mass=0.0), "mass"), (dict(mean=(0.5,) * 3), "both")],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AttentionMapLogger(**kwargs)


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_ddp_two_processes_do_not_stall(tmp_path):
    """Two CPU processes: every rank computes maps, rank 0 alone writes, and the run ends."""
    trainer = fit(str(tmp_path), [AttentionMapLogger(num_images=2)], strategy="ddp_fork", devices=2)
    assert sorted(os.listdir(os.path.join(trainer.log_dir, "attention_maps"))) == ["epoch=000.png", "epoch=001.png"]
