"""SyntheticShapes: determinism, annotations that agree with the pixels, the batch contract, learnability."""
from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy.stats import chi2_contingency
from torch import nn
from torch.utils.data import DataLoader

from simpool_lightning.data import SyntheticShapes, SyntheticShapesDataModule, collate_samples
from simpool_lightning.data.synthetic import MIN_IMAGE_SIZE, SHAPE_NAMES, _SHAPES, _unit_areas
from simpool_lightning.metrics.localization import MaskIoU

SIZE = 32


def _data(num_samples: int = 64, **kwargs) -> SyntheticShapes:
    return SyntheticShapes(num_samples, **{"num_classes": 6, "image_size": SIZE, **kwargs})


# ----------------------------------------------------------------------------------- determinism


def test_same_seed_same_images_and_any_batching() -> None:
    a, b = _data(seed=3), _data(seed=3)
    batch_a, batch_b = collate_samples(a.__getitems__(list(range(20)))), collate_samples(b.__getitems__(list(range(20))))
    for key in ("image", "label", "mask"):
        assert torch.equal(batch_a[key], batch_b[key])
    # One at a time or in another batch: each image depends on its own index only.
    single = collate_samples([a[i] for i in (7, 2, 19)])
    assert torch.allclose(single["image"], batch_a["image"][[7, 2, 19]], atol=1e-5)
    assert torch.equal(single["mask"], batch_a["mask"][[7, 2, 19]])


def test_seed_and_split_change_the_images() -> None:
    base = collate_samples(_data(seed=0).__getitems__(list(range(8))))["image"]
    for other in (_data(seed=1), _data(seed=0, split="val"), _data(seed=0, split="test")):
        images = collate_samples(other.__getitems__(list(range(8))))["image"]
        assert (images - base).abs().mean() > 0.1


def test_same_images_in_worker_processes() -> None:
    data = _data(16, seed=5)
    expected = collate_samples(data.__getitems__(list(range(16))))
    loader = DataLoader(data, batch_size=4, num_workers=2, collate_fn=collate_samples)
    images = torch.cat([batch["image"] for batch in loader])
    assert torch.allclose(images, expected["image"], atol=1e-5)


# ----------------------------------------------------------------------------------- annotations


def _mask_box(mask: torch.Tensor) -> list[float]:
    rows, cols = mask.any(1).nonzero()[:, 0], mask.any(0).nonzero()[:, 0]
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def test_box_is_the_tight_box_of_the_mask() -> None:
    batch = collate_samples(_data(48, num_classes=10).__getitems__(list(range(48))))
    for mask, boxes in zip(batch["mask"], batch["boxes"]):
        assert mask.any()
        assert boxes.shape == (1, 4)
        assert boxes[0].tolist() == _mask_box(mask)


@pytest.mark.parametrize("polarity", ["light", "dark", "either"])
def test_mask_covers_the_drawn_object_of_the_polarity(polarity: str) -> None:
    data = _data(32, polarity=polarity, background_contrast=0.0, num_distractors=0)
    images, masks, _ = data.render(range(32))
    lighter = []
    for image, mask in zip(images, masks):
        inside, outside = np.median(image[:, mask], 1), np.median(image[:, ~mask], 1)
        # A flat background and an object of one colour (shading and noise aside), clearly apart.
        assert np.all(np.abs(inside - outside) > 0.2)
        assert image[:, mask].std(1).max() < 0.12
        lighter.append(bool(np.all(inside > outside)))
    expected = {"light": [True], "dark": [False], "either": [False, True]}[polarity]
    assert sorted(set(lighter)) == expected


def test_horizontal_flip_moves_image_mask_and_box_together() -> None:
    plain, flipped = _data(16), _data(16, hflip=1.0)
    a, b = collate_samples(plain.__getitems__(list(range(16)))), collate_samples(flipped.__getitems__(list(range(16))))
    assert torch.equal(b["image"], a["image"].flip(-1))
    assert torch.equal(b["mask"], a["mask"].flip(-1))
    for mask, box_a, box_b in zip(b["mask"], a["boxes"], b["boxes"]):
        x1, y1, x2, y2 = box_a[0].tolist()
        assert box_b[0].tolist() == [SIZE - x2, y1, SIZE - x1, y2] == _mask_box(mask)


