"""Lightning's cost per training step: ``Trainer.fit`` against a plain PyTorch loop, side by side.

Both drive the same ``ImageClassifier`` (identical copies) through the same work per step: fetch a
batch from the same ``DataLoader``, forward, cross-entropy, backward, AdamW step and a per-step LR
schedule. The Lightning side runs ``training_step`` as ``simpool fit`` does; it is timed from one
``on_train_batch_start`` to the next, so everything Lightning does between steps (hooks, logging,
the optimizer closure, the loop) is counted. The plain loop is timed the same way, per iteration.

Blocks of ``--steps`` steps alternate between the variants for ``--rounds`` rounds, so that both
see the same machine load; the first ``--warmup`` steps of every block are dropped. Printed: the
median milliseconds per step of each variant and its ratio to the plain loop.

    python benchmarks/lightning_overhead.py                      # the quickstart ViT and ViT-S, CPU
    python benchmarks/lightning_overhead.py --models vit_s --device cuda --image-size 224 --batch 128
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simpool_lightning.models import ImageClassifier  # noqa: E402
from simpool_lightning.models.optim import create_optimizer  # noqa: E402
from simpool_lightning.models.schedules import cosine_schedule  # noqa: E402

# name: (timm backbone, backbone kwargs, pool, image size, batch) at the CPU defaults.
MODELS: dict[str, tuple[str, dict[str, Any], str, int, int]] = {
    "quickstart": (
        "vit_tiny_patch16_224",
        dict(patch_size=4, embed_dim=96, depth=4, num_heads=3, mlp_ratio=2.0),
        "simpool",
        32,
        64,
    ),
    "vit_s": ("vit_small_patch16_224", {}, "simpool", 96, 8),
    "resnet50": ("resnet50", {}, "simpool", 96, 8),
}


class RandomImages(Dataset):
    """Fixed random images and labels in memory: data loading costs the same in both variants."""

    def __init__(self, size: int, image_size: int, num_classes: int) -> None:
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(size, 3, image_size, image_size, generator=generator)
        self.labels = torch.randint(0, num_classes, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[index], "label": self.labels[index]}


class StepTimer(pl.Callback):
    """Seconds between consecutive ``on_train_batch_start`` calls."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def lightning_block(model: ImageClassifier, loader: DataLoader, args: argparse.Namespace, logged: bool) -> list[float]:
    """``steps`` steps of ``Trainer.fit``; ``logged`` adds a TensorBoard logger and the progress bar."""
    timer = StepTimer()
    kwargs: dict[str, Any] = dict(logger=False, enable_progress_bar=False)
    if logged:
        kwargs = dict(
            logger=pl.loggers.TensorBoardLogger(save_dir=args.log_dir, name="lightning_overhead"),
            enable_progress_bar=True,
            log_every_n_steps=10,
        )
    trainer = pl.Trainer(
        accelerator=args.device,
        devices=1,
        max_steps=args.steps,
        limit_val_batches=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[timer],
        precision=args.precision,
        **kwargs,
    )
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):  # where the progress bar draws
        trainer.fit(model, train_dataloaders=loader)
    return timer.step_times()


def plain_block(model: ImageClassifier, loader: DataLoader, args: argparse.Namespace) -> list[float]:
    """The same steps by hand: the loop a user would write without Lightning."""
    hp, steps, device = model.hparams, args.steps, args.device
    net = model.net.to(device).train()
    optimizer = create_optimizer(net, hp.optimizer, hp.lr, hp.weight_decay, hp.momentum)

    def factor(step: int) -> float:
        return cosine_schedule(step, steps, 1.0, hp.min_lr / hp.lr, 0, 1.0)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    autocast = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    sync: Callable[[], None] = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    starts = []
    batches = iter(loader)
    for _ in range(steps):
        starts.append(time.perf_counter())
        batch = next(batches)
        images, labels = batch["image"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        with torch.autocast(device, dtype=autocast or torch.float32, enabled=autocast is not None):
            loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        sync()
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])]


def measure(name: str, args: argparse.Namespace) -> None:
    backbone, kwargs, pool, image_size, batch = MODELS[name]
    image_size = args.image_size or image_size
    batch = args.batch or batch
    if backbone.startswith("vit"):
        kwargs = dict(kwargs, img_size=image_size)
    pl.seed_everything(0, verbose=False)
    base = ImageClassifier(backbone, kwargs, pool=pool, num_classes=10, lr=1e-4, warmup_epochs=0)
    models = {variant: copy.deepcopy(base) for variant in ("plain loop", "lightning", "lightning + logger + bar")}
    data = RandomImages(batch * args.steps, image_size, 10)
    loader = DataLoader(data, batch_size=batch, shuffle=True, drop_last=True, pin_memory=args.device == "cuda")
    times: dict[str, list[float]] = {variant: [] for variant in models}
    for _ in range(args.rounds):
        for variant, model in models.items():
            if variant == "plain loop":
                block = plain_block(model, loader, args)
            else:
                block = lightning_block(model, loader, args, logged=variant != "lightning")
            times[variant].append(statistics.median(block[args.warmup:]))
    plain = statistics.median(times["plain loop"])
    print(f"\n## {name}: {backbone} + {pool}, {image_size} px, batch {batch}")
    for variant, block_medians in times.items():
        ms = statistics.median(block_medians)
        print(f"{variant:>26s} {ms * 1e3:9.2f} ms/step {ms / plain:7.3f}x")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["quickstart", "vit_s"], choices=list(MODELS))
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--image-size", type=int, default=None, help="override each model's image size")
    parser.add_argument("--batch", type=int, default=None, help="override each model's batch size")
    parser.add_argument("--steps", type=int, default=20, help="steps per block")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped at the start of each block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-dir", default="runs/benchmarks", help="where the logged variant writes")
    args = parser.parse_args(argv)
    if args.steps <= args.warmup + 1:
        parser.error(f"--steps ({args.steps}) must exceed --warmup ({args.warmup}) + 1")

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", ".*(num_workers|log_every_n_steps|LeafSpec|max_steps).*")
    for logger_name in ("pytorch_lightning", "lightning_fabric"):
        logging.getLogger(logger_name).setLevel(logging.WARNING)
    print(f"# torch {torch.__version__}, pytorch_lightning {pl.__version__}, device {args.device}, "
          f"{args.threads} threads, precision {args.precision}; {args.rounds} rounds of {args.steps}-step blocks, "
          f"first {args.warmup} of each dropped; median ms per step (ratio to the plain loop)")
    for name in args.models:
        measure(name, args)

if __name__ == "__main__":
    main()
