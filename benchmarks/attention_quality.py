"""Attention-map quality at small scale: the same small ViT with [CLS], GAP and SimPool pooling.

The paper's claim (Psomas et al., ICCV 2023): a supervised ViT pooled by SimPool has attention maps
that delineate the object better than its [CLS] attention, at equal or better accuracy. Here each
pooling trains the same ViT on SyntheticShapes (same data, seed, epochs and recipe) and is then
validated for accuracy and for the localization of its attention maps: mask IoU with the object's
mask and CorLoc with its box, both after keeping ``--mass`` of the attention (DINO's thresholding).
GAP (``avg``) has no attention map: it is there for accuracy only. The defaults are the recipe of
``configs/quickstart.yaml`` (936 steps of batch 64); a ViT from scratch stays at chance for a few
hundred steps, so much shorter runs say nothing.

    python benchmarks/attention_quality.py                       # the quickstart budget, for each pooling
    python benchmarks/attention_quality.py --epochs 2 --train-size 512 --val-size 256   # a smoke run

Prints one row per pooling: validation top-1 accuracy, mask IoU, CorLoc, and the training time, as
wall time and as CPU time of this process (all its threads): on a shared machine the CPU time is
the fairer comparison, since the wall time also counts other processes' turns. Two rows of maps
that look at no image follow, a uniform map and a centred Gaussian: what a learned map must beat
to show that it finds the object (``--pools`` with no names prints only those).
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import warnings
from typing import Any, Optional

import pytorch_lightning as pl
import torch

from simpool_lightning.data import SyntheticShapesDataModule
from simpool_lightning.evaluation import CorLoc, MaskIoU
from simpool_lightning.models import ImageClassifier


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pools", nargs="*", default=["token", "avg", "simpool"], help="'token' or names from list_pools()")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--train-size", type=int, default=5000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="vit_tiny_patch16_224", help="a timm ViT; shrunk by the flags below")
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=1.0)
    p.add_argument("--gamma", type=float, default=None, help="SimPool's gamma (None: no power mean)")
    p.add_argument("--mass", type=float, default=0.6, help="attention mass kept for mask IoU and CorLoc")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p.parse_args(argv)


def shapes(args: argparse.Namespace) -> SyntheticShapesDataModule:
    """The benchmark's data: every pooling (and the no-image maps) sees the same images."""
    return SyntheticShapesDataModule(
        num_classes=args.num_classes,
        image_size=args.image_size,
        train_size=args.train_size,
        val_size=args.val_size,
        seed=args.seed,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
    )


def run(pool: str, args: argparse.Namespace) -> dict[str, Any]:
    """Train one pooling from the same seed on the same data; validate it once at the end."""
    pl.seed_everything(args.seed, verbose=False)
    data = shapes(args)
    model = ImageClassifier(
        args.backbone,
        dict(
            img_size=args.image_size,
            patch_size=args.patch_size,
            embed_dim=args.embed_dim,
            depth=args.depth,
            num_heads=args.num_heads,
            mlp_ratio=args.mlp_ratio,
        ),
        pool=pool,
        pool_kwargs=dict(gamma=args.gamma) if pool == "simpool" and args.gamma is not None else None,
        num_classes=args.num_classes,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup_epochs=args.warmup_epochs,
        attention_mass=args.mass,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        limit_val_batches=0,  # validated once, after training, so that the wall time is training alone
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(model, data)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    evaluator = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = evaluator.validate(model, data, verbose=False)
    return dict(
        pool=pool,
        params=sum(p.numel() for p in model.net.parameters()),
        acc=metrics["val/acc1"],
        mask_iou=metrics.get("val/mask_iou"),
        corloc=metrics.get("val/corloc"),
        seconds=seconds,
        cpu_seconds=cpu_seconds,
    )


def prior_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Maps that look at no image: uniform, and a centred Gaussian (sigma a quarter of the side).

    What a map must beat before it says anything about the object: SyntheticShapes draws objects
    around the centre, so a centre prior alone scores well.
    """
    data = shapes(args)
    data.setup("validate")
    side = torch.arange(args.image_size, dtype=torch.float32) - (args.image_size - 1) / 2
    yy, xx = torch.meshgrid(side, side, indexing="ij")
    priors = {
        "uniform map": torch.ones(args.image_size, args.image_size),
        "centre prior": torch.exp(-(xx**2 + yy**2) / (2 * (args.image_size / 4) ** 2)),
    }
    rows = []
    for name, prior in priors.items():
        mask_iou, corloc = MaskIoU(mass=args.mass), CorLoc(mass=args.mass)
        for batch in data.val_dataloader():
            maps = (prior / prior.sum()).expand(batch["image"].shape[0], -1, -1)
            mask_iou.update(maps, batch["mask"])
            corloc.update(maps, batch["boxes"])
        rows.append(dict(pool=name, params=None, acc=None, mask_iou=float(mask_iou.compute()),
                         corloc=float(corloc.compute()), seconds=None, cpu_seconds=None))
    return rows


def table(rows: list[dict[str, Any]], mass: float) -> str:
    def cell(value: Optional[float], fmt: str = ".3f") -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"| pool | params (M) | val acc | mask IoU ({mass:.0%} mass) | CorLoc ({mass:.0%} mass) | train wall time (s) | train CPU time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pool']} | {cell(r['params'] and r['params'] / 1e6, '.2f')} | {cell(r['acc'])} | {cell(r['mask_iou'])} "
            f"| {cell(r['corloc'])} | {cell(r['seconds'], '.0f')} | {cell(r['cpu_seconds'], '.0f')} |"
        )
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> None:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Lightning's advice on loader workers and log intervals is noise for a benchmark on a synthetic set.
    warnings.filterwarnings("ignore", ".*(num_workers|log_every_n_steps|LeafSpec).*")
    for name in ("pytorch_lightning", "lightning_fabric"):  # device and tip banners, once per Trainer
        logging.getLogger(name).setLevel(logging.WARNING)
    settings = {k: v for k, v in vars(args).items() if k != "pools"}
    print(f"# attention quality: {', '.join(args.pools)}")
    print(f"# {platform.platform()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, torch {torch.__version__}")
    print("# " + " ".join(f"{k}={v}" for k, v in settings.items()), flush=True)
    rows = []
    for pool in args.pools:
        rows.append(run(pool, args))
        print(f"# {pool}: done in {rows[-1]['seconds']:.0f} s", flush=True)
    print(table(rows + prior_rows(args), args.mass))


if __name__ == "__main__":
    main()
