"""ImageNet data loading: this package's ``ImageNetDataModule`` against timm's own loader, side by side.

Both read the same fabricated JPEG tree (ImageFolder layout, ImageNet-sized images) with the
official recipe's augmentation: for training, random-resized crop with random bilinear / bicubic
interpolation, flip 0.5, RandAugment ``rand-m9-mstd0.5-inc1``, normalisation, random erasing 0.25
(pixel); for evaluation, resize to 256 (bicubic), center crop 224, normalisation. The timm side is
``timm.data.ImageDataset`` + ``create_loader`` (which builds ``create_transform``) as ``train.py``
runs it on a CPU (``use_prefetcher=False``). Both decode every image fully with PIL.

The loaders take turns epoch by epoch for ``--rounds`` rounds, in alternating order, after one
warm-up epoch each (worker start-up, page cache); printed: the median images/s of each and the
median of the per-round ratios (package / timm, above 1 is faster). A second table times the JPEG
decode alone, PIL against ``torchvision.io.decode_jpeg``.

    python benchmarks/data_pipeline.py                       # fabricates a tree in a temp folder
    python benchmarks/data_pipeline.py --root /path/to/tree  # an existing ImageFolder tree (train/, val/)
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import timm
import torch
import torchvision
from PIL import Image
from timm.data import ImageDataset, create_loader
from timm.data.auto_augment import RandAugment
from torchvision.io import decode_jpeg, read_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simpool_lightning.data import ImageNetDataModule  # noqa: E402
from simpool_lightning.data.io import load_rgb  # noqa: E402
from simpool_lightning.data.transforms import posterize  # noqa: E402

POLICY = "rand-m9-mstd0.5-inc1"
RE_PROB = 0.25


def fabricate_tree(root: Path, classes: int, train_per_class: int, val_per_class: int, seed: int = 0) -> None:
    """JPEGs (quality 90, about 80 KB) of 400-500 x 300-400 pixels, ImageNet's typical size, with texture at
    several scales so that they compress (and decode) like photographs rather than flat colour."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                w, h = int(rng.integers(400, 501)), int(rng.integers(300, 401))
                image = np.zeros((h, w, 3), np.float32)
                for cell, weight in ((64, 1.0), (16, 0.5), (4, 0.25)):
                    coarse = rng.random((h // cell + 2, w // cell + 2, 3), dtype=np.float32)
                    up = Image.fromarray((coarse * 255).astype(np.uint8)).resize(
                        (coarse.shape[1] * cell, coarse.shape[0] * cell), Image.Resampling.BICUBIC
                    )
                    image += weight * np.asarray(up, np.float32)[:h, :w] / 1.75
                image += rng.normal(0.0, 16.0, image.shape).astype(np.float32)
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(folder / f"{i:05d}.JPEG", quality=90)


def package_loader(root: Path, train: bool, workers: int, batch: int) -> Iterable[Any]:
    dm = ImageNetDataModule(
        str(root), batch_size=batch, num_workers=workers, auto_augment=POLICY, re_prob=RE_PROB
    )
    dm.setup("fit")
    return dm.train_dataloader() if train else dm.val_dataloader()


def timm_loader(root: Path, train: bool, workers: int, batch: int) -> Iterable[Any]:
    dataset = ImageDataset(str(root / ("train" if train else "val")))
    options: dict[str, Any] = dict(auto_augment=POLICY, re_prob=RE_PROB, re_mode="pixel") if train else {}
    loader = create_loader(
        dataset,
        input_size=(3, 224, 224),
        batch_size=batch,
        is_training=train,
        interpolation="random" if train else "bicubic",
        crop_pct=0.875,
        num_workers=workers,
        use_prefetcher=False,
        device=torch.device("cpu"),
        **options,
    )
    # timm 1.0's RandAugment stops on Pillow 13 at 0-bit posterize: give it the package's fix, so
    # both do the same work.
    for op in (op for t in dataset.transform.transforms if isinstance(t, RandAugment) for op in t.ops):
        if op.name.startswith("Posterize"):
            op.aug_fn = posterize
    return loader


def images(batch: Any) -> torch.Tensor:
    return batch["image"] if isinstance(batch, dict) else batch[0]


def epoch_rate(loader: Iterable[Any]) -> float:
    """Images per second over one full pass."""
    start, count = time.perf_counter(), 0
    for batch in loader:
        count += images(batch).shape[0]
    return count / (time.perf_counter() - start)


def compare(
    name: str, make: dict[str, Callable[[], Iterable[Any]]], rounds: int
) -> tuple[str, dict[str, float], float]:
    loaders = {key: build() for key, build in make.items()}
    for loader in loaders.values():
        epoch_rate(loader)  # warm-up: workers, page cache, first-call costs
    rates: dict[str, list[float]] = {key: [] for key in loaders}
    ratios = []
    for r in range(rounds):
        order = list(loaders) if r % 2 == 0 else list(reversed(loaders))
        now = {key: epoch_rate(loaders[key]) for key in order}
        for key, rate in now.items():
            rates[key].append(rate)
        ratios.append(now["package"] / now["timm"])
        print(f"  {name} round {r}: " + ", ".join(f"{k} {v:.1f}/s" for k, v in now.items()), flush=True)
    del loaders  # ends persistent workers before the next configuration starts its own
    return name, {key: statistics.median(v) for key, v in rates.items()}, statistics.median(ratios)


def decode_rates(files: list[str], rounds: int) -> tuple[float, float, bool]:
    """Images/s of PIL's full decode (what both loaders do) and of torchvision's decode_jpeg, interleaved;
    and whether the two decoders give identical pixels on every file."""
    pil, tv = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for f in files:
            load_rgb(f)
        pil.append(len(files) / (time.perf_counter() - start))
        start = time.perf_counter()
        for f in files:
            decode_jpeg(read_file(f))
        tv.append(len(files) / (time.perf_counter() - start))
    same = all(
        torch.equal(torch.from_numpy(np.asarray(load_rgb(f))).permute(2, 0, 1), decode_jpeg(read_file(f))) for f in files
    )
    return statistics.median(pil), statistics.median(tv), same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an ImageFolder tree with train/ and val/ (default: fabricate one)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--val-per-class", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--only", choices=["train", "eval"], help="time one split only")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            fabricate_tree(root, args.classes, args.train_per_class, args.val_per_class)
        cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor())
        print(
            f"{cpu}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}, "
            f"torchvision {torchvision.__version__}, timm {timm.__version__}, Pillow {Image.__version__}, "
            f"{torch.get_num_threads()} torch threads; batch {args.batch}"
        )
        results = []
        for split in ("train", "eval"):
            if args.only and split != args.only:
                continue
            for workers in args.workers:
                train = split == "train"
                make = {
                    "package": lambda: package_loader(root, train, workers, args.batch),
                    "timm": lambda: timm_loader(root, train, workers, args.batch),
                }
                results.append(compare(f"{split}, {workers} workers", make, args.rounds))
        files = sorted(str(p) for p in (root / "val").rglob("*.JPEG"))[:200]
        pil, tv, same = decode_rates(files, args.rounds)
        print(f"load average after: {os.getloadavg()[0]:.1f}\n")
        print("| loader | package images/s | timm images/s | package / timm |")
        print("|---|---|---|---|")
        for name, rates, ratio in results:
            print(f"| {name} | {rates['package']:.1f} | {rates['timm']:.1f} | {ratio:.3f}x |")
        print("\n| JPEG decode alone | PIL images/s | torchvision decode_jpeg images/s | ratio | same pixels |")
        print("|---|---|---|---|---|")
        print(f"| {len(files)} files | {pil:.1f} | {tv:.1f} | {tv / pil:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
