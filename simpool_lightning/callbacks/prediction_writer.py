"""Writes ``predict`` outputs to files a user can open: a CSV, an .npz of maps, and pictures."""
from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from pytorch_lightning.callbacks import BasePredictionWriter
from pytorch_lightning.utilities import rank_zero_info, rank_zero_warn
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from ..data.image_files import map_to_original
from ..data.io import load_rgb
from .attention import denormalize, overlay_attention

__all__ = ["PredictionWriter"]

# Batch entries that say where a row came from (ImageFilesDataModule's), kept beside the model's outputs.
_SOURCE_KEYS = ("path", "size", "crop_box")


class PredictionWriter(BasePredictionWriter):
    """Save what ``predict_step`` returns, with the file each row came from, and attention pictures.

    Under ``output_dir`` (when ``None``: ``<trainer.log_dir or default_root_dir>/predictions``):

    - ``predictions.csv``: one row per image: ``index`` (the image's index in the prediction
      dataset), ``path`` where the batches name files, ``label`` where they have labels, the
      top-k classes and probabilities where the model classifies, ``attention`` (which map the
      model has, in words: e.g. SimPool's attention, or the last block's [CLS] attention averaged
      over heads) and ``overlay`` (the picture's file) where there are maps. Classes are named by
      the model's ``classes``, which a checkpoint keeps from the DataModule it was fitted on, not
      by the prediction data; a model without them (an official file) gets class indices.
    - ``predictions.npz``: every array ``predict_step`` returns (e.g. ``attention`` ``(N, H, W)``
      over the model's input, ``topk_classes``), with the batches' ``path`` (strings), ``size``
      ``(N, 2)`` and ``crop_box`` ``(N, 4)`` where they have them (see
      :class:`~simpool_lightning.data.ImageFilesDataModule`).
    - ``overlays/<name>.png`` (``save_overlays``): per image, the picture
      :func:`~simpool_lightning.callbacks.attention.overlay_attention` draws: the image, its
      attention map as a heat overlay, and the contour of the locations that hold ``mass`` of the
      attention. For images read from files (batches with ``path``), the picture has the
      original image's size and orientation: the map is placed over the part the model saw
      (:func:`~simpool_lightning.data.image_files.map_to_original`) and is 0 outside it, and
      ``<name>`` is the batch's ``name`` (``photos/cat.jpg`` -> ``overlays/cat.png``; see
      :func:`~simpool_lightning.data.image_files.short_names`). Otherwise the picture is the
      model's input, de-normalised, named by ``index``. The PNG's ``Description`` text says which
      map it shows.
    - ``skipped.txt``: the files the DataModule skipped as unreadable (``on_bad_image="skip"``),
      one per line, when there are any; a warning names them too.

    Files are written as batches arrive (pictures) and at the end of ``predict`` (the rest).
    Under DDP each rank writes its own CSV and npz with a ``.rank<k>`` suffix, since the
    distributed sampler gives ranks disjoint images; pictures have distinct names.

    Args:
        output_dir: where to write (see above).
        save_overlays: write the pictures: ``None`` (default) when the batches name their files
            (predictions on your own images), ``True`` for any data, ``False`` never. Models
            without attention maps get none.
        mass: attention mass the contour encloses, in ``(0, 1]``.
        cmap, alpha: heat overlay colour map and opacity.
        mean, std: normalisation to undo when drawing the model's input; the DataModule's
            ``mean`` / ``std`` where it has them, else ImageNet's.
    """

    def __init__(
        self,
        output_dir: Optional[str] = None,
        save_overlays: Optional[bool] = None,
        mass: float = 0.6,
        cmap: str = "inferno",
        alpha: float = 0.5,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
    ) -> None:
        super().__init__(write_interval="batch_and_epoch")
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.output_dir = output_dir
        self.save_overlays = save_overlays
        self.mass = mass
        self.cmap = cmap
        self.alpha = alpha
        self.mean = mean
        self.std = std
        self._reset()

    def _reset(self) -> None:
        self._arrays: dict[str, list[np.ndarray]] = {}
        self._indices: list[int] = []
        self._overlays: list[str] = []
        self._out_dir = ""
        self._source: Optional[str] = None

    def on_predict_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._reset()
        self._out_dir = self.output_dir or os.path.join(trainer.log_dir or trainer.default_root_dir, "predictions")
        self._source = getattr(pl_module, "attention_source", None)
        if self._source:
            rank_zero_info(f"PredictionWriter: the attention maps are {self._source}")

    # ------------------------------------------------------------------ per batch

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Optional[Sequence[int]],
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not isinstance(prediction, dict) or not isinstance(batch, dict):
            raise TypeError(
                "PredictionWriter needs predict_step to return a dict of (B, ...) tensors and batches to be "
                f"dicts; got {type(prediction).__name__} for batch {type(batch).__name__}"
            )
        n = len(batch["image"])
        start = len(self._indices)
        indices = list(batch_indices) if batch_indices else list(range(start, start + n))
        self._indices += [int(i) for i in indices]
        for key, value in prediction.items():
            value = value.detach().cpu()
            self._arrays.setdefault(key, []).append((value.float() if value.is_floating_point() else value).numpy())
        for key in _SOURCE_KEYS:
            if key in batch:
                value = batch[key]
                self._arrays.setdefault(key, []).append(value.cpu().numpy() if isinstance(value, Tensor) else np.asarray(value))
        wanted = self.save_overlays if self.save_overlays is not None else "path" in batch
        if wanted and "attention" in prediction:
            self._overlays += [self._draw(trainer, batch, prediction["attention"], i, indices[i]) for i in range(n)]
        elif self.save_overlays and start == 0:
            rank_zero_warn(f"PredictionWriter draws no pictures: {type(pl_module).__name__} predicts no attention maps")

    def _draw(self, trainer: pl.Trainer, batch: dict[str, Any], maps: Tensor, i: int, index: int) -> str:
        """Write the picture of image ``i`` of the batch; its path relative to the output folder."""
        attn = maps[i].detach().float().cpu()
        if "path" in batch:
            image = torch.from_numpy(np.array(load_rgb(batch["path"][i], exif_transpose=True))).permute(2, 0, 1) / 255.0
            attn = map_to_original(attn, image.shape[1:], batch["crop_box"][i])
            name = os.path.join("overlays", f"{batch['name'][i]}.png")
        else:
            datamodule = getattr(trainer, "datamodule", None)
            mean, std = self.mean, self.std
            if mean is None:
                has_own = getattr(datamodule, "mean", None) is not None and getattr(datamodule, "std", None) is not None
                mean, std = (datamodule.mean, datamodule.std) if has_own else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
            image = denormalize(batch["image"][i : i + 1].detach().cpu(), mean, std)[0]
            name = os.path.join("overlays", f"{index:06d}.png")
        picture = overlay_attention(image, attn, self.mass, self.cmap, self.alpha)
        path = os.path.join(self._out_dir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        info = PngInfo()
        info.add_text("Description", f"{self._source or 'attention'}; contour: {self.mass:.0%} of the attention mass")
        if "path" in batch:
            info.add_text("Source", str(batch["path"][i]))
        Image.fromarray(picture).save(path, pnginfo=info)
        return name

    # ------------------------------------------------------------------ at the end

    def write_on_epoch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        # Everything was gathered batch by batch (write_on_batch_end): `predictions` holds the same.
        out_dir = self._out_dir
        os.makedirs(out_dir, exist_ok=True)
        skipped = list(getattr(trainer.datamodule, "skipped", None) or []) if trainer.datamodule is not None else []
        if skipped and trainer.is_global_zero:
            listed = os.path.join(out_dir, "skipped.txt")
            with open(listed, "w") as f:
                f.writelines(f"{path}\n" for path in skipped)
            rank_zero_warn(f"{len(skipped)} unreadable image(s) skipped, listed in {listed}: {skipped}")
        if not self._indices:
            return
        arrays = {key: np.concatenate(parts) for key, parts in self._arrays.items()}
        suffix = f".rank{trainer.global_rank}" if trainer.world_size > 1 else ""
        np.savez_compressed(os.path.join(out_dir, f"predictions{suffix}.npz"), index=np.asarray(self._indices), **arrays)

        classes = getattr(pl_module, "classes", None)

        def name(i: int) -> str:
            return str(classes[i]) if classes and 0 <= i < len(classes) else str(i)

        k = arrays["topk_classes"].shape[1] if "topk_classes" in arrays else 0
        header = ["index"] + [key for key in ("path", "label") if key in arrays]
        header += [f"top{j + 1}_{field}" for j in range(k) for field in ("class", "prob")]
        header += ["attention"] if "attention" in arrays else []
        header += ["overlay"] if self._overlays else []
        with open(os.path.join(out_dir, f"predictions{suffix}.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for row, index in enumerate(self._indices):
                cells: list[Any] = [index]
                if "path" in arrays:
                    cells.append(str(arrays["path"][row]))
                if "label" in arrays:
                    cells.append(name(int(arrays["label"][row])))
                for j in range(k):
                    cells += [name(int(arrays["topk_classes"][row, j])), f"{arrays['topk_probs'][row, j]:.4f}"]
                if "attention" in arrays:
                    cells.append(self._source or "")
                if self._overlays:
                    cells.append(self._overlays[row])
                writer.writerow(cells)
