"""The authors' DINO fork, re-implemented from reading it: the test oracle for DINO checkpoint imports.

Follows billpsomas/simpool at commit fac2263537c376384f3d52bca795bcca08302686, directory
``self_supervised/``: ``vision_transformer.py`` (ViT and ``DINOHead``), ``resnet.py`` (torchvision's
ResNet with ``mode``), ``convnext.py`` (the ConvNeXt paper's code with ``mode``), ``utils.py``
(``MultiCropWrapper``, ``has_batchnorms``) and ``main_dino.py`` (what it builds and saves). SimPool
is :class:`tests.reference.official_simpool.OfficialSimPool` (``sp.py``).

Parameter names, module nesting and forward arithmetic are the fork's, so that a state dict of these
modules is an official one, key for key. Where this file deliberately differs:

- sizes are constructor arguments (ResNet ``layers`` and ``width_per_group``, as torchvision has
  them, ConvNeXt ``depths`` / ``dims``, any ViT width), so the tests run small networks of the same code;
- SimPool keeps batch size 1 as a batch and runs on any device (``OfficialSimPool``), where ``sp.py``
  squeezes and is hard-wired to CUDA;
- nothing here initialises weights the fork's way: the tests overwrite every parameter anyway.

The fork's quirks are kept: the SimPool-mode ViT resamples its position embedding at every forward
(:meth:`OfficialViT.interpolate_pos_encoding`), and the ViT teacher is built with the constructor's
default gamma (1.25), whatever ``--gamma`` says (:func:`main_dino_networks`).
"""
from __future__ import annotations

import argparse
import math
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tests.reference.official_simpool import OfficialSimPool

__all__ = [
    "OfficialConvNeXt",
    "OfficialDINOHead",
    "OfficialResNet",
    "OfficialViT",
    "MultiCropWrapper",
    "has_batchnorms",
    "main_dino_checkpoint",
    "main_dino_networks",
]


# ---------------------------------------------------------------------- ViT (vision_transformer.py)


class _Attention(nn.Module):
    """Multi-head self-attention; names ``qkv`` and ``proj``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm block; the vit_* constructors give every LayerNorm eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(3, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class OfficialViT(nn.Module):
    """``VisionTransformer(mode, gamma)`` of the fork (vit_tiny / vit_small / vit_base have qkv_bias=True).

    ``mode="official"``: a [CLS] token, ``pos_embed`` of ``num_patches + 1``, output ``norm(x)[:, 0]``.
    ``mode="simpool"``: no [CLS] token, ``pos_embed`` of ``num_patches``, output
    ``norm(simpool(x))`` with ``SimPool(embed_dim, gamma=gamma, use_beta=True)``.
    """

    def __init__(
        self,
        mode: str,
        gamma: Optional[float] = 1.25,
        img_size: int = 224,
        patch_size: int = 16,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.embed_dim = embed_dim
        self.patch_embed = _PatchEmbed(img_size, patch_size, embed_dim)
        n = self.patch_embed.num_patches
        if mode == "official":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, embed_dim))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim))
        self.blocks = nn.ModuleList(_Block(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        if mode == "simpool":
            # use_beta=True, but sp.py creates beta only with a gamma
            self.simpool = OfficialSimPool(embed_dim, gamma=gamma, use_beta=gamma is not None)
        self.head: nn.Module = nn.Identity()  # num_classes=0

    def interpolate_pos_encoding(self, x: Tensor, w: int, h: int) -> Tensor:
        """The fork's rule, quirk included.

        ``npatch`` counts one token too few whenever there is no [CLS] token (``x.shape[1] - 1``),
        so in SimPool mode the early return never fires: the table is bicubic-resampled with scale
        factor ``(w / patch + 0.1) / sqrt(N)`` at every forward, the training resolution included.
        ``w`` and ``h`` are the image's dims 2 and 3 (``B, nc, w, h = x.shape`` in prepare_tokens).
        """
        npatch = x.shape[1] - 1
        n = self.pos_embed.shape[1] - (1 if self.mode == "official" else 0)
        if npatch == n and w == h:
            return self.pos_embed
        patch_pos = self.pos_embed[:, 1:] if self.mode == "official" else self.pos_embed
        dim = x.shape[-1]
        w0 = w // self.patch_embed.patch_size + 0.1
        h0 = h // self.patch_embed.patch_size + 0.1
        side = int(math.sqrt(n))
        patch_pos = F.interpolate(
            patch_pos.reshape(1, side, side, dim).permute(0, 3, 1, 2),
            scale_factor=(w0 / math.sqrt(n), h0 / math.sqrt(n)),
            mode="bicubic",
        )
        assert int(w0) == patch_pos.shape[-2] and int(h0) == patch_pos.shape[-1]
        patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim)
        if self.mode == "official":
            return torch.cat((self.pos_embed[:, :1], patch_pos), dim=1)
        return patch_pos

    def forward(self, x: Tensor) -> Tensor:
        b, _, w, h = x.shape
        x = self.patch_embed(x)
        if self.mode == "official":
            x = torch.cat((self.cls_token.expand(b, -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, w, h)
        for block in self.blocks:
            x = block(x)
        if self.mode == "simpool":
            return self.head(self.norm(self.simpool(x)[0]))
        return self.head(self.norm(x)[:, 0])


# ---------------------------------------------------------------------- ResNet (resnet.py)


class _Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride on the 3 x 3 convolution."""

    expansion = 4

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None, base_width: int = 64
    ) -> None:
        super().__init__()
        width = int(planes * (base_width / 64.0))
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return F.relu(out + identity)


