"""Instance retrieval of any model's pooled features on revisited Oxford 5k and Paris 6k.

DINO's protocol (``eval_image_retrieval.py``): every database image and every query is described by
the frozen model's ``features``, L2-normalised; database images are ranked by cosine similarity to
each query, and the ranking is scored by :func:`~.retrieval.revisited_map` (mAP in %, junk images
taken out). Queries are cropped to their box, as the revisited protocol says, by
:class:`~simpool_lightning.data.RevisitedRetrievalDataModule` (``crop_queries=False`` feeds them
whole, as DINO's script does).

Multi-scale, as DINO's ``utils.multi_scale``: the image at scales 1, 1/sqrt(2) and 1/2 (bilinear,
``align_corners=False``), the three raw feature vectors averaged, the average L2-normalised. (No
per-scale normalisation and no GeM-style power: DINO's choice, kept.)

    simpool test -c configs/downstream/retrieval_roxford.yaml --data.init_args.root /data \\
        --model.init_args.checkpoint runs/dino/vit_s_simpool/checkpoints/last.ckpt

Under DDP each process describes a shard of each set; the shards are all-gathered and put back in
dataset order by the ``index`` of every sample, and a set whose indices do not cover it exactly once
is an error (every database image counts in mAP).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .frozen import FrozenEvaluator, FrozenFeatures, load_feature_model
from ..metrics.knn import gather_features
from ..metrics.retrieval import revisited_map

__all__ = ["MULTISCALE", "RetrievalEvaluator"]

MULTISCALE: tuple[float, ...] = (1.0, 2**-0.5, 0.5)
"""DINO's scales for multi-scale descriptors."""

SETS = ("database", "query")  # RevisitedRetrievalDataModule's loaders, in dataloader_idx order


def _check_any_input_size(model: nn.Module) -> None:
    """Retrieval images keep their aspect: a timm ViT must be built to take any size."""
    for name, module in model.named_modules():
        fixed = getattr(module, "strict_img_size", False) or not getattr(module, "dynamic_img_pad", True)
        if getattr(module, "img_size", None) is not None and fixed:
            raise ValueError(
                f"{name or type(model).__name__} ({type(module).__name__}) takes only {tuple(module.img_size)} inputs, "
                f"or sizes divisible by the patch; retrieval feeds every image at its own size (aspect kept, "
                f"rescaled for multi-scale). Build the ViT with backbone_kwargs dynamic_img_size: true and "
                f"dynamic_img_pad: true, e.g. --model.init_args.model_kwargs "
                f"'{{backbone_kwargs: {{dynamic_img_size: true, dynamic_img_pad: true}}}}' (they replace the "
                f"checkpoint's backbone_kwargs: repeat any others it has)"
            )


def _in_dataset_order(features: Tensor, indices: Tensor, names: Sequence[str], what: str) -> Tensor:
    """Rows of ``features`` ``(n, D)`` placed at their ``indices``; each of ``len(names)`` exactly once."""
    size = len(names)
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= size):
        raise ValueError(f"{what} indices must lie in [0, {size}), got [{int(indices.min())}, {int(indices.max())}]")
    counts = torch.bincount(indices, minlength=size)
    if (counts != 1).any():
        missing = [names[i] for i in (counts == 0).nonzero().flatten().tolist()]
        repeated = [names[i] for i in (counts > 1).nonzero().flatten().tolist()]
        raise ValueError(
            f"every {what} image must be described exactly once, but {len(missing)} are missing "
            f"{missing[:5]} and {len(repeated)} repeated {repeated[:5]} (an unreadable image skipped with "
            f"on_bad_image='skip' is replaced by the next one; limit_*_batches leaves images out): mAP "
            f"needs the whole set"
        )
    ordered = features.new_empty(size, features.shape[1])
    ordered[indices] = features
    return ordered


class RetrievalEvaluator(FrozenEvaluator):
    """mAP of a frozen model's features on revisited Oxford or Paris.

    ``test`` (or ``validate``) with a :class:`~simpool_lightning.data.RevisitedRetrievalDataModule`
    logs ``<stage>/mAP_easy``, ``<stage>/mAP_medium`` and ``<stage>/mAP_hard`` in %, ``stage``
    being ``test`` or ``val``.

    Args:
        model, checkpoint, model_kwargs: the feature model (its ``features(images) -> (B, D)``), as
            for :class:`~simpool_lightning.evaluation.KNNEvaluator`: a class path and checkpoint, or a
            built module. A timm ViT must take images of any size (``dynamic_img_size`` and
            ``dynamic_img_pad``); the error says how.
        multiscale: describe each image at :data:`MULTISCALE` (DINO's ``--multiscale``).
    """

    def __init__(
        self,
        model: Union[str, nn.Module] = "simpool_lightning.models.DINO",
        checkpoint: Optional[str] = None,
        model_kwargs: Optional[dict[str, Any]] = None,
        multiscale: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=[] if isinstance(model, str) else ["model"])
        model = load_feature_model(model, checkpoint, model_kwargs)
        _check_any_input_size(model)
        self.encoder = FrozenFeatures(model)
        self.scales = MULTISCALE if multiscale else (1.0,)
        self._described: dict[str, list[tuple[Tensor, Tensor]]] = {}

    def descriptor(self, images: Tensor) -> Tensor:
        """L2-normalised global descriptors: ``(B, 3, H, W)`` -> ``(B, D)`` float32.

        The mean of the features at every scale in ``self.scales`` (the images resized by
        ``scale_factor``, bilinear), then normalised.
        """
        resized = (
            images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            for scale in self.scales
        )
        return F.normalize(sum(self.encoder(x).float() for x in resized) / len(self.scales), dim=1)

    def _start(self) -> None:
        datamodule = self.trainer.datamodule
        if not all(hasattr(datamodule, a) for a in ("gnd", "imlist", "qimlist")):
            raise RuntimeError(
                f"{type(self).__name__} needs a RevisitedRetrievalDataModule (with gnd, imlist and qimlist), "
                f"got {type(datamodule).__name__}"
            )
        self._described = {s: [] for s in SETS}

    def _step(self, batch: dict[str, Any], dataloader_idx: int) -> None:
        self._described[SETS[dataloader_idx]].append((self.descriptor(batch["image"]), batch["index"]))

    def _gathered(self, which: str, names: Sequence[str]) -> Tensor:
        described = self._described[which]
        if described:
            features, indices = (torch.cat(parts) for parts in zip(*described))
        else:  # a process may get no sample of a set smaller than the world
            features = torch.zeros(0, self.encoder.out_dim, device=self.device)
            indices = torch.zeros(0, dtype=torch.long, device=self.device)
        features, indices = gather_features(features, indices.to(features.device))
        return _in_dataset_order(features, indices.long(), names, which)

    def _end(self, stage: str) -> None:
        datamodule = self.trainer.datamodule
        database = self._gathered("database", datamodule.imlist)
        queries = self._gathered("query", datamodule.qimlist)
        self._described = {}
        # Every process holds both sets whole, so every process logs the same numbers.
        result = revisited_map(queries, database, datamodule.gnd, protocols=("easy", "medium", "hard"))
        metrics = {f"{stage}/mAP_{protocol}": value for protocol, value in result.items()}
        self.log_dict(metrics, add_dataloader_idx=False)
