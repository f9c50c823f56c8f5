from __future__ import annotations

import copy

import pytest
import torch
from timm.optim import create_optimizer_v2
from torch import nn

from simpool_lightning.models.optim import create_optimizer, fused_supported


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 3))


def _steps(net: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        optimizer.zero_grad()
        net(torch.randn(5, 6, generator=gen)).square().mean().backward()
        optimizer.step()
    return [p.detach().clone() for p in net.parameters()]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_fused_where_pytorch_has_it_and_the_same_update(name):
    net = _net()
    fused = create_optimizer(net, name, lr=0.1, weight_decay=0.05, momentum=0.9)
    assert fused.defaults["fused"] is True
    reference_net = copy.deepcopy(net)
    reference = create_optimizer_v2(reference_net, opt=name, lr=0.1, weight_decay=0.05, momentum=0.9)
    assert not reference.defaults["fused"]  # the per-parameter loop, PyTorch's default on CPU
    for ours, expected in zip(_steps(net, fused), _steps(reference_net, reference)):
        torch.testing.assert_close(ours, expected)
    # no weight decay on biases and norms, as timm's factory does
    assert sorted(g["weight_decay"] for g in fused.param_groups) == [0.0, 0.05]


def test_optimizers_without_a_fused_kernel_are_built_as_before():
    optimizer = create_optimizer(_net(), "lamb", lr=0.1, weight_decay=0.05, momentum=0.9)
    assert type(optimizer).__name__ == "Lamb" and "fused" not in optimizer.defaults


def test_fused_supported_needs_floating_parameters_on_cpu_or_cuda():
    assert fused_supported(_net().parameters())
    assert not fused_supported([])
    assert not fused_supported([nn.Parameter(torch.zeros(2, device="meta"))])