class OfficialResNet(nn.Module):
    """``ResNet(mode, Bottleneck, layers, gamma, width_per_group=64)`` (resnet50: ``layers=(3, 4, 6, 3)``).

    ``mode="simpool"`` replaces ``avgpool`` by ``simpool = SimPool(2048, gamma=gamma)`` (no beta) on
    the last map; ``mode="official"`` averages it. ``fc`` is what ``MultiCropWrapper`` and the eval
    scripts replace by ``nn.Identity()``.
    """

    def __init__(
        self,
        mode: str,
        layers: Sequence[int] = (3, 4, 6, 3),
        gamma: Optional[float] = 2.0,
        num_classes: int = 1000,
        width_per_group: int = 64,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.inplanes = 64
        self.base_width = width_per_group
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        if mode == "simpool":
            self.simpool = OfficialSimPool(512 * 4, gamma=gamma)
        self.fc: nn.Module = nn.Linear(512 * 4, num_classes)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * 4:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False), nn.BatchNorm2d(planes * 4)
            )
        layers = [_Bottleneck(self.inplanes, planes, stride, downsample, self.base_width)]
        self.inplanes = planes * 4
        layers += [_Bottleneck(self.inplanes, planes, base_width=self.base_width) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.simpool(x)[0] if self.mode == "simpool" else x.mean((-2, -1))
        return self.fc(x)


# ---------------------------------------------------------------------- ConvNeXt (convnext.py)


class _ChannelsFirstLayerNorm(nn.Module):
    """The ConvNeXt repo's ``LayerNorm(data_format="channels_first")``: statistics over dim 1, by hand."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + self.eps)
        return self.weight[:, None, None] * x + self.bias[:, None, None]


class _ConvNeXtBlock(nn.Module):
    """dwconv 7 x 7 -> channels-last LayerNorm -> pwconv1 -> GELU -> pwconv2 -> layer scale ``gamma``; residual."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # the repo's channels_last LayerNorm is F.layer_norm
        self.pwconv1 = nn.Linear(dim, 4 * dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(4 * dim, dim)
        self.gamma = nn.Parameter(1e-6 * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        return x + y.permute(0, 3, 1, 2)


class OfficialConvNeXt(nn.Module):
    """``ConvNeXt(mode, gamma, depths, dims)`` (convnext_small: depths (3, 3, 27, 3), dims (96, 192, 384, 768)).

    The final ``norm`` (a LayerNorm, eps 1e-6) follows the pool in both modes:
    ``norm(simpool(x))`` with ``SimPool(dims[-1], gamma=gamma)`` (no beta), or ``norm(x.mean((-2, -1)))``.
    ``head`` (main_dino: ``num_classes=1``) is what ``MultiCropWrapper`` replaces by ``nn.Identity()``.
    """

    def __init__(
        self,
        mode: str,
        gamma: Optional[float] = 2.0,
        depths: Sequence[int] = (3, 3, 27, 3),
        dims: Sequence[int] = (96, 192, 384, 768),
        num_classes: int = 1,
    ) -> None:
        super().__init__()
        self.mode = mode
        self.downsample_layers = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(3, dims[0], kernel_size=4, stride=4), _ChannelsFirstLayerNorm(dims[0]))]
            + [nn.Sequential(_ChannelsFirstLayerNorm(dims[i]), nn.Conv2d(dims[i], dims[i + 1], kernel_size=2, stride=2)) for i in range(3)]
        )
        self.stages = nn.ModuleList(nn.Sequential(*(_ConvNeXtBlock(dims[i]) for _ in range(depths[i]))) for i in range(4))
        self.norm = nn.LayerNorm(dims[-1], eps=1e-6)
        self.head: nn.Module = nn.Linear(dims[-1], num_classes)
        if mode == "simpool":
            self.simpool = OfficialSimPool(dims[-1], gamma=gamma)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(4):
            x = self.stages[i](self.downsample_layers[i](x))
        x = self.simpool(x)[0] if self.mode == "simpool" else x.mean((-2, -1))
        return self.head(self.norm(x))


