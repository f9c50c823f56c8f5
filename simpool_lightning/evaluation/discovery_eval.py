"""Unsupervised single-object discovery (CorLoc on VOC07, VOC12, COCO-20k) by the SimPool paper's protocol.

The paper (arXiv 2309.06891, Sec. 4.1 "Downstream tasks" and Sec. 4.3 "Unsupervised object
discovery", Table 6) evaluates a DINO-pretrained ViT-S without fine-tuning in two ways, both run by
LOST's code (valeoai/LOST, Siméoni et al., BMVC 2021): **LOST**, "which uses the raw features" (LOST's
default: the keys of the last block's attention), and LOST's **DINO-seg** baseline, "which uses the
attention maps instead" (for SimPool, its attention map ``a``). :class:`DiscoveryEvaluator` runs
both on any ``ImageClassifier`` or ``DINO`` checkpoint (DINO: its teacher), and, as a third, named
option, the box of the largest component of the attention map upsampled to the image and cut at 60%
of its mass (``"attention_mass"``, this package's earlier CorLoc).

::

    simpool test -c configs/downstream/corloc_voc07.yaml --data.init_args.root /data \\
        --model.init_args.checkpoint runs/dino/vit_s_simpool/checkpoints/last.ckpt

Each batch image is zero-padded at the bottom and right to whole patches (LOST pads its normalised
image the same way); the keys are read from the last block's ``attn.qkv`` by a forward hook, [CLS]
and register tokens dropped. The rules that turn keys and maps into boxes, and the hit rule, are in
:mod:`simpool_lightning.metrics.discovery`. LOST feeds each image at its own size; with
``image_size: null`` and ``batch_size: 1`` in the data config (the shipped configs) this does too,
which needs a ViT that takes any input size (timm's ``dynamic_img_size=True``). One difference
remains there, in the backbone: timm resamples the position embeddings to the grid by its size,
DINO's ViT (which LOST runs) by a scale factor offset by 0.1 patch, so features differ slightly.
With a fixed-size ViT, ``image_size: 224`` squashes the images (boxes scale with them).
"""
from __future__ import annotations

from typing import Any, Literal, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..metrics.discovery import DiscoveryCorLoc, dino_seg_box, lost
from ..metrics.localization import CorLoc
from ..models import DINO, PooledBackbone
from .frozen import FrozenEvaluator, load_feature_model

__all__ = ["DISCOVERY_METHODS", "DiscoveryEvaluator"]

DISCOVERY_METHODS = ("lost", "dino_seg", "attention_mass")
_QKV = {"q": 0, "k": 1, "v": 2}


def _pooled_backbone(model: nn.Module) -> PooledBackbone:
    """The backbone whose features the model's ``features`` pools: a DINO's teacher, else ``.backbone``."""
    backbone = model.teacher.backbone if isinstance(model, DINO) else getattr(model, "backbone", None)
    if not isinstance(backbone, PooledBackbone):
        raise TypeError(f"{type(model).__name__} has no PooledBackbone (.backbone or DINO's .teacher.backbone) to discover objects with")
    return backbone


