"""Writes ``predict`` outputs to files a user can open: a CSV of top-k classes and an .npz of maps."""
from __future__ import annotations

import csv
import os
from typing import Any, Optional, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Save what ``predict_step`` returns at the end of ``predict``.

    Writes ``predictions.csv`` (one row per image: index, label if known, top-k classes and
    probabilities, with class names where the DataModule has ``classes``) and ``predictions.npz``
    (every returned array, e.g. ``attention`` ``(N, H, W)``), under ``output_dir`` or, when that is
    ``None``, ``<trainer.log_dir or default_root_dir>/predictions``. Under DDP each rank writes its
    own pair with a ``.rank<k>`` suffix, since the distributed sampler gives ranks disjoint images.
    """

    def __init__(self, output_dir: Optional[str] = None) -> None:
        super().__init__(write_interval="epoch")
        self.output_dir = output_dir

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        batches = [b for loader in predictions for b in loader] if predictions and isinstance(predictions[0], list) else predictions
        if not batches:
            return
        arrays = {key: torch.cat([b[key] for b in batches]).cpu().numpy() for key in batches[0]}
        out_dir = self.output_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions")
        os.makedirs(out_dir, exist_ok=True)
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        np.savez_compressed(os.path.join(out_dir, f"predictions{suffix}.npz"), **arrays)

        classes = getattr(trainer.datamodule, "classes", None)
        name = (lambda i: classes[i]) if classes else str
        k = arrays["topk_classes"].shape[1]
        with open(os.path.join(out_dir, f"predictions{suffix}.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            header = ["index"] + (["label"] if "label" in arrays else [])
            header += [f"top{i + 1}_{field}" for i in range(k) for field in ("class", "prob")]
            writer.writerow(header)
            for row in range(len(arrays["topk_classes"])):
                cells: list[Any] = [row] + ([name(int(arrays["label"][row]))] if "label" in arrays else [])
                for i in range(k):
                    cells += [name(int(arrays["topk_classes"][row, i])), f"{arrays['topk_probs'][row, i]:.4f}"]
                writer.writerow(cells)
