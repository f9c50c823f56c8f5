"""Attention-map quality at small scale: the same small ViT with [CLS], GAP and SimPool pooling.

The paper's claim (Psomas et al., ICCV 2023): a supervised ViT pooled by SimPool has attention maps
that delineate the object better than its [CLS] attention, at equal or better accuracy. Here each
pooling trains the same ViT on SyntheticShapes (same data, seed, epochs and recipe) and is then
validated for accuracy and for the localization of its maps: mask IoU with the object's mask and
CorLoc with its box, both after keeping ``--mass`` of the map (DINO's thresholding). GAP (``avg``)
has no attention; its row shows the class activation map instead (CAM, Zhou et al., CVPR 2016: the
linear head's weights of the true class applied to every token before the average, min-max
normalised as wsolevaluation does), the standard way an attention-free model is read.

The data are the quickstart's (``configs/quickstart.yaml``): objects of 0.2 to 0.5 of the side
anywhere in the frame, among shapes that are no class, so that where and how large an object is
carries no information. Rows of maps that look at no image follow the models: a uniform map and the
best centred Gaussian over a range of widths. A learned map says something about the object only
where it beats them. The defaults are the quickstart's recipe (4 epochs of 30,000 images: 1,872 steps
of batch 64); a ViT from scratch stays at chance for a few hundred steps, so much shorter runs say
nothing.

    python benchmarks/attention_quality.py --seed 0              # the quickstart budget, for each pooling
    python benchmarks/attention_quality.py --epochs 2 --train-size 512 --val-size 256 --warmup-epochs 1   # a smoke run
    python benchmarks/attention_quality.py --pools               # the no-image rows alone

Prints one row per map: validation top-1 accuracy, mask IoU, CorLoc, the share of the map's mass on
the object and within one patch around it (off the object: where a map on the object's edge sits),
how often the map's peak is on the object, and the training time as wall time and as
CPU time of this process (all its threads): on a shared machine the CPU time is the fairer
comparison. A second table gives mask IoU at other kept masses (how much the result depends on the
threshold). ``--save-maps FILE`` writes the first validation images, their masks and every row's maps
to an ``.npz`` that ``benchmarks/attention_figure.py`` draws.
"""
from __future__ import annotations

import argparse
import logging
import os
import platform
import time
import warnings
from typing import Any, Callable, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from simpool_lightning.data import SyntheticShapesDataModule
from simpool_lightning.metrics.localization import CorLoc, MaskIoU
from simpool_lightning.models import ImageClassifier

MapFn = Callable[[Tensor, Tensor], tuple[Optional[Tensor], Tensor]]
"""``(images (B, 3, S, S), labels (B,)) -> (logits (B, K) or None, maps (B, S, S))``."""

SWEEP_MASSES = (0.3, 0.45, 0.6, 0.75, 0.9)
GAUSSIAN_WIDTHS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0)  # sigma over the side


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--pools", nargs="*", default=["token", "avg", "simpool"], help="'token' or names from list_pools()")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--train-size", type=int, default=30000)
    p.add_argument("--val-size", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=48)
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--object-placement", default="anywhere", choices=["anywhere", "inside"])
    p.add_argument("--object-scale", type=float, nargs=2, default=[0.2, 0.5])
    p.add_argument("--distractor-shapes", type=int, default=1, help="shapes that are no class, per image")
    p.add_argument("--distractor-scale", type=float, nargs=2, default=[0.3, 0.6], help="their size relative to the object's")
    p.add_argument("--distractors", type=int, default=2, help="thin bars per image")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", default="vit_tiny_patch16_224", help="a timm ViT; shrunk by the flags below")
    p.add_argument("--patch-size", type=int, default=6)
    p.add_argument("--embed-dim", type=int, default=96)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--warmup-epochs", type=float, default=0.2)
    p.add_argument("--gamma", type=float, default=None, help="SimPool's gamma (None: no power mean)")
    p.add_argument("--simpool-heads", type=int, default=3, help="SimPool's num_heads (the quickstart's: 3, the ViT's heads; the official ViT's: 1)")
    p.add_argument("--mass", type=float, default=0.6, help="map mass kept for mask IoU and CorLoc")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--every-epoch", action="store_true", help="validate after every epoch and print the curve (the training time then includes it)")
    p.add_argument(
        "--checkpoint", action="append", default=[], metavar="POOL=PATH",
        help="evaluate this trained ImageClassifier checkpoint (e.g. the quickstart's last.ckpt) instead of training POOL",
    )
    p.add_argument("--save-checkpoints", default=None, metavar="DIR", help="write each trained model to DIR/<pool>.ckpt")
    p.add_argument("--save-maps", default=None, help="write the first validation images and every row's maps to this .npz")
    p.add_argument("--num-saved", type=int, default=8, help="images in --save-maps")
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
        object_placement=args.object_placement,
        object_scale=tuple(args.object_scale),
        num_distractor_shapes=args.distractor_shapes,
        distractor_scale=tuple(args.distractor_scale),
        num_distractors=args.distractors,
    )


