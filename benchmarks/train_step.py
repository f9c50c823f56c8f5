"""Whole-model training steps with default pooling and with SimPool, side by side in one run.

For each backbone (ResNet-50, ViT-S/16, ConvNeXt-S) it times forward + backward + optimizer step
(the recipe's SGD or AdamW, built as ``ImageClassifier`` builds it) of ``ImageClassifier``'s network
with the model's default pooling, SimPool without gamma and SimPool with the paper's gamma, and
prints images/s, peak memory and both as ratios to the default.
The three configurations of a backbone are timed in one process, one step of each in turn, so that
a change in machine load hits all of them alike; peak memory is measured for each configuration
alone in its own process (CPU: peak resident set size, under glibc's default settings even when
the timing runs with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=...``, see ``pooling.py``; CUDA:
``torch.cuda.max_memory_allocated``).

    python benchmarks/train_step.py                              # CPU, 2 threads, 96 px, batch 8
    python benchmarks/train_step.py --device cuda --image-size 224 --batch 128 --bf16 --channels-last
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

MODELS = {
    # backbone: (default pool, SimPool's gamma in the paper, the optimizer of configs/supervised/)
    "resnet50": ("avg", 2.0, "sgd"),
    "vit_small_patch16_224": ("token", 1.25, "adamw"),
    "convnext_small": ("avg", 2.0, "adamw"),
}


def build(backbone: str, pool: str, gamma: Optional[float], args: argparse.Namespace) -> Callable[[], None]:
    """One configuration's training step (forward, backward, the recipe's optimizer), as a closure."""
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from simpool_lightning.models import ImageClassifier
    from simpool_lightning.models.optim import create_optimizer

    torch.manual_seed(0)
    device = torch.device(args.device)
    kwargs = {"img_size": args.image_size} if backbone.startswith("vit") else {}
    pool_kwargs = {"gamma": gamma} if gamma else None
    net = ImageClassifier(backbone, kwargs, pool=pool, pool_kwargs=pool_kwargs, num_classes=1000).net.to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(memory_format=memory_format)
    if args.compile:
        net = torch.compile(net)
    optimizer = create_optimizer(net, MODELS[backbone][2], lr=1e-4, weight_decay=0.05, momentum=0.9)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device).to(memory_format=memory_format)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = torch.nn.functional.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        sync()

    return step


def configurations(backbone: str) -> list[tuple[str, Optional[float]]]:
    default_pool, gamma, _ = MODELS[backbone]
    return [(default_pool, None), ("simpool", None), ("simpool", gamma)]


def time_interleaved(backbone: str, args: argparse.Namespace) -> list[float]:
    """Median seconds per step of each configuration, their steps taken in turn (same load for all)."""
    import torch

    torch.set_num_threads(args.threads)
    steps = [build(backbone, pool, gamma, args) for pool, gamma in configurations(backbone)]
    for _ in range(args.warmup):
        for step in steps:
            step()
    times: list[list[float]] = [[] for _ in steps]
    for _ in range(args.steps):
        for step, record in zip(steps, times):
            start = time.perf_counter()
            step()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def peak_memory(backbone: str, pool: str, gamma: Optional[float], args: argparse.Namespace) -> float:
    """Peak MiB of one configuration alone in this process (CPU: peak RSS; CUDA: max allocated)."""
    import torch

    torch.set_num_threads(args.threads)
    step = build(backbone, pool, gamma, args)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step()
    if args.device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


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
    # Run by the parent in a subprocess:
    parser.add_argument("--time", help=argparse.SUPPRESS)
    parser.add_argument("--memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.time:
        print(json.dumps(time_interleaved(args.time, args)))
        return
    if args.memory:
        backbone, pool, gamma = args.memory
        print(json.dumps(peak_memory(backbone, pool, float(gamma) or None, args)))
        return

    common = [f"--device={args.device}", f"--image-size={args.image_size}", f"--batch={args.batch}",
              f"--steps={args.steps}", f"--warmup={args.warmup}", f"--threads={args.threads}"]
    common += [flag for flag, on in (("--bf16", args.bf16), ("--channels-last", args.channels_last),
                                     ("--compile", args.compile)) if on]

    def child(*extra: str, env: Optional[dict[str, str]] = None) -> object:
        command = [sys.executable, __file__, *common, *extra]
        out = subprocess.run(command, check=True, capture_output=True, text=True, env=env)
        return json.loads(out.stdout.splitlines()[-1])

    # Peak memory under the allocator users get, even when timing runs with glibc's trimming off.
    default_malloc = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}

    print(f"# device {args.device}, image {args.image_size}px, batch {args.batch}, {args.threads} threads, "
          f"bf16 {args.bf16}, channels-last {args.channels_last}, compile {args.compile}; median of {args.steps} "
          f"steps (forward + backward + the recipe's optimizer), the configurations' steps interleaved in one "
          f"process; peak "
          f"memory of each configuration alone in its own process ({'max allocated' if args.device == 'cuda' else 'peak RSS'})")
    print(f"{'backbone':24s} {'pool':18s} {'img/s':>9s} {'peak MiB':>9s} {'speed':>7s} {'memory':>7s}")
    for backbone in args.backbones:
        seconds = child(f"--time={backbone}")
        memory = [child("--memory", backbone, pool, str(gamma or 0), env=default_malloc) for pool, gamma in configurations(backbone)]
        for (pool, gamma), sec, mib in zip(configurations(backbone), seconds, memory):
            label = pool + (f" gamma {gamma}" if gamma else "")
            print(f"{backbone:24s} {label:18s} {args.batch / sec:9.2f} {mib:9.0f} "
                  f"{seconds[0] / sec:6.3f}x {mib / memory[0]:6.3f}x")


if __name__ == "__main__":
    main()
