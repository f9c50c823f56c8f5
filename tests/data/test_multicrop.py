"""MultiCropTransform (DINO's augmentations), the collate of crop lists, and the DataModules' multi-crop option."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from simpool_lightning.data import (
    ImageNetDataModule,
    MultiCropTransform,
    PILGaussianBlur,
    SyntheticShapes,
    SyntheticShapesDataModule,
    collate_samples,
)
from simpool_lightning.evaluation import reference_split


def pil_image(h: int = 60, w: int = 80, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))


@pytest.mark.parametrize("kind", ["pil", "uint8", "float"])
def test_crops_from_any_image_kind(kind):
    image = pil_image()
    if kind != "pil":
        image = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        image = image if kind == "uint8" else image / 255.0
    transform = MultiCropTransform(local_crops_number=3, global_size=32, local_size=16)
    sample = {"image": image, "label": 3, "mask": torch.zeros(60, 80, dtype=torch.bool), "boxes": torch.zeros(1, 4)}
    out = transform(sample)
    assert [tuple(c.shape) for c in out["image"]] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    assert all(type(c) is torch.Tensor and c.dtype == torch.float32 for c in out["image"])
    # Normalised with the ImageNet statistics: values leave [0, 1].
    assert min(c.min().item() for c in out["image"]) < 0
    assert out["label"] == 3 and "mask" not in out and "boxes" not in out  # annotations fit no crop


def test_dino_recipe_per_view():
    transform = MultiCropTransform(global_crops_scale=(0.14, 1.0), local_crops_scale=(0.05, 0.14))

    def ops(view: v2.Compose, kind: type) -> list:
        found = []
        for op in view.transforms:
            inner = op.transforms if isinstance(op, v2.RandomApply) else [op]
            found += [(op, t) for t in inner if isinstance(t, kind)]
        return found

    for view, scale, size in ((transform.global_1, (0.14, 1.0), 224), (transform.global_2, (0.14, 1.0), 224), (transform.local, (0.05, 0.14), 96)):
        (_, crop), = ops(view, v2.RandomResizedCrop)
        assert tuple(crop.scale) == scale and tuple(crop.size) == (size, size)
        (apply, jitter), = ops(view, v2.ColorJitter)
        assert apply.p == 0.8 and jitter.brightness == (0.6, 1.4) and jitter.hue == (-0.1, 0.1)
        (_, gray), = ops(view, v2.RandomGrayscale)
        assert gray.p == 0.2
    assert [ops(v, PILGaussianBlur)[0][0].p for v in (transform.global_1, transform.global_2, transform.local)] == [1.0, 0.1, 0.5]
    assert all(ops(v, PILGaussianBlur)[0][1].radius == (0.1, 2.0) for v in (transform.global_1, transform.global_2, transform.local))
    # Solarisation on the second global crop only.
    assert [len(ops(v, v2.RandomSolarize)) for v in (transform.global_1, transform.global_2, transform.local)] == [0, 1, 0]
    assert ops(transform.global_2, v2.RandomSolarize)[0][1].p == 0.2


def test_colour_jitter_and_blur_radius_for_small_images():
    # Every view takes them; a full hue jitter and a radius scaled to a 32 px crop (the quickstart).
    transform = MultiCropTransform(local_crops_number=1, global_size=32, local_size=16, color_jitter=(0.3, 0.2, 0.4, 0.5), blur_radius=(0.02, 0.3))
    for view in (transform.global_1, transform.global_2, transform.local):
        (jitter,) = [t for op in view.transforms if isinstance(op, v2.RandomApply) for t in op.transforms if isinstance(t, v2.ColorJitter)]
        assert jitter.brightness == (0.7, 1.3) and jitter.contrast == (0.8, 1.2) and jitter.saturation == (0.6, 1.4) and jitter.hue == (-0.5, 0.5)
        (blur,) = [t for op in view.transforms if isinstance(op, v2.RandomApply) for t in op.transforms if isinstance(t, PILGaussianBlur)]
        assert blur.radius == (0.02, 0.3)
    # The radius is in output pixels: DINO's 2 px on a 32 px crop wipes out a thin bar, 0.3 px keeps it.
    bar = Image.new("RGB", (32, 32))
    bar.paste((255, 255, 255), (15, 0, 17, 32))
    peak = {r: np.asarray(PILGaussianBlur((r, r))(bar))[:, 15:17].max() for r in (0.3, 2.0)}
    assert peak[0.3] > 230 and peak[2.0] < 120, peak
    with pytest.raises(ValueError, match="color_jitter"):
        MultiCropTransform(color_jitter=(0.4, 0.4, 0.2, 0.7))
    with pytest.raises(ValueError, match="blur_radius"):
        MultiCropTransform(blur_radius=(2.0, 0.1))


def test_random_per_call_and_reproducible_from_torch_seed():
    transform = MultiCropTransform(local_crops_number=2, global_size=24, local_size=12)
    image = pil_image()
    torch.manual_seed(1)
    first = transform.crops(image)
    torch.manual_seed(1)
    again = transform.crops(image)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], transform.crops(image)[0])


def test_bad_input_is_named():
    transform = MultiCropTransform(local_crops_number=0, global_size=16, local_size=8)
    assert len(transform({"image": pil_image()})["image"]) == 2
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        transform({"image": torch.rand(8, 8)})
    with pytest.raises(KeyError, match="'image'"):
        transform({"label": 0})
    with pytest.raises(ValueError, match="local_crops_scale"):
        MultiCropTransform(local_crops_scale=(0.5, 0.2))


def test_collate_stacks_crops_by_index_and_keeps_tensor_behaviour():
    transform = MultiCropTransform(local_crops_number=2, global_size=24, local_size=12)
    samples = [transform({"image": pil_image(seed=i), "label": i}) for i in range(3)]
    batch = collate_samples(samples)
    assert isinstance(batch["image"], list) and [tuple(c.shape) for c in batch["image"]] == [(3, 3, 24, 24)] * 2 + [(3, 3, 12, 12)] * 2
    assert torch.equal(batch["image"][3][1], samples[1]["image"][3])
    assert batch["label"].tolist() == [0, 1, 2]
    plain = collate_samples([{"image": torch.zeros(3, 4, 4), "label": 0}, {"image": torch.ones(3, 4, 4), "label": 1}])
    assert plain["image"].shape == (2, 3, 4, 4)
    with pytest.raises(ValueError, match="different numbers of 'image'"):
        collate_samples([samples[0], {**samples[1], "image": samples[1]["image"][:3]}])


class PILDataset(Dataset):
    def __init__(self, transform: MultiCropTransform) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> dict:
        return self.transform({"image": pil_image(seed=i), "label": i})


def test_in_a_dataloader_worker():
    transform = MultiCropTransform(local_crops_number=2, global_size=24, local_size=12)
    loader = DataLoader(PILDataset(transform), batch_size=4, num_workers=1, collate_fn=collate_samples)
    batch = next(iter(loader))
    assert len(batch["image"]) == 4 and batch["image"][0].shape == (4, 3, 24, 24) and batch["image"][2].shape == (4, 3, 12, 12)


def test_synthetic_shapes_multi_crop_option():
    crops = MultiCropTransform(local_crops_number=2, global_size=32, local_size=16)
    data = SyntheticShapesDataModule(image_size=32, train_size=8, val_size=4, batch_size=4, multi_crop=crops)
    batch = next(iter(data.train_dataloader()))
    assert sorted(batch) == ["image", "label"] and [tuple(c.shape) for c in batch["image"]] == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 2
    assert next(iter(data.val_dataloader()))["image"].shape == (4, 3, 32, 32)  # evaluation keeps whole images
    # k-NN references: the training split without flip or multi-crop, exactly the plain images.
    references, _ = reference_split(data)
    assert references.multi_crop is None and references.hflip == 0 and data.train_set.multi_crop is crops
    plain = SyntheticShapes(8, image_size=32, seed=0)
    assert torch.equal(references[3]["image"], plain[3]["image"])


def test_imagenet_multi_crop_option(tmp_path):
    for split, count in (("train", 2), ("val", 1)):
        for name in ("a", "b"):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                pil_image(40, 50, seed=i).save(tmp_path / split / name / f"{i}.png")
    crops = MultiCropTransform(local_crops_number=1, global_size=24, local_size=12)
    data = ImageNetDataModule(str(tmp_path), image_size=24, batch_size=4, num_workers=0, multi_crop=crops)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    assert [tuple(c.shape) for c in batch["image"]] == [(4, 3, 24, 24)] * 2 + [(4, 3, 12, 12)]
    assert next(iter(data.val_dataloader()))["image"].shape == (2, 3, 24, 24)
    references, _ = reference_split(data)
    assert references.transform is data.eval_transform and references[0]["image"].shape == (3, 24, 24)
