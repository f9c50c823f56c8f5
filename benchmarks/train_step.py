"""Whole-model training steps with default pooling and with SimPool, side by side in one run.

For each backbone (ResNet-50, ViT-S/16, ConvNeXt-S) it times forward + backward + AdamW step of
``ImageClassifier``'s network with the model's default pooling, SimPool without gamma and SimPool
with the paper's gamma, and prints images/s, peak memory and both as ratios to the default.
Each configuration runs in its own subprocess, so that peak memory is that configuration's alone
(CPU: peak resident set size of the process; CUDA: ``torch.cuda.max_memory_allocated``).

    python benchmarks/train_step.py                              # CPU, 2 threads, 96 px, batch 8
    python benchmarks/train_step.py --device cuda --image-size 224 --batch 128 --bf16 --channels-last
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

MODELS = {
    # backbone: (default pool, SimPool's gamma in the paper)
    "resnet50": ("avg", 2.0),
    "vit_small_patch16_224": ("token", 1.25),
    "convnext_small": ("avg", 2.0),
}


def run_one(args: argparse.Namespace) -> dict[str, float]:
    """Time one configuration in this process."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from simpool_lightning.models import ImageClassifier

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = {"img_size": args.image_size} if args.backbone.startswith("vit") else {}
    pool_kwargs = {"gamma": args.gamma} if args.gamma else None
    net = ImageClassifier(args.backbone, kwargs, pool=args.pool, pool_kwargs=pool_kwargs, num_classes=1000).net
    net = net.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    if args.compile:
        net = torch.compile(net)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {"images_per_s": args.batch / statistics.median(times), "peak_mb": peak_mb}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    # One configuration, run by the parent in a subprocess:
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    parser.add_argument("--gamma", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.backbone:
        print(json.dumps(run_one(args)))
        return

    common = [f"--device={args.device}", f"--image-size={args.image_size}", f"--batch={args.batch}",
              f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={args.threads}"]
    common += [flag for flag, on in (("--bf16", args.bf16), ("--channels-last", args.channels_last),
                                     ("--compile", args.compile)) if on]
    print(f"# device {args.device}, image {args.image_size}px, batch {args.batch}, {args.threads} threads, "
          f"bf16 {args.bf16}, channels-last {args.channels_last}, compile {args.compile}; "
          f"median of {args.steps} steps (forward + backward + AdamW)")
    print(f"{'backbone':24s} {'pool':18s} {'img/s':>9s} {'peak MB':>9s} {'speed':>7s} {'memory':>7s}")
    for backbone in args.backbones:
        default_pool, gamma = MODELS[backbone]
        base: Optional[dict[str, float]] = None
        for pool, pool_gamma in ((default_pool, None), ("simpool", None), ("simpool", gamma)):
            cmd = [sys.executable, __file__, *common, f"--backbone={backbone}", f"--pool={pool}"]
            if pool_gamma:
                cmd.append(f"--gamma={pool_gamma}")
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            base = base or result
            label = pool + (f" gamma {pool_gamma}" if pool_gamma else "")
            print(f"{backbone:24s} {label:18s} {result['images_per_s']:9.2f} {result['peak_mb']:9.0f} "
                  f"{result['images_per_s'] / base['images_per_s']:6.3f}x {result['peak_mb'] / base['peak_mb']:6.3f}x")


if __name__ == "__main__":
    main()
