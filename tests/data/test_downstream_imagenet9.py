"""ImageNet-9 variants and the ImageNet-1k -> ImageNet-9 map."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from simpool_lightning.data import IN9_CLASSES, IN9_VARIANTS, ImageNet9DataModule, in1k_to_in9_index, map_in1k_to_in9, predict_in9
from simpool_lightning.data.imagenet9 import IN1K_TO_IN9_GROUPS

from .downstream_files import write_corrupt, write_image

SIZE = 32
FOLDERS = [f"{i:02d}_{name}" for i, name in enumerate(IN9_CLASSES)]  # 00_dog .. 08_fish, as released


def make_in9(root: Path, variants: tuple[str, ...] = ("original", "mixed_rand"), per_class: int = 1) -> Path:
    for variant in variants:
        for folder in FOLDERS:
            for i in range(per_class):
                write_image(root / "bg_challenge" / variant / "val" / folder / f"n0000000{i}_{folder[:2]}.JPEG", (224, 224))
    return root / "bg_challenge"


def test_in9_labels_from_folders(tmp_path: Path) -> None:
    make_in9(tmp_path, per_class=2)
    dm = ImageNet9DataModule(str(tmp_path), variants="original", image_size=SIZE, batch_size=18)
    assert dm.classes == list(IN9_CLASSES) and dm.num_classes == 9
    dm.setup("test")
    loader = dm.test_dataloader()
    assert isinstance(loader, DataLoader)
    batch = next(iter(loader))
    assert batch["image"].shape == (18, 3, SIZE, SIZE)
    assert batch["label"].tolist() == [c for c in range(9) for _ in range(2)]


def test_in9_several_variants_give_several_loaders(tmp_path: Path) -> None:
    make_in9(tmp_path)
    dm = ImageNet9DataModule(str(tmp_path), variants=["mixed_rand", "original"], image_size=SIZE, batch_size=9)
    dm.setup()
    loaders = dm.test_dataloader()
    assert isinstance(loaders, list) and len(loaders) == 2 and len(dm.val_dataloader()) == 2
    assert [Path(s.path).parts[-4] for s in dm.variant_sets["mixed_rand"].samples][:1] == ["mixed_rand"]
    assert loaders[0].dataset is dm.variant_sets["mixed_rand"]
    assert ImageNet9DataModule(str(tmp_path), variants="all").variants == IN9_VARIANTS
    with pytest.raises(FileNotFoundError, match="only_fg"):
        ImageNet9DataModule(str(tmp_path), variants="all").setup()
    with pytest.raises(ValueError, match="variants"):
        ImageNet9DataModule(str(tmp_path), variants="mixed")


def test_in9_bad_folder_and_image(tmp_path: Path) -> None:
    base = make_in9(tmp_path, variants=("original",))
    bad = write_corrupt(base / "original" / "val" / "03_reptile" / "broken.JPEG")
    dm = ImageNet9DataModule(str(tmp_path), image_size=SIZE, batch_size=10, on_bad_image="skip")
    dm.setup()
    next(iter(dm.test_dataloader()))
    assert dm.skipped == [str(bad)]
    (base / "original" / "val" / "9_extra").mkdir()
    with pytest.raises(ValueError, match="9_extra"):
        ImageNet9DataModule(str(tmp_path)).setup()


def test_in1k_to_in9_groups() -> None:
    # Sizes and boundaries of the official in_to_in9.json (MadryLab/backgrounds_challenge).
    assert [len(g) for g in IN1K_TO_IN9_GROUPS] == [116, 52, 42, 36, 35, 27, 26, 20, 16]
    index = in1k_to_in9_index()
    assert index.shape == (1000,) and int((index >= 0).sum()) == 370
    assert len(set().union(*map(set, IN1K_TO_IN9_GROUPS))) == 370  # disjoint
    spots = {
        151: 0, 170: 0, 171: -1, 172: -1, 268: 0, 7: 1, 80: -1, 87: 1, 146: 1, 407: 2, 817: 2, 880: 2, 33: 3, 68: 3,
        269: 4, 281: -1, 299: 4, 356: 4, 388: 4, 300: 5, 326: 5, 401: 6, 889: 6, 365: 7, 384: 7, 0: 8, 6: 8, 397: 8,
        999: -1,
    }  # fmt: skip
    assert {k: int(index[k]) for k in spots} == spots


def test_map_and_predict_in9() -> None:
    logits = torch.full((3, 1000), -10.0)
    logits[0, 200] = 5.0  # a dog
    logits[1, 999] = 9.0  # toilet tissue: outside the nine ...
    logits[1, 300] = 8.0  # ... with an insect second
    logits[2, 0] = 3.0  # tench: fish
    logits[2, 100] = 2.0  # black swan: bird
    assert predict_in9(logits).tolist() == [0, -1, 8]
    assert map_in1k_to_in9(logits, "max").argmax(1).tolist() == [0, 5, 8]
    probs = map_in1k_to_in9(logits, "sum")
    assert probs.shape == (3, 9) and probs.argmax(1).tolist() == [0, 5, 8]
    full = logits.softmax(1)
    torch.testing.assert_close(probs[:, 0], full[:, list(IN1K_TO_IN9_GROUPS[0])].sum(1))
    assert (probs.sum(1) <= 1 + 1e-6).all()
    with pytest.raises(ValueError, match="1000"):
        predict_in9(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="reduction"):
        map_in1k_to_in9(logits, "mean")
