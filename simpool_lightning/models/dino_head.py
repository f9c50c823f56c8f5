"""DINO's building blocks: the projection head, the multi-crop network and the loss with its center.

Caron et al., "Emerging Properties in Self-Supervised Vision Transformers", ICCV 2021.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

from .backbone import PooledBackbone

__all__ = ["DINOHead", "DINOLoss", "MultiCropNet"]


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> weight-normalised linear layer to ``out_dim`` prototypes.

    Args:
        in_dim: width of the pooled features.
        out_dim: number of prototypes ``K`` (65536 for ViT-S in the paper).
        use_bn: BatchNorm after each hidden linear layer (DINO uses it with ResNet-50).
        norm_last_layer: fix the weight norm's magnitude ``g`` to 1, so every prototype has unit
            norm; ``False`` learns it (better for ViT-S, less stable).
        num_layers: linear layers in the MLP, bottleneck included (at least 1).
        hidden_dim: width of the hidden layers.
        bottleneck_dim: width of the bottleneck the last layer reads.

    Shapes: ``(B, in_dim)`` -> ``(B, out_dim)``. The last layer is ``last_layer``: DINO freezes it
    in the first epoch, found by that name.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        num_layers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(d_in, d_out))
            if i < num_layers - 1:
                if use_bn:
                    layers.append(nn.BatchNorm1d(d_out))
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        return self.last_layer(F.normalize(self.mlp(x), dim=-1))


class MultiCropNet(nn.Module):
    """Backbone + pool + DINO head over a list of crops of possibly different resolutions.

    Consecutive crops of one resolution go through the backbone as one batch (DINO's
    ``MultiCropWrapper``): with 2 global and N local crops that is two backbone calls, and the head
    runs once on everything.
    """

    def __init__(self, backbone: PooledBackbone, head: DINOHead) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, crops: Sequence[Tensor]) -> Tensor:
        """``V`` crops ``(B, 3, h_v, w_v)`` -> ``(V * B, out_dim)``, crop after crop."""
        pooled, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            pooled.append(self.backbone(torch.cat(list(crops[start:end]))))
            start = end
        return self.head(torch.cat(pooled))


class DINOLoss(nn.Module):
    """Cross-entropy between the centred, sharpened teacher and the student, over views.

    Every teacher view (the global crops) is compared with every student view except itself.
    After each call the center, a buffer, moves towards the mean teacher output of the step:
    ``center <- center * m + (1 - m) * mean(teacher_output)``, the mean taken over every process
    (all-reduced) when ``torch.distributed`` is initialised, so all processes keep one center.

    Args:
        out_dim: ``K``.
        student_temp: temperature of the student softmax (DINO: 0.1).
        center_momentum: ``m`` of the center's EMA (DINO: 0.9).
    """

    center: Tensor

    def __init__(self, out_dim: int, student_temp: float = 0.1, center_momentum: float = 0.9) -> None:
        super().__init__()
        if student_temp <= 0 or not 0 <= center_momentum <= 1:
            raise ValueError(f"need student_temp > 0 and center_momentum in [0, 1], got {student_temp}, {center_momentum}")
        self.student_temp = student_temp
        self.center_momentum = center_momentum
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: Tensor, teacher_output: Tensor, teacher_temp: float) -> Tensor:
        """Loss of one step; updates the center afterwards.

        Args:
            student_output: ``(V, B, K)``: V views, of which the first G are the teacher's views.
            teacher_output: ``(G, B, K)``.
            teacher_temp: temperature of the teacher softmax (sharpening).

        Returns:
            The mean over the ``G * V - G`` view pairs of the batch-mean cross-entropy, a scalar.
        """
        if student_output.dim() != 3 or teacher_output.dim() != 3:
            raise ValueError(
                f"student_output (V, B, K) and teacher_output (G, B, K) must be 3-d, "
                f"got {tuple(student_output.shape)} and {tuple(teacher_output.shape)}"
            )
        (v, b, k), (g, bt, kt) = student_output.shape, teacher_output.shape
        if (b, k) != (bt, kt) or not 1 <= g <= v or v < 2:
            raise ValueError(
                f"student_output (V, B, K) = {(v, b, k)} and teacher_output (G, B, K) = {(g, bt, kt)} must share "
                f"B and K, with 1 <= G <= V and V >= 2"
            )
        log_student = F.log_softmax(student_output.float() / self.student_temp, dim=-1)
        teacher = F.softmax((teacher_output.float() - self.center) / teacher_temp, dim=-1).detach()
        cross_entropy = -torch.einsum("gbk,vbk->gv", teacher, log_student) / b  # (G, V), batch means
        different_views = ~torch.eye(g, v, dtype=torch.bool, device=cross_entropy.device)
        loss = cross_entropy[different_views].mean()
        self.update_center(teacher_output)
        return loss

    @torch.no_grad()
    def update_center(self, teacher_output: Tensor) -> None:
        """EMA of the center towards the mean of ``teacher_output`` ``(..., K)`` over all processes."""
        total = teacher_output.detach().float().reshape(-1, self.center.shape[-1]).sum(0, keepdim=True)
        count = teacher_output.numel() // self.center.shape[-1]
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(total)
            count *= dist.get_world_size()
        self.center.mul_(self.center_momentum).add_(total / count, alpha=1 - self.center_momentum)