class EpochCurve(pl.Callback):
    """Prints the model's own validation metrics after every epoch (``--every-epoch``): how accuracy and
    the map's localization move while one run trains. They are the ``val/`` metrics the quickstart logs,
    on the same split and thresholding as this benchmark's table."""

    def __init__(self, pool: str) -> None:
        self.pool = pool

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        logged = trainer.callback_metrics
        values = ", ".join(f"{name} {float(logged[f'val/{name}']):.3f}" for name in ("acc1", "mask_iou", "corloc") if f"val/{name}" in logged)
        print(f"# {self.pool} epoch {trainer.current_epoch + 1}: {values}", flush=True)


def train(pool: str, args: argparse.Namespace) -> tuple[ImageClassifier, float, float]:
    """Train one pooling from the same seed on the same data: ``(model, wall s, CPU s)``."""
    pl.seed_everything(args.seed, verbose=False)
    pool_kwargs = None
    if pool == "simpool":
        pool_kwargs = dict(num_heads=args.simpool_heads, **({} if args.gamma is None else dict(gamma=args.gamma)))
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
        pool_kwargs=pool_kwargs,
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
        # By default validated once, after training, so that the wall time is training alone.
        limit_val_batches=None if args.every_epoch else 0,
        num_sanity_val_steps=0,
        callbacks=[EpochCurve(pool)] if args.every_epoch else None,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    start, cpu_start = time.perf_counter(), time.process_time()
    trainer.fit(model, shapes(args))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    if args.save_checkpoints:
        trainer.save_checkpoint(os.path.join(args.save_checkpoints, f"{pool}.ckpt"))
    model.eval()
    return model, seconds, cpu_seconds


def row_name(model: ImageClassifier) -> str:
    """The row of a trained or loaded model; SimPool's with its heads and gamma, read from the model
    (a loaded checkpoint's, not the flags): ``simpool (3 heads)``, ``simpool (gamma 1.25, 1 head)``."""
    pool = model.backbone.pool_name
    if pool != "simpool":
        return {"token": "token ([CLS] attention)", "avg": "avg (GAP-CAM)"}.get(pool, pool)
    heads, gamma = model.backbone.pool.num_heads, model.backbone.pool.gamma
    return f"simpool ({'' if gamma is None else f'gamma {gamma:g}, '}{heads} head{'s' if heads > 1 else ''})"


def load(pool: str, path: str, args: argparse.Namespace) -> ImageClassifier:
    """A trained checkpoint of ``pool``, checked against the benchmark's data settings."""
    model = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=False)
    if model.hparams.pool != pool:
        raise ValueError(f"--checkpoint {pool}={path}: the checkpoint pools with {model.hparams.pool!r}")
    fitted = torch.load(path, map_location="cpu", weights_only=False).get("datamodule_hyper_parameters") or {}
    ours = shapes(args).hparams
    keys = ("num_classes", "image_size", "seed", "object_placement", "object_scale", "num_distractor_shapes", "distractor_scale", "num_distractors")
    differ = {k: (fitted.get(k), ours[k]) for k in keys if k in fitted and tuple(np.atleast_1d(fitted[k])) != tuple(np.atleast_1d(ours[k]))}
    if differ:
        raise ValueError(f"--checkpoint {pool}={path} was fitted on other data (checkpoint, benchmark): {differ}")
    return model.eval()


