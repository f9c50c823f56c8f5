"""Pooling heads alone, forward + backward, at the paper's feature shapes.

Every pool of the registry is timed beside GAP + LayerNorm (the cheapest head that normalises
every location, which SimPool must) and the official form of SimPool (tests/reference), in one
run, the heads taking turns step by step so that a change in machine load hits all of them alike,
and printed as median milliseconds and as a ratio to GAP + LayerNorm.

    python benchmarks/pooling.py                       # all pools, CPU, 2 threads
    python benchmarks/pooling.py --pools simpool avg --gamma 1.25
    python benchmarks/pooling.py --device cuda --dtype bf16

On CPU, glibc hands large freed buffers back to the system, so a head's fresh (B, N, d) buffers
page-fault on some steps and not others, and unevenly between heads (GAP + LayerNorm at ViT-B
measured 28 to 81 ms from run to run). For stable ratios keep freed memory in the process, as a
caching allocator (PyTorch's on CUDA, or jemalloc) does:

    MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736 python benchmarks/pooling.py
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor, nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from simpool_lightning.pooling import create_pool, list_pools  # noqa: E402
from tests.reference.official_simpool import OfficialSimPool  # noqa: E402

# (name, shape, layout) as in DESIGN.md: ResNet-50 maps, ViT-S and ViT-B tokens.
SHAPES = {
    "resnet50": (64, 2048, 7, 7),
    "vit_s": (64, 196, 384),
    "vit_b": (64, 196, 768),
}


class GapLayerNorm(nn.Module):
    """LayerNorm every location, then average: the baseline cost."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)
        return self.norm(x).mean(1)


class OfficialForm(OfficialSimPool):
    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x)[0]


def make_step(head: nn.Module, x: Tensor, autocast: Optional[torch.dtype]) -> Callable[[], None]:
    """One forward + backward of ``head`` on ``x``, synchronised on CUDA."""
    grad = None
    sync: Callable[[], None] = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)

    def step() -> None:
        nonlocal grad
        x.grad = None
        head.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=autocast or torch.float32, enabled=autocast is not None):
            out = head(x)
        if grad is None:
            grad = torch.randn_like(out)
        out.backward(grad)
        sync()

    return step


def time_heads(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    """Median milliseconds of each step; the heads take turns, so that load changes hit all alike."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pools", nargs="+", default=None, help="registry names (default: all)")
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--gamma", type=float, default=None, help="gamma for simpool and the official form")
    parser.add_argument("--batch", type=int, default=None, help="override the batch size of every shape")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast dtype")
    parser.add_argument("--compile", action="store_true", help="torch.compile each head")
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    pools = args.pools or list_pools()
    gamma_kwargs = {} if args.gamma is None else {"gamma": args.gamma}

    print(f"# torch {torch.__version__}, device {args.device}, {args.threads} threads, autocast {args.dtype}, "
          f"median of {args.repeats}, forward + backward, ms (ratio to GAP + LayerNorm)")
    if args.device == "cpu":
        malloc = {k: os.environ.get(k) for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")}
        print(f"# glibc malloc settings {malloc} (see the docstring)")
    for shape_name in args.shapes:
        shape = list(SHAPES[shape_name])
        if args.batch:
            shape[0] = args.batch
        dim = shape[1] if len(shape) == 4 else shape[2]
        x = torch.randn(*shape, device=args.device, requires_grad=True)
        heads: dict[str, nn.Module] = {
            "gap+layernorm": GapLayerNorm(dim),
            "official simpool": OfficialForm(dim, **gamma_kwargs),
        }
        for name in pools:
            heads[name] = create_pool(name, dim, **(gamma_kwargs if name == "simpool" else {}))
        print(f"\n## {shape_name} {tuple(shape)}" + (f", simpool gamma {args.gamma}" if args.gamma else ""))
        steps = {}
        for name, head in heads.items():
            head = head.to(args.device)
            steps[name] = make_step(torch.compile(head) if args.compile else head, x, autocast)
        times = time_heads(steps, args.repeats, args.warmup)
        base = times["gap+layernorm"]
        for name, ms in times.items():
            print(f"{name:>18s} {ms:9.2f} ms {ms / base:6.2f}x")

if __name__ == "__main__":
    main()