def test_labels_balanced_and_cover_every_class() -> None:
    labels = collate_samples(_data(60, num_classes=6).__getitems__(list(range(60))))["label"]
    assert torch.bincount(labels, minlength=6).tolist() == [10] * 6


def test_neither_size_nor_colour_nor_position_tells_the_class() -> None:
    data = _data(600, num_classes=6, image_size=48)
    images, masks, labels = data.render(range(600))
    area = masks.sum((1, 2))
    colour = (images * masks[:, None]).sum((2, 3)) / area[:, None]
    rows = (masks.sum(2) * np.arange(48)).sum(1) / area
    for label in range(6):
        group = labels == label
        # Every shape has the same area at the same scale: mean areas within 15% of each other.
        assert abs(area[group].mean() / area.mean() - 1) < 0.15
        assert np.all(np.abs(colour[group].mean(0) - colour.mean(0)) < 0.04)
        assert abs(rows[group].mean() - 24) < 3


def test_shapes_have_equal_area_and_distinct_outlines() -> None:
    assert len(SHAPE_NAMES) >= 8
    t = (np.arange(400) + 0.5) / 100 - 2  # [-2, 2], 100 pixels per unit
    u, v = np.meshgrid(t, t)
    scales = np.sqrt(math.pi / _unit_areas())
    masks = np.stack([fn(u / k, v / k) for fn, k in zip(_SHAPES.values(), scales)])
    assert np.allclose(masks.sum((1, 2)) / 100**2, math.pi, rtol=0.02)  # each scaled to the unit disc's area
    overlap = (masks[:, None] & masks[None]).sum((2, 3)) / (masks[:, None] | masks[None]).sum((2, 3))
    np.fill_diagonal(overlap, 0)
    assert overlap.max() < 0.9


# -------------------------------------------------------------------------------- DataModule, errors


def test_datamodule_batches_follow_the_contract() -> None:
    dm = SyntheticShapesDataModule(num_classes=5, image_size=SIZE, train_size=40, val_size=20, seed=0, batch_size=8, num_workers=0)
    dm.setup("fit")
    assert dm.num_classes == 5 and dm.classes == list(SHAPE_NAMES[:5])
    for loader, size in ((dm.train_dataloader(), 8), (dm.val_dataloader(), 8), (dm.test_dataloader(), 8)):
        batch = next(iter(loader))
        assert batch["image"].shape == (size, 3, SIZE, SIZE) and batch["image"].dtype == torch.float32
        assert type(batch["image"]) is torch.Tensor
        assert batch["label"].shape == (size,) and batch["label"].dtype == torch.long
        assert batch["mask"].shape == (size, SIZE, SIZE) and batch["mask"].dtype == torch.bool
        assert len(batch["boxes"]) == size and all(b.shape == (1, 4) and b.dtype == torch.float32 for b in batch["boxes"])
    # Normalised like ImageNet: roughly zero mean, unit spread.
    images = next(iter(dm.val_dataloader()))["image"]
    assert abs(images.mean()) < 0.6 and 0.4 < images.std() < 1.6
    assert len(dm.train_set) == 40 and len(dm.val_set) == 20 and len(dm.test_set) == 20


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_classes": len(SHAPE_NAMES) + 1}, f"between 2 and {len(SHAPE_NAMES)}"),
        ({"num_classes": 1}, "between 2 and"),
        ({"image_size": MIN_IMAGE_SIZE - 1}, f"at least {MIN_IMAGE_SIZE} pixels"),
        ({"split": "holdout"}, "split must be one of train, val, test"),
        ({"polarity": "bright"}, "polarity must be 'light', 'dark' or 'either'"),
        ({"background_contrast": 1.5}, r"background_contrast must be in \[0, 1\]"),
        ({"num_distractors": -1}, "num_distractors"),
        ({"object_scale": (0.8, 0.4)}, "object_scale"),
        ({"num_samples": 0}, "num_samples must be positive"),
        ({"hflip": 1.5}, r"hflip must be a probability in \[0, 1\]"),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    kwargs = {"num_samples": 8, **kwargs}
    with pytest.raises(ValueError, match=message):
        SyntheticShapes(**kwargs)