# ---------------------------------------------------------------------- DINO (vision_transformer.py, utils.py)


class OfficialDINOHead(nn.Module):
    """``DINOHead``: MLP (BatchNorm with ``use_bn``), L2 norm, last layer with the old ``nn.utils.weight_norm``.

    State dict: ``mlp.<i>.*`` (Linear, [BatchNorm1d,] GELU, ...), ``last_layer.weight_g`` and
    ``last_layer.weight_v``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
        for _ in range(nlayers - 2):
            layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
            layers += [nn.GELU(), nn.Linear(hidden_dim, hidden_dim)]
        layers += [nn.BatchNorm1d(hidden_dim)] if use_bn else []
        layers += [nn.GELU(), nn.Linear(hidden_dim, bottleneck_dim)]
        self.mlp = nn.Sequential(*layers)
        self.last_layer = nn.Linear(bottleneck_dim, out_dim, bias=False)
        # The old weight_norm, by hand: its state is weight_g (out, 1) and weight_v, and
        # weight = g * v / ||v|| (row norms), as torch.nn.utils.weight_norm(dim=0) computes it.
        del self.last_layer.weight
        self.last_layer.register_parameter("weight_g", nn.Parameter(torch.ones(out_dim, 1)))
        self.last_layer.register_parameter("weight_v", nn.Parameter(torch.randn(out_dim, bottleneck_dim)))

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1, p=2)
        v, g = self.last_layer.weight_v, self.last_layer.weight_g
        return F.linear(x, g * v / v.norm(dim=1, keepdim=True))


class MultiCropWrapper(nn.Module):
    """``utils.MultiCropWrapper``: drops the backbone's ``fc`` and ``head``; crops of one width go through together."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        backbone.fc, backbone.head = nn.Identity(), nn.Identity()
        self.backbone = backbone
        self.head = head

    def forward(self, x: Any) -> Tensor:
        crops = x if isinstance(x, list) else [x]
        outputs, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            outputs.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(outputs))


def has_batchnorms(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def main_dino_networks(
    arch: str, mode: str, gamma: Optional[float], head: dict[str, Any], **sizes: Any
) -> tuple[MultiCropWrapper, MultiCropWrapper]:
    """Student and teacher as ``main_dino.train_dino`` builds them (before DDP), for ``arch`` in vit, resnet, convnext.

    ``head``: DINOHead's ``out_dim``, ``use_bn``, ``hidden_dim``, ``bottleneck_dim``. ``sizes``: the
    reference class's size arguments. The ViT teacher is built without ``gamma``, so it takes the
    constructor default 1.25 (``vits.__dict__[args.arch](mode=args.mode, patch_size=args.patch_size)``);
    the CNN teachers get ``gamma=args.gamma``.
    """
    if arch == "vit":
        student_backbone: nn.Module = OfficialViT(mode, gamma, **sizes)
        teacher_backbone: nn.Module = OfficialViT(mode, **sizes)
        embed_dim = student_backbone.embed_dim
    elif arch == "resnet":
        student_backbone, teacher_backbone = OfficialResNet(mode, gamma=gamma, **sizes), OfficialResNet(mode, gamma=gamma, **sizes)
        embed_dim = student_backbone.fc.weight.shape[1]
    elif arch == "convnext":
        student_backbone, teacher_backbone = OfficialConvNeXt(mode, gamma, **sizes), OfficialConvNeXt(mode, gamma, **sizes)
        embed_dim = student_backbone.head.weight.shape[1]
    else:
        raise ValueError(f"unknown arch {arch!r}")
    return (
        MultiCropWrapper(student_backbone, OfficialDINOHead(embed_dim, **head)),
        MultiCropWrapper(teacher_backbone, OfficialDINOHead(embed_dim, **head)),
    )


def main_dino_checkpoint(
    student: MultiCropWrapper, teacher: MultiCropWrapper, args: argparse.Namespace, center: Tensor, epoch: int
) -> dict[str, Any]:
    """The ``checkpoint.pth`` dict that main_dino saves after an epoch.

    The student is always wrapped in DDP (``module.``); the teacher only when the network has batch
    norms (``utils.has_batchnorms(student)``), since synchronised batch norms need DDP.
    """
    teacher_prefix = "module." if has_batchnorms(student) else ""
    return {
        "student": {"module." + k: v for k, v in student.state_dict().items()},
        "teacher": {teacher_prefix + k: v for k, v in teacher.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": []},
        "epoch": epoch,
        "args": args,
        "dino_loss": {"center": center},
    }