def class_activation_maps(model: ImageClassifier, images: Tensor, labels: Tensor) -> Tensor:
    """CAM of a GAP-pooled ViT for the true class: ``(B, 3, S, S)`` -> ``(B, S, S)``, summing to 1.

    The logits are ``W mean_j(f_j) + b``, so ``W_c f_j`` is token ``j``'s share of class ``c``. As in
    wsolevaluation, the map is upsampled and then min-max normalised; divided by its sum, it is a
    distribution like the attention maps, for the same thresholding.
    """
    backbone = model.backbone
    if backbone.pool_name != "avg" or not isinstance(backbone.final_norm, torch.nn.Identity):
        raise ValueError(f"CAM here needs GAP with nothing between it and the head, got pool {backbone.pool_name!r}")
    tokens = backbone.forward_features(images)  # (B, N, C), after the ViT's final norm
    weights = model.net.head[-1].weight[labels]  # (B, C)
    cam = torch.einsum("bnc,bc->bn", tokens, weights).unflatten(-1, backbone.patch_grid(images))
    cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low, high = cam.flatten(1).amin(1)[:, None, None], cam.flatten(1).amax(1)[:, None, None]
    cam = (cam - low) / (high - low).clamp_min(1e-12)
    return cam / cam.flatten(1).sum(1).clamp_min(1e-12)[:, None, None]


def model_maps(model: ImageClassifier) -> MapFn:
    """Logits and maps of a trained model: attention where the pool has it, CAM for GAP."""

    def maps(images: Tensor, labels: Tensor) -> tuple[Optional[Tensor], Tensor]:
        logits = model(images)
        if model.backbone.has_attention:
            return logits, model.attention_maps(images, size=tuple(images.shape[-2:]))
        return logits, class_activation_maps(model, images, labels)

    return maps


def prior_maps(prior: Tensor) -> MapFn:
    """A map that looks at no image: the same ``(S, S)`` map for every image."""
    prior = prior / prior.sum()

    def maps(images: Tensor, labels: Tensor) -> tuple[Optional[Tensor], Tensor]:
        return None, prior.expand(images.shape[0], -1, -1)

    return maps


def gaussian(size: int, width: float) -> Tensor:
    """A centred Gaussian ``(size, size)`` with sigma ``width * size``."""
    side = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(side, side, indexing="ij")
    return torch.exp(-(xx**2 + yy**2) / (2 * (width * size) ** 2))


@torch.no_grad()
def evaluate(name: str, map_fn: MapFn, args: argparse.Namespace, saved: Optional[dict[str, np.ndarray]] = None) -> dict[str, Any]:
    """Accuracy and localization of one kind of map over the validation split."""
    data = shapes(args)
    data.setup("validate")
    ious = {m: MaskIoU(mass=m) for m in sorted({args.mass, *SWEEP_MASSES})}
    corloc = CorLoc(mass=args.mass)
    correct = seen = 0
    on_object = beside_object = peak_on_object = 0.0
    for batch in data.val_dataloader():
        logits, maps = map_fn(batch["image"], batch["label"])
        masks = batch["mask"]
        if logits is not None:
            correct += int((logits.argmax(1) == batch["label"]).sum())
        for metric in ious.values():
            metric.update(maps, masks)
        corloc.update(maps, batch["boxes"])
        flat = maps.flatten(1)
        on_object += float((flat * masks.flatten(1)).sum())
        near = F.max_pool2d(masks[:, None].float(), 2 * args.patch_size + 1, stride=1, padding=args.patch_size)[:, 0]
        beside_object += float((flat * (near.flatten(1) - masks.flatten(1).float())).sum())
        peak_on_object += float(masks.flatten(1).gather(1, flat.argmax(1, keepdim=True)).sum())
        if saved is not None and len(saved.setdefault(f"maps/{name}", np.zeros((0,) + maps.shape[1:], np.float32))) < args.num_saved:
            take = args.num_saved - len(saved[f"maps/{name}"])
            saved[f"maps/{name}"] = np.concatenate([saved[f"maps/{name}"], maps[:take].float().numpy()])
        seen += len(masks)
    return dict(
        pool=name,
        acc=None if logits is None else correct / seen,
        mask_iou=float(ious[args.mass].compute()),
        corloc=float(corloc.compute()),
        on_object=on_object / seen,
        beside_object=beside_object / seen,
        peak_on_object=peak_on_object / seen,
        sweep={m: float(ious[m].compute()) for m in SWEEP_MASSES},
        seconds=None,
        cpu_seconds=None,
    )