def test_bad_datamodule_arguments_fail_at_construction() -> None:
    with pytest.raises(ValueError, match=f"num_classes must be between 2 and {len(SHAPE_NAMES)}"):
        SyntheticShapesDataModule(num_classes=len(SHAPE_NAMES) + 1, image_size=SIZE, train_size=8, val_size=8, seed=0, batch_size=4, num_workers=0)
    with pytest.raises(ValueError, match="hflip"):
        SyntheticShapesDataModule(4, SIZE, 8, 8, 0, 4, 0, hflip=2.0)
    with pytest.raises(IndexError, match="out of range"):
        _data(8)[8]


# ---------------------------------------------------------------------------------- learnability


class _TinyCNN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in ((3, 24), (24, 48), (48, 64)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean((2, 3)))


@pytest.fixture
def one_thread():
    # Tiny ops gain nothing from threads, and on a loaded machine each one would wait for a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_a_tiny_cnn_learns_the_shapes_quickly(one_thread: None) -> None:
    torch.manual_seed(0)
    dm = SyntheticShapesDataModule(num_classes=4, image_size=SIZE, train_size=2048, val_size=512, seed=0, batch_size=64, num_workers=0)
    model = _TinyCNN(4)
    steps = 150
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    start, step = time.perf_counter(), 0
    while step < steps:
        for batch in dm.train_dataloader():
            loss = nn.functional.cross_entropy(model(batch["image"]), batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            if step == steps:
                break
    model.eval()
    with torch.no_grad():
        correct = sum((model(b["image"]).argmax(1) == b["label"]).sum().item() for b in dm.val_dataloader())
    accuracy = correct / len(dm.val_set)
    print(f"tiny CNN: accuracy {accuracy:.3f} after {steps} steps, {time.perf_counter() - start:.1f} s")
    assert accuracy > 0.7, f"accuracy {accuracy:.2f} after {steps} steps; chance is 0.25"


# ------------------------------------------------------------------- where and how large (issue 17)

QUICKSTART = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"


def _quickstart_data() -> dict:
    """The quickstart's data settings, read from its config so that the bounds follow it."""
    return yaml.safe_load(QUICKSTART.read_text())["data"]["init_args"]


def _layout_statistics(masks: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """p-values of chi-square tests that the object's area and centre are independent of the class.

    Each quantity is cut into quartiles; the class-by-quartile contingency table is tested.
    """
    size = masks.shape[-1]
    area = masks.sum((1, 2))
    centre = np.arange(size) + 0.5
    cx = (masks.sum(1) * centre).sum(1) / area
    cy = (masks.sum(2) * centre).sum(1) / area
    p = {}
    for name, value in (("area", area), ("cx", cx), ("cy", cy), ("radius", np.hypot(cx - size / 2, cy - size / 2))):
        bins = np.digitize(value, np.quantile(value, [0.25, 0.5, 0.75]))
        table = np.zeros((labels.max() + 1, 4))
        np.add.at(table, (labels, bins), 1)
        p[name] = chi2_contingency(table).pvalue
    return p


def test_anywhere_layout_spreads_centre_and_area_as_specified_and_independent_of_the_class() -> None:
    settings = _quickstart_data()
    size, (lo, hi) = settings["image_size"], settings["object_scale"]
    data = SyntheticShapes(
        4000, num_classes=settings["num_classes"], image_size=size, seed=1, split="val",
        object_placement="anywhere", object_scale=(lo, hi), num_distractor_shapes=2, num_distractors=2,
    )
    _, masks, labels = data.render(range(len(data)))
    area = masks.sum((1, 2)) / size**2
    # The disc of equal area has a diameter of lo to hi times the side; the points of a shape that
    # leave the frame only take area away, and pixel rounding a little either way.
    assert np.quantile(area, 0.005) > 0.8 * math.pi / 4 * lo**2
    assert area.max() < 1.15 * math.pi / 4 * hi**2
    assert np.quantile(area, 0.5) > math.pi / 4 * lo**2 * 2  # the whole range is used, not its low end
    cx = (masks.sum(1) * (np.arange(size) + 0.5)).sum(1) / masks.sum((1, 2))
    # Anywhere: centres reach within a fifth of the side of both edges.
    assert np.quantile(cx, 0.01) < 0.2 * size and np.quantile(cx, 0.99) > 0.8 * size
    p = _layout_statistics(masks, labels)
    # At 4,000 samples a real dependence gives p-values below 1e-20 (see the next test).
    assert min(p.values()) > 1e-3, p


def test_the_independence_test_detects_the_inside_layout() -> None:
    # With the whole shape inside the frame, pointed shapes (larger outlines at equal area) sit
    # nearer the centre: the same statistics must see it, or the test above proves nothing.
    data = SyntheticShapes(4000, num_classes=4, image_size=48, seed=1, split="val", object_placement="inside", object_scale=(0.2, 0.5))
    _, masks, labels = data.render(range(len(data)))
    p = _layout_statistics(masks, labels)
    assert p["radius"] < 1e-20 and p["cx"] < 1e-10, p


def _no_image_maps(size: int) -> dict[str, torch.Tensor]:
    side = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(side, side, indexing="ij")
    maps = {"uniform": torch.ones(size, size)}
    for width in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0):
        maps[f"gaussian {width}"] = torch.exp(-(xx**2 + yy**2) / (2 * (width * size) ** 2))
    return maps


def test_maps_that_look_at_no_image_score_at_most_a_quarter_on_the_quickstart_validation_split() -> None:
    settings = _quickstart_data()
    dm = SyntheticShapesDataModule(**{**settings, "batch_size": 250})
    dm.setup("validate")
    masks = torch.cat([batch["mask"] for batch in dm.val_dataloader()])
    assert len(masks) == settings["val_size"]
    scores = {}
    for name, prior in _no_image_maps(settings["image_size"]).items():
        iou = MaskIoU(mass=0.6)
        iou.update((prior / prior.sum()).expand(len(masks), -1, -1), masks)
        scores[name] = float(iou.compute())
    assert max(scores.values()) <= 0.25, scores
    assert scores["uniform"] == pytest.approx(float(masks.float().mean()), abs=1e-6)  # keeps every pixel


def test_distractor_shapes_never_touch_the_object_and_are_drawn() -> None:
    # Distractors draw their random numbers after the object's, background's and bars': with and
    # without them those are the same, and pixels that differ by more than the sensor noise (whose
    # draws shift, +-0.03 each) are the distractors'.
    common = dict(num_classes=4, image_size=48, seed=2, object_placement="anywhere", object_scale=(0.2, 0.5))
    plain = SyntheticShapes(64, **common)
    cluttered = SyntheticShapes(64, num_distractor_shapes=2, **common)
    images_plain, masks_plain, _ = plain.render(range(64))
    images, masks, _ = cluttered.render(range(64))
    assert np.array_equal(masks, masks_plain)
    changed = np.abs(images - images_plain).max(1) > 0.061
    grown = torch.nn.functional.max_pool2d(torch.from_numpy(masks).float()[:, None], 3, stride=1, padding=1)[:, 0] > 0
    assert not (changed & grown.numpy()).any()
    assert changed.any((1, 2)).mean() > 0.9
    # Never larger than the object: two distractors cover at most twice its drawn area.
    assert np.all(changed.sum((1, 2)) <= 2 * 1.15 * math.pi / 4 * (0.5 * 48) ** 2)


def test_distractor_shapes_are_no_class() -> None:
    with pytest.raises(ValueError, match="needs shapes that are no class"):
        SyntheticShapes(8, num_classes=len(SHAPE_NAMES), num_distractor_shapes=1)
    with pytest.raises(ValueError, match="object_placement must be 'inside' or 'anywhere'"):
        SyntheticShapes(8, object_placement="centre")
    with pytest.raises(ValueError, match="num_distractor_shapes must be >= 0"):
        SyntheticShapes(8, num_distractor_shapes=-1)
    with pytest.raises(ValueError, match=r"distractor_scale must be .* \(relative to the object\)"):
        SyntheticShapes(8, distractor_scale=(0.5, 1.5))