class DiscoveryEvaluator(FrozenEvaluator):
    """CorLoc of a frozen model's discovered boxes, one box per image and method.

    ``validate`` logs under ``val/``, ``test`` under ``test/``: ``corloc_<method>`` in ``[0, 1]`` for
    each method, the fraction of images whose box has IoU >= ``iou_threshold`` with some
    ground-truth box (LOST's IoU for ``lost`` and ``dino_seg``; :class:`~..metrics.CorLoc` for
    ``attention_mass``).

    Args:
        model, checkpoint, model_kwargs: the model, as for
            :func:`~simpool_lightning.evaluation.load_feature_model`.
        methods: any of ``"lost"`` (LOST on the last block's features, a ViT only),
            ``"dino_seg"`` (LOST's DINO-seg on the pool's attention at patch resolution) and
            ``"attention_mass"`` (largest component of the map upsampled to the padded image and
            cut back to the image, keeping ``mass``).
        k_patches: LOST's number of lowest-degree patches in the expansion (100).
        which_features: LOST's ``--which_features``: the last block's keys ``"k"`` (its default,
            the paper's "raw features"), queries ``"q"`` or values ``"v"``.
        dinoseg_head: the attention head DINO-seg uses (LOST: ``--dinoseg_head 4`` of ViT-S's six
            [CLS] heads); ``None`` averages the heads (SimPool has one).
        mass: attention mass DINO-seg and ``attention_mass`` keep (0.6, DINO's and LOST's).
        iou_threshold: IoU of a hit (LOST: 0.5).

    Raises:
        ValueError: an unknown method or feature name; ``lost`` on a model without a ViT's last
            ``attn.qkv``; ``dino_seg`` / ``attention_mass`` on a pool without spatial attention.
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "simpool_lightning.models.DINO",
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        methods: Sequence[str] = ("lost", "dino_seg"),
        k_patches: int = 100,
        which_features: Literal["k", "q", "v"] = "k",
        dinoseg_head: Optional[int] = None,
        mass: float = 0.6,
        iou_threshold: float = 0.5,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[] if isinstance(model, str) else ["model"])
        methods = (methods,) if isinstance(methods, str) else tuple(methods)
        unknown = [m for m in methods if m not in DISCOVERY_METHODS]
        if not methods or unknown or len(set(methods)) != len(methods):
            raise ValueError(f"methods must be distinct names from {DISCOVERY_METHODS}, got {list(methods)}")
        if which_features not in _QKV:
            raise ValueError(f"which_features must be one of {tuple(_QKV)}, got {which_features!r}")
        if k_patches < 1:
            raise ValueError(f"k_patches must be a positive int, got {k_patches}")
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        self.model = load_feature_model(model, checkpoint, model_kwargs).eval().requires_grad_(False)
        _pooled_backbone(self.model)  # fail now, not at the first batch
        self.methods = methods
        self.k_patches, self.which_features, self.dinoseg_head, self.mass = k_patches, which_features, dinoseg_head, mass

        if "lost" in methods:
            attn = getattr(getattr(self.backbone.model, "blocks", [None])[-1], "attn", None)
            if not isinstance(getattr(attn, "qkv", None), nn.Linear):
                raise ValueError(
                    f"method 'lost' reads the keys of a ViT's last block (blocks[-1].attn.qkv); "
                    f"{type(self.backbone.model).__name__} has none"
                )
        if {"dino_seg", "attention_mass"} & set(methods) and not self.backbone.has_attention:
            raise ValueError(
                f"methods 'dino_seg' and 'attention_mass' need spatial attention; the pool {self.backbone.pool_name!r} "
                f"has none (method 'lost' works with any pool)"
            )
        self.corloc = nn.ModuleDict(
            {
                m: CorLoc(iou_threshold=iou_threshold, mass=mass) if m == "attention_mass" else DiscoveryCorLoc(iou_threshold)
                for m in methods
            }
        )

    @property
    def backbone(self) -> PooledBackbone:
        """The model's backbone (a DINO's teacher's), not registered twice as a submodule."""
        return _pooled_backbone(self.model)

    def _patch_size(self) -> tuple[int, int]:
        patch_embed = getattr(self.backbone.model, "patch_embed", None)
        size = getattr(patch_embed, "patch_size", None)
        return (int(size[0]), int(size[1])) if size is not None else (1, 1)

    def _forward(self, images: Tensor) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Padded images -> (last-block features ``(B, N, C)`` or ``None``, attention ``(B, heads, h, w)`` or ``None``)."""
        captured: list[Tensor] = []

        def keep_first(_module: nn.Module, _args: Any, output: Tensor) -> None:
            # The first call is the forward pass; [CLS] pooling calls qkv again to recompute attention.
            if not captured:
                captured.append(output)

        handle = self.backbone.model.blocks[-1].attn.qkv.register_forward_hook(keep_first) if "lost" in self.methods else None
        try:
            if "dino_seg" in self.methods:
                _, attn = self.backbone.forward_with_attention(images)
            else:
                attn = None
                self.backbone.forward_features(images)
        finally:
            if handle is not None:
                handle.remove()
        feats = None
        if captured:
            qkv = captured[0]
            dim = qkv.shape[-1] // 3
            index = _QKV[self.which_features]
            feats = qkv[..., index * dim : (index + 1) * dim][:, self.backbone.num_prefix_tokens :]
        return feats, attn

    def _pad(self, images: Tensor) -> Tensor:
        """Zero-pad ``(B, 3, H, W)`` at the bottom and right to whole patches, as LOST pads its normalised image."""
        ph, pw = self._patch_size()
        return F.pad(images, (0, -images.shape[-1] % pw, 0, -images.shape[-2] % ph))

    @torch.no_grad()
    def discover(self, images: Tensor) -> dict[str, Tensor]:
        """One box per image for each of ``lost`` and ``dino_seg`` in :attr:`methods`.

        Args:
            images: ``(B, 3, H, W)`` normalised images (padded here to whole patches).

        Returns:
            ``{method: (B, 4)}`` float64 xyxy pixel boxes in the frame of ``images``.
        """
        height, width = images.shape[-2:]
        ph, pw = self._patch_size()
        padded = self._pad(images)
        feats, attn = self._forward(padded)
        boxes: dict[str, Tensor] = {}
        if feats is not None:
            grid = (padded.shape[-2] // ph, padded.shape[-1] // pw)
            if feats.shape[1] != grid[0] * grid[1]:
                raise ValueError(f"the last block has {feats.shape[1]} patch tokens, the {tuple(padded.shape[-2:])} input a {grid} grid")
            boxes["lost"] = torch.stack([lost(f, grid, (ph, pw), (height, width), self.k_patches).box for f in feats])
        if attn is not None:
            if self.dinoseg_head is None:
                maps = attn.float().mean(1)
            elif not 0 <= self.dinoseg_head < attn.shape[1]:
                raise ValueError(f"dinoseg_head={self.dinoseg_head}, but the pool has {attn.shape[1]} head(s)")
            else:
                maps = attn[:, self.dinoseg_head].float()
            scale = (padded.shape[-2] / maps.shape[-2], padded.shape[-1] / maps.shape[-1])
            boxes["dino_seg"] = torch.stack([dino_seg_box(m, scale, self.mass) for m in maps])
        return boxes

    def _step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        if "boxes" not in batch:
            raise ValueError(f"object discovery needs batches with 'boxes'; this batch has {sorted(batch)}")
        images, gt = batch["image"], batch["boxes"]
        if "attention_mass" in self.methods:
            # The map of the padded image, upsampled to it, then cut to the image (no padding at 224 px).
            padded = self._pad(images)
            maps = self.model.attention_maps(padded, size=tuple(padded.shape[-2:])).float()
            self.corloc["attention_mass"].update(maps[..., : images.shape[-2], : images.shape[-1]], gt)
        if {"lost", "dino_seg"} & set(self.methods):
            for method, boxes in self.discover(images).items():
                self.corloc[method].update(boxes, gt)

    def _end(self, stage: str) -> None:
        scores = {}
        for method, metric in self.corloc.items():
            if metric.update_called:
                scores[f"{stage}/corloc_{method}"] = metric.compute()
            metric.reset()
        self.log_dict(scores, prog_bar=True)
