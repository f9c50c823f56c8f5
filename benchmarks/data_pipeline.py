"""ImageNet data loading: this package's ``ImageNetDataModule`` against timm's own loader, side by side.

Both read the same fabricated JPEG tree (ImageFolder layout, ImageNet-sized images) with the
official recipe's augmentation: for training, random-resized crop with random bilinear / bicubic
interpolation, flip 0.5, RandAugment ``rand-m9-mstd0.5-inc1``, normalisation, random erasing 0.25
(pixel); for evaluation, resize to 256 (bicubic), center crop 224, normalisation. The timm side is
``timm.data.ImageDataset`` + ``create_loader`` (which builds ``create_transform``) as ``train.py``
runs it on a CPU (``use_prefetcher=False``). Both decode every image fully with PIL.

The machine may be shared, so the loaders take turns: batch by batch when loading in-process
(0 workers), epoch by epoch in alternating order with worker processes, for ``--rounds`` epochs
after one warm-up epoch each (worker start-up, page cache). Printed for each: images/s (wall) and
CPU milliseconds per image (this process and the loader's workers, from ``/proc``), and the ratios
(above 1: the package is faster). Wall time is what training waits for; CPU time is the work done,
and moves much less with the load of other processes. A second table times the JPEG decode alone,
PIL against ``torchvision.io.decode_jpeg``, file by file.

    python benchmarks/data_pipeline.py                       # fabricates a tree in a temp folder
    python benchmarks/data_pipeline.py --root /path/to/tree  # an existing ImageFolder tree (train/, val/)
"""
from __future__ import annotations

import argparse
import itertools
import os
import platform
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


def images(batch: Any) -> int:
    return (batch["image"] if isinstance(batch, dict) else batch[0]).shape[0]


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat after the command name: [0] state, [1] parent, [11] utime, [12] stime."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def _children() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat(int(entry))[1]) == os.getpid():
                    pids.add(int(entry))
            except (FileNotFoundError, ProcessLookupError):
                continue
    return pids


def _cpu_seconds(pids: set[int]) -> float:
    """User + system CPU time of processes (a loader's workers), from /proc."""
    return sum(int(_stat(pid)[11]) + int(_stat(pid)[12]) for pid in pids) / os.sysconf("SC_CLK_TCK")


class Meter:
    """Images, wall seconds and CPU seconds (this process and the loader's workers) of one loader."""

    def __init__(self) -> None:
        self.images, self.wall, self.cpu = 0, 0.0, 0.0

    def rate(self) -> float:
        return self.images / self.wall

    def cpu_ms(self) -> float:
        return 1e3 * self.cpu / self.images


def interleave_batches(loaders: dict[str, Any], epochs: int) -> dict[str, Meter]:
    """In-process loading: the loaders take turns batch by batch (the first of each pair alternates),
    so load changes on a shared machine hit both alike; every batch is timed on its own."""
    meters = {key: Meter() for key in loaders}
    for epoch in range(epochs + 1):  # epoch 0 warms up
        iterators = {key: iter(loader) for key, loader in loaders.items()}
        for step in itertools.count():
            order = list(iterators) if step % 2 == 0 else list(reversed(iterators))
            done = False
            for key in order:
                wall, cpu = time.perf_counter(), time.process_time()
                batch = next(iterators[key], None)
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                if batch is None:
                    done = True
                elif epoch > 0:
                    meters[key].images += images(batch)
                    meters[key].wall += wall
                    meters[key].cpu += cpu
            if done:
                break
    return meters


def interleave_epochs(loaders: dict[str, Any], epochs: int) -> dict[str, Meter]:
    """Worker processes: the loaders take turns epoch by epoch, in alternating order, after one
    warm-up epoch each (worker start-up). CPU time counts this process and the workers."""
    meters = {key: Meter() for key in loaders}
    workers: dict[str, set[int]] = {}
    for key, loader in loaders.items():  # warm-up; persistent workers stay the same processes
        before = _children()
        sum(images(batch) for batch in loader)
        workers[key] = _children() - before
    for epoch in range(epochs):
        order = list(loaders) if epoch % 2 == 0 else list(reversed(loaders))
        for key in order:
            wall, cpu, worker_cpu = time.perf_counter(), time.process_time(), _cpu_seconds(workers[key])
            count = sum(images(batch) for batch in loaders[key])
            cpu = time.process_time() - cpu + _cpu_seconds(workers[key]) - worker_cpu
            wall = time.perf_counter() - wall
            meters[key].images += count
            meters[key].wall += wall
            meters[key].cpu += cpu
    return meters


def compare(name: str, make: dict[str, Callable[[], Any]], workers: int, epochs: int) -> tuple[str, dict[str, Meter]]:
    loaders = {key: build() for key, build in make.items()}
    meters = interleave_batches(loaders, epochs) if workers == 0 else interleave_epochs(loaders, epochs)
    line = ", ".join(f"{k} {m.rate():.1f} images/s, {m.cpu_ms():.2f} CPU ms/image" for k, m in meters.items())
    print(f"  {name}: {line}", flush=True)
    del loaders  # ends persistent workers before the next configuration starts its own
    return name, meters


def decode_rates(files: list[str], rounds: int) -> tuple[float, float, bool]:
    """CPU ms per image of PIL's full decode (what both loaders do) and of torchvision's
    ``decode_jpeg``, taking turns file by file; and whether the two give identical pixels on every file."""
    pil = tv = 0.0
    for _ in range(rounds):
        for f in files:
            start = time.process_time()
            load_rgb(f)
            pil += time.process_time() - start
            start = time.process_time()
            decode_jpeg(read_file(f))
            tv += time.process_time() - start
    same = all(
        torch.equal(torch.from_numpy(np.array(load_rgb(f))).permute(2, 0, 1), decode_jpeg(read_file(f))) for f in files
    )
    n = rounds * len(files)
    return 1e3 * pil / n, 1e3 * tv / n, same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="an ImageFolder tree with train/ and val/ (default: fabricate one)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=64)
    parser.add_argument("--val-per-class", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs of each loader, after one warm-up epoch")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--only", choices=["train", "eval"], help="time one split only")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of this process (loading in-process: per-image tensors are too small for more "
        "to help, and spare threads spin on a busy machine; workers always run one)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

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
                results.append(compare(f"{split}, {workers} workers", make, workers, args.rounds))
        files = sorted(str(p) for p in (root / "val").rglob("*.JPEG"))[:200]
        pil, tv, same = decode_rates(files, args.rounds)
        print(f"load average after: {os.getloadavg()[0]:.1f}\n")
        print(
            "| loader | package images/s | timm images/s | package / timm (wall) "
            "| package CPU ms/image | timm CPU ms/image | timm / package (CPU) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, m in results:
            package, reference = m["package"], m["timm"]
            print(
                f"| {name} | {package.rate():.1f} | {reference.rate():.1f} | {package.rate() / reference.rate():.3f}x "
                f"| {package.cpu_ms():.2f} | {reference.cpu_ms():.2f} | {reference.cpu_ms() / package.cpu_ms():.3f}x |"
            )
        print("\n| JPEG decode alone | PIL CPU ms/image | torchvision decode_jpeg CPU ms/image | PIL / decode_jpeg | same pixels |")
        print("|---|---|---|---|---|")
        print(f"| {len(files)} files | {pil:.2f} | {tv:.2f} | {pil / tv:.2f}x | {'yes' if same else 'no'} |")


if __name__ == "__main__":
    main()
