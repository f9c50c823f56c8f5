"""KNNEvaluator and KNNCallback: references from the training split without its augmentation, any process count.

The vote itself is checked by hand in test_knn.py; here the Lightning plumbing around it.
"""
from __future__ import annotations

from typing import Callable, Optional

import pytest
import pytorch_lightning as pl
import torch
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from simpool_lightning.data import BaseDataModule, collate_samples
from simpool_lightning.evaluation import KNNCallback, KNNEvaluator, extract_features, reference_split


class Clusters(Dataset):
    """"Images" whose first pixels hold a noisy class code: class c sits near 4 * e_c. ``transform``
    applies to the image, as a training augmentation would."""

    def __init__(self, n: int, seed: int, transform: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        g = torch.Generator().manual_seed(seed)
        self.labels = torch.arange(n) % 4
        self.images = torch.randn(n, 3, 4, 4, generator=g)
        self.images.view(n, -1)[torch.arange(n), self.labels] += 4.0
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        image = self.images[i] if self.transform is None else self.transform(self.images[i])
        return {"image": image, "label": int(self.labels[i])}


def scramble(image: Tensor) -> Tensor:
    """A training "augmentation" that destroys the class code: k-NN references must not see it."""
    return torch.randn_like(image)


class ClusterData(BaseDataModule):
    def __init__(self) -> None:
        super().__init__(batch_size=32)
        self.train_set = Clusters(200, 0, transform=scramble)
        self.val_set = Clusters(100, 1)


class Informative(nn.Module):
    """Features that keep the class code."""

    feature_dim = 48

    def features(self, images: Tensor) -> Tensor:
        return images.flatten(1)


class Uninformative(nn.Module):
    """Features that drop it: only the last pixels, pure noise."""

    feature_dim = 8

    def features(self, images: Tensor) -> Tensor:
        return images.flatten(1)[:, -8:]


def quiet_trainer(**kw) -> pl.Trainer:
    args = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    return pl.Trainer(**{**args, **kw})


def knn_validate(model: nn.Module, **kw) -> dict[str, float]:
    trainer = quiet_trainer()
    trainer.validate(KNNEvaluator(model, k=20, temperature=0.07, **kw), datamodule=ClusterData())
    return {k: float(v) for k, v in trainer.callback_metrics.items()}


def test_knn_separates_informative_from_uninformative_features():
    good = knn_validate(Informative(), num_classes=4)
    bad = knn_validate(Uninformative())  # num_classes from the labels
    # 1.0 also says that the references came without the training transform, which scrambles them.
    assert good["knn/acc1"] == 1.0 and "knn/acc4" not in good and "knn/acc5" not in good  # top-5 of 4 classes says nothing
    assert bad["knn/acc1"] < 0.45  # chance is 0.25


def test_reference_split_takes_the_validation_transform():
    data = ClusterData()
    references, _ = reference_split(data)
    assert references.transform is None and data.train_set.transform is scramble  # a copy, the DataModule untouched
    features, labels = extract_features(Informative().features, references, data.val_dataloader(), torch.device("cpu"))
    assert features.shape == (200, 48) and torch.equal(labels, data.train_set.labels)


def test_validate_needs_a_datamodule():
    with pytest.raises(RuntimeError, match="needs a DataModule"):
        quiet_trainer().validate(KNNEvaluator(Informative()), DataLoader(Clusters(8, 1), 8, collate_fn=collate_samples))


class Trainable(pl.LightningModule):
    """A model in training whose features are informative; the callback scores it."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def features(self, images: Tensor) -> Tensor:
        assert not self.training  # the callback extracts in eval mode
        return images.flatten(1) * self.scale

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        return (self.scale - 1) ** 2

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_callback_scores_the_model_in_training():
    model = Trainable()
    logged: dict[int, float] = {}

    class Epochs(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            if "knn/acc1" in trainer.callback_metrics:
                logged[trainer.current_epoch] = float(trainer.callback_metrics.pop("knn/acc1"))

    trainer = quiet_trainer(max_epochs=3, limit_val_batches=0, callbacks=[KNNCallback(every_n_epochs=2), Epochs()])
    trainer.fit(model, datamodule=ClusterData())
    assert logged == {1: 1.0, 2: 1.0}  # every 2nd epoch and the last; references without the scrambling
    assert model.training  # back in training mode


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_two_processes_give_the_single_process_accuracy():
    # Each process extracts half the references; the gathered set must give the votes of one process.
    single = knn_validate(Uninformative(), num_classes=4)
    trainer = quiet_trainer(strategy="ddp_fork", devices=2)
    trainer.validate(KNNEvaluator(Uninformative(), num_classes=4), datamodule=ClusterData())
    assert float(trainer.callback_metrics["knn/acc1"]) == pytest.approx(single["knn/acc1"])


@pytest.mark.slow
def test_knn_of_a_briefly_trained_checkpoint_beats_random_initialisation(tmp_path):
    # The CLI path on a real checkpoint: a briefly trained classifier's features, loaded by class
    # path, against the same network untrained. (DINO's own recipe against random features:
    # tests/models/test_dino.py::test_briefly_trained_dino_beats_random_initialisation_in_knn.)
    from simpool_lightning.data import SyntheticShapesDataModule
    from simpool_lightning.models import ImageClassifier

    vit = dict(img_size=32, patch_size=4, depth=2, embed_dim=64, num_heads=2)
    kwargs = dict(backbone="vit_tiny_patch16_224", backbone_kwargs=vit, num_classes=4, lr=2e-3, warmup_epochs=0.2)
    data = SyntheticShapesDataModule(image_size=32, train_size=1500, val_size=500, batch_size=50)
    torch.manual_seed(0)
    model = ImageClassifier(**kwargs)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="classifier")
    trainer = quiet_trainer(max_epochs=3, enable_checkpointing=True, callbacks=[ckpt], limit_val_batches=0)
    trainer.fit(model, datamodule=data)

    def knn(checkpoint):
        torch.manual_seed(0)
        run = quiet_trainer()
        evaluator = KNNEvaluator("simpool_lightning.models.ImageClassifier", checkpoint, model_kwargs=None if checkpoint else kwargs)
        run.validate(evaluator, datamodule=data, verbose=False)
        return float(run.callback_metrics["knn/acc1"])

    trained, untrained = knn(ckpt.best_model_path), knn(None)
    assert trained > untrained + 0.1, (trained, untrained)  # measured: 0.42 against 0.28
