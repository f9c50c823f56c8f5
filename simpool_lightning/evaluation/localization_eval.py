"""Localization quality of any checkpoint's attention maps, for the CLI.

:class:`LocalizationEvaluator` loads a trained model (``ImageClassifier`` or ``DINO``, the
teacher) and scores ``model.attention_maps`` on whatever the batches carry:

- ``boxes``: MaxBoxAccV2 (``BoxAcc`` at IoU 0.3, 0.5, 0.7 and their mean; the paper's CUB and
  ImageNet protocol, computed as clovaai/wsolevaluation computes it) and CorLoc of the
  thresholded map's largest component;
- ``mask``: mask IoU (Jaccard) of the thresholded map with the foreground mask.

::

    simpool test -c configs/downstream/loc_cub.yaml --data.init_args.root /data \\
        --model.init_args.checkpoint runs/supervised/vit_s_simpool/checkpoints/last.ckpt

The maps are brought to the batch's image size, the frame its boxes and masks are given in: for
MaxBoxAccV2 as wsolevaluation's ``inference.py`` does (bicubic ``cv2.resize`` of the map in
float64, :func:`~simpool_lightning.metrics.localization.resize_scoremaps`), for CorLoc and mask
IoU bilinearly (``attention_to_maps``, as the models draw their maps).
Every metric is a torchmetrics object that sums its counts, so under DDP each process scores its
shard (the evaluation sampler does not pad) and the logged numbers cover the whole dataset.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

from torch import Tensor, nn
from torchmetrics import Metric

from ..metrics.localization import CorLoc, MaskIoU
from ..metrics.maxboxacc import BOX_PROTOCOLS, MaxBoxAccV2, resize_scoremaps
from ..models.backbone import PooledBackbone
from ..models.classifier import attention_to_maps
from .frozen import FrozenEvaluator, load_feature_model

__all__ = ["LocalizationEvaluator"]


class LocalizationEvaluator(FrozenEvaluator):
    """Scores a frozen model's attention maps against ground-truth boxes and masks.

    ``validate`` logs under ``val/``, ``test`` under ``test/``: ``MaxBoxAccV2`` and
    ``BoxAcc@{iou}`` and ``corloc`` where batches have ``boxes``, ``mask_iou`` where they have
    ``mask`` (all in ``[0, 1]``).

    Args:
        model, checkpoint, model_kwargs: the model, as for
            :func:`~simpool_lightning.evaluation.load_feature_model`: a class path
            (``"simpool_lightning.models.ImageClassifier"``, ``"DINO"``) and its Lightning
            checkpoint, or a built module. It needs ``attention_maps(images) -> (B, h, w)``, the
            maps at the model's feature grid (as ``ImageClassifier`` and ``DINO`` give them).
        iou_thresholds: MaxBoxAccV2's IoU thresholds (wsolevaluation: 0.3, 0.5, 0.7).
        num_thresholds: MaxBoxAccV2's CAM thresholds ``np.arange(0, 1, 1 / num_thresholds)``
            (wsolevaluation: ``cam_curve_interval`` 0.001, i.e. 1000).
        box_protocol: ``"wsolevaluation"`` (default): the released code's MaxBoxAccV2 on maps
            resized bicubically by OpenCV; ``"components"``: the package's earlier reading (see
            :class:`~simpool_lightning.metrics.MaxBoxAccV2`) on the bilinear maps, which
            differs on purpose and does not reproduce published numbers.
        corloc_iou: IoU a CorLoc box needs with some ground-truth box (LOST: 0.5).
        mass: attention mass kept when thresholding maps for CorLoc and mask IoU (DINO: 0.6).

    Raises:
        ValueError: the model's pool has no spatial attention (e.g. ``avg``); the message names it.
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "simpool_lightning.models.ImageClassifier",
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        iou_thresholds: Sequence[float] = (0.3, 0.5, 0.7),
        num_thresholds: int = 1000,
        corloc_iou: float = 0.5,
        mass: float = 0.6,
        box_protocol: str = "wsolevaluation",
    ) -> None:
        super().__init__()
        if box_protocol not in BOX_PROTOCOLS:
            raise ValueError(f"box_protocol must be one of {BOX_PROTOCOLS}, got {box_protocol!r}")
        self.save_hyperparameters(ignore=[] if isinstance(model, str) else ["model"])
        self.model = load_feature_model(model, checkpoint, model_kwargs).eval().requires_grad_(False)
        if not callable(getattr(self.model, "attention_maps", None)):
            raise TypeError(f"{type(self.model).__name__} has no attention_maps(images, size) to evaluate")
        silent = sorted({m.pool_name for m in self.model.modules() if isinstance(m, PooledBackbone) and not m.has_attention})
        if silent:
            source = f"the checkpoint {checkpoint!r}" if checkpoint else f"the {type(self.model).__name__}"
            raise ValueError(
                f"{source} pools with {silent[0]!r}, which has no spatial attention to localize with; "
                f"evaluate a model whose pool has attention (simpool, token, ...)"
            )
        self.box_acc = MaxBoxAccV2(iou_thresholds=iou_thresholds, num_thresholds=num_thresholds, protocol=box_protocol)
        self.corloc = CorLoc(iou_threshold=corloc_iou, mass=mass)
        self.mask_iou = MaskIoU(mass=mass)

    def attention_maps(self, images: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> the model's attention maps upsampled bilinearly to the images, ``(B, H, W)`` float32."""
        return attention_to_maps(self.model.attention_maps(images).float()[:, None], tuple(images.shape[-2:]))

    def _step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        if "boxes" not in batch and "mask" not in batch:
            raise ValueError(f"localization needs batches with 'boxes' or 'mask'; this batch has {sorted(batch)}")
        size = tuple(batch["image"].shape[-2:])
        native = self.model.attention_maps(batch["image"]).float()  # (B, h, w) at the feature grid
        maps = attention_to_maps(native[:, None], size)
        if "boxes" in batch:
            scoremaps = resize_scoremaps(native, size) if self.box_acc.protocol == "wsolevaluation" else maps
            self.box_acc.update(scoremaps, batch["boxes"])
            self.corloc.update(maps, batch["boxes"])
        if "mask" in batch:
            self.mask_iou.update(maps, batch["mask"])

    def _end(self, stage: str) -> None:
        scores: dict[str, Tensor] = {}
        metrics: dict[str, Metric] = {"box_acc": self.box_acc, "corloc": self.corloc, "mask_iou": self.mask_iou}
        for name, metric in metrics.items():
            if metric.update_called:  # only what the data carries
                value = metric.compute()  # MaxBoxAccV2 gives its own names: MaxBoxAccV2, BoxAcc@0.3 ...
                scores.update(value if isinstance(value, dict) else {name: value})
            metric.reset()
        self.log_dict({f"{stage}/{name}": value for name, value in scores.items()}, prog_bar=True)

