"""A straightforward re-implementation of the official SimPool formula (billpsomas/simpool ``sp.py``).

The test oracle for :class:`simpool_lightning.pooling.SimPool` and the "official form" of the
pooling benchmark. It projects every location through ``W_k`` (O(N d^2)), takes the minimum over
the whole batch as the official code does, and fixes only what the official module gets wrong:
it runs on any device, keeps batch size 1 as a batch, and reshapes multi-head gamma output to
``(B, dim)``.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn


class OfficialSimPool(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int = 1,
        qkv_bias: bool = False,
        qk_scale: Optional[float] = None,
        gamma: Optional[float] = None,
        use_beta: bool = False,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.norm_patches = nn.LayerNorm(dim, eps=1e-6)
        self.wq = nn.Linear(dim, dim, bias=qkv_bias)
        self.wk = nn.Linear(dim, dim, bias=qkv_bias)
        self.gamma = gamma
        self.use_beta = use_beta
        if use_beta:
            self.beta = nn.Parameter(torch.zeros(1))
        self.eps = 1e-6

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x`` maps (B, d, H, W) or tokens (B, N, d) -> pooled (B, d), attention (B, heads, N)."""
        if x.dim() == 4:
            x = x.flatten(2).transpose(1, 2)
        b, n, d = x.shape
        h = self.num_heads
        q = x.mean(1, keepdim=True)
        k = v = self.norm_patches(x)
        qq = self.wq(q).reshape(b, 1, h, d // h).permute(0, 2, 1, 3)
        kk = self.wk(k).reshape(b, n, h, d // h).permute(0, 2, 1, 3)
        vv = v.reshape(b, n, h, d // h).permute(0, 2, 1, 3)
        attn = ((qq @ kk.transpose(-2, -1)) * self.scale).softmax(dim=-1)  # (B, h, 1, N)
        if self.gamma is not None:
            out = torch.pow(attn @ torch.pow(vv - vv.min() + self.eps, self.gamma), 1 / self.gamma)
            if self.use_beta:
                out = out + self.beta
        else:
            out = attn @ vv
        return out.transpose(1, 2).reshape(b, d), attn[:, :, 0]