def prior_rows(args: argparse.Namespace, saved: Optional[dict[str, np.ndarray]] = None) -> list[dict[str, Any]]:
    """The uniform map, and the centred Gaussian of the width that scores best in mask IoU."""
    rows = [evaluate("uniform map (no image)", prior_maps(torch.ones(args.image_size, args.image_size)), args, saved)]
    gaussians = [evaluate(f"centred Gaussian, sigma {w:g} S (no image)", prior_maps(gaussian(args.image_size, w)), args) for w in GAUSSIAN_WIDTHS]
    rows.append(max(gaussians, key=lambda r: r["mask_iou"]))
    if saved is not None:
        best = float(rows[-1]["pool"].split("sigma ")[1].split(" S")[0])
        evaluate(rows[-1]["pool"], prior_maps(gaussian(args.image_size, best)), args, saved)
    return rows


def table(rows: list[dict[str, Any]], mass: float) -> str:
    def cell(value: Optional[float], fmt: str = ".3f") -> str:
        return "-" if value is None else format(value, fmt)

    lines = [
        f"| map | val acc | mask IoU ({mass:.0%} mass) | CorLoc ({mass:.0%} mass) | mass on object | mass beside it "
        "| peak on object | train wall time (s) | train CPU time (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['pool']} | {cell(r['acc'])} | {cell(r['mask_iou'])} | {cell(r['corloc'])} | {cell(r['on_object'])} | {cell(r['beside_object'])} "
            f"| {cell(r['peak_on_object'])} | {cell(r['seconds'], '.0f')} | {cell(r['cpu_seconds'], '.0f')} |"
        )
    lines += ["", "| map | " + " | ".join(f"IoU at {m:.0%}" for m in SWEEP_MASSES) + " |", "|---" * (len(SWEEP_MASSES) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['pool']} | " + " | ".join(cell(r["sweep"][m]) for m in SWEEP_MASSES) + " |")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
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
    saved: Optional[dict[str, np.ndarray]] = {} if args.save_maps else None
    checkpoints = dict(item.split("=", 1) for item in args.checkpoint)
    rows = []
    for pool in args.pools:
        if pool in checkpoints:
            model, seconds, cpu_seconds = load(pool, checkpoints[pool], args), None, None
        else:
            model, seconds, cpu_seconds = train(pool, args)
        rows.append(dict(evaluate(row_name(model), model_maps(model), args, saved), seconds=seconds, cpu_seconds=cpu_seconds))
        done = f"loaded from {checkpoints[pool]}" if pool in checkpoints else f"trained in {seconds:.0f} s ({cpu_seconds:.0f} CPU s)"
        print(f"# {pool}: {done}", flush=True)
    rows += prior_rows(args, saved)
    print(table(rows, args.mass), flush=True)
    if saved is not None:
        data = shapes(args)
        data.setup("validate")
        images, masks, labels = data.val_set.render(range(args.num_saved))
        names = np.array([key.split("/", 1)[1] for key in saved])
        np.savez_compressed(
            args.save_maps, images=images, masks=masks, labels=labels, classes=np.array(data.classes),
            names=names, mass=args.mass, **{f"map{i}": saved[key] for i, key in enumerate(saved)},
        )
        print(f"# maps of {len(names)} rows on {args.num_saved} validation images written to {args.save_maps}")
    return rows


if __name__ == "__main__":
    main()
