"""Two real processes (gloo, CPU): gather_features and the metrics' synchronisation."""
from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from simpool_lightning.metrics import CorLoc, MaxBoxAccV2, gather_features
from tests.isolated import run_isolated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def box_map(x1: int, y1: int, x2: int, y2: int) -> torch.Tensor:
    m = torch.zeros(8, 8)
    m[y1:y2, x1:x2] = 1.0
    return m


def worker(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        # Unequal shards: rank 0 holds 3 samples, rank 1 holds 1.
        n = 3 if rank == 0 else 1
        features = torch.arange(n * 2, dtype=torch.float).view(n, 2) + 100 * rank
        labels = torch.arange(n) + 10 * rank
        all_features, all_labels = gather_features(features, labels)
        assert all_labels.tolist() == [0, 1, 2, 10]
        assert all_features.tolist() == [[0, 1], [2, 3], [4, 5], [100, 101]]

        # Rank 0 localises its image, rank 1 misses: synchronised CorLoc is 1/2 on both ranks.
        gt = [torch.tensor([[0.0, 0.0, 4.0, 4.0]])]
        attn = box_map(0, 0, 4, 4) if rank == 0 else box_map(4, 4, 8, 8)
        corloc, boxacc = CorLoc(mode="value"), MaxBoxAccV2(num_thresholds=4)
        corloc.update(attn[None], gt)
        boxacc.update(attn[None], gt)
        assert corloc.compute().item() == 0.5
        assert boxacc.compute()["MaxBoxAccV2"].item() == 0.5
    finally:
        dist.destroy_process_group()


def two_processes() -> None:
    # fork: the children inherit the imported modules instead of importing torch again.
    mp.start_processes(worker, args=(2, free_port()), nprocs=2, join=True, start_method="fork")


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_two_processes():
    run_isolated("tests.metrics.test_distributed:two_processes")
