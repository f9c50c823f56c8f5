"""Drawing attention maps over images, and AttentionMapLogger, which does it every N epochs.

:func:`overlay_attention` is the one drawing of a map over an image, pixel for pixel at the
image's size: the map as a heat overlay and the contour of the locations that hold ``mass`` of
the attention (thresholded as DINO does,
:func:`~simpool_lightning.metrics.localization.threshold_by_mass`). The contour is the region's
own boundary pixels, so the pixels it encloses are exactly that region. :func:`plot_attention`
arranges such panels in a grid (one column per image; rows: the image, the heat overlay, the
contour, with the ground-truth mask dashed where there is one), which
:class:`AttentionMapLogger` logs and the notebooks show; ``PredictionWriter`` writes one
:func:`overlay_attention` picture per predicted image.

Figures are drawn on matplotlib's Agg canvas directly (``FigureCanvasAgg``), never through
``pyplot``: no global figure state, no GUI, and the backend a user chose (say, in a notebook)
is left alone.
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Union

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
import matplotlib
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_warn
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor

from ..metrics.localization import threshold_by_mass

__all__ = [
    "AttentionMapLogger",
    "CONTOUR_COLOR",
    "contour_pixels",
    "denormalize",
    "figure_to_array",
    "overlay_attention",
    "plot_attention",
]

Size = Union[int, tuple[int, int]]

CONTOUR_COLOR: tuple[int, int, int] = (0, 255, 255)
"""Cyan: no blend of an image and the ``inferno`` heat map reaches it, so the contour stays visible."""


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo ``Normalize(mean, std)``: ``(B, 3, H, W)`` -> RGB in ``[0, 1]`` (clamped), float32."""
    mean_t = torch.as_tensor(mean, dtype=torch.float32, device=images.device)[:, None, None]
    std_t = torch.as_tensor(std, dtype=torch.float32, device=images.device)[:, None, None]
    return (images.float() * std_t + mean_t).clamp(0.0, 1.0)


def contour_pixels(mask: Tensor, width: int = 1) -> Tensor:
    """The boundary of a region, drawn inside it: ``(H, W)`` bool -> ``(H, W)`` bool.

    The pixels of ``mask`` within ``width`` pixels (8-neighbourhood steps) of a pixel outside it
    or of the image's edge. The band lies inside the region and closes along the image's edge
    where the region touches it, so the region is exactly the band and what the band encloses.
    """
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be a bool (H, W) tensor, got {mask.dtype} of shape {tuple(mask.shape)}")
    if width < 1:
        raise ValueError(f"width must be >= 1, got {width}")
    outside = F.pad((~mask).float()[None, None], (width,) * 4, value=1.0)  # the edge counts as outside
    near_outside = F.max_pool2d(outside, 2 * width + 1, stride=1)[0, 0] > 0
    return mask & near_outside


def overlay_attention(
    image: Tensor,
    attn: Tensor,
    mass: Optional[float] = 0.6,
    cmap: str = "inferno",
    alpha: float = 0.5,
    contour_color: tuple[int, int, int] = CONTOUR_COLOR,
    contour_width: Optional[int] = None,
) -> np.ndarray:
    """An image with its attention map as a heat overlay and the contour of the map's top ``mass``.

    Args:
        image: RGB in ``[0, 1]``, ``(3, H, W)``.
        attn: non-negative attention at the image's size, ``(H, W)``; shown scaled to its own
            maximum (maps sum to 1, so their values shrink with the image's size).
        mass: the contour encloses exactly the locations that
            :func:`~simpool_lightning.metrics.localization.threshold_by_mass` keeps for this
            ``mass``; ``None`` draws no contour.
        cmap, alpha: matplotlib colour map of the heat overlay and its opacity (``0``: the image
            alone, with the contour).
        contour_color: RGB of the contour.
        contour_width: its width in pixels, inside the region (:func:`contour_pixels`); by default
            1 pixel per 256 pixels of the image's shorter side, at least 1.

    Returns:
        RGB ``uint8`` ``(H, W, 3)``, the image's size.
    """
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"image must be RGB (3, H, W), got shape {tuple(image.shape)}")
    if tuple(attn.shape) != tuple(image.shape[1:]):
        raise ValueError(f"attn must have the image's size {tuple(image.shape[1:])}, got shape {tuple(attn.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    m = attn.detach().cpu()  # thresholded in the caller's precision
    if alpha > 0:
        shown = (m / m.max().clamp_min(1e-12)).float().numpy()
        heat = matplotlib.colormaps[cmap](shown)[..., :3]
        rgb = (1.0 - alpha) * rgb + alpha * heat
    out = np.round(rgb * 255.0).astype(np.uint8)
    if mass is not None:
        width = contour_width if contour_width is not None else max(1, round(min(m.shape) / 256))
        region = threshold_by_mass(m[None], mass)[0]
        out[contour_pixels(region, width).numpy()] = contour_color
    return out


def plot_attention(
    images: Tensor,
    maps: Union[Tensor, Mapping[str, Tensor]],
    mass: float = 0.6,
    gt_masks: Optional[Tensor] = None,
    titles: Optional[Sequence[str]] = None,
    cmap: str = "inferno",
    alpha: float = 0.6,
    panel_inches: float = 1.6,
) -> Figure:
    """A grid of images, their attention heat maps and the contours of the thresholded maps.

    Each heat-map panel and contour panel (yellow) is an :func:`overlay_attention` picture at the
    images' own resolution; the ground truth is traced over it by matplotlib.

    Args:
        images: RGB in ``[0, 1]``, ``(N, 3, H, W)``.
        maps: attention ``(N, H, W)``, or several sets of them by name (``{"[CLS]": ..., "SimPool": ...}``)
            to compare models on the same images; non-negative, at the images' size.
        mass: attention mass the contour encloses (the highest-attention locations that together
            hold it).
        gt_masks: ground-truth foreground, bool ``(N, H, W)``, drawn dashed in the contour rows.
        titles: one per column, e.g. class names.
        cmap, alpha: colour map of the heat maps and their opacity over the image.
        panel_inches: side of each panel.

    Returns:
        A matplotlib :class:`~matplotlib.figure.Figure` on an Agg canvas, with one column per
        image and the rows: image; then per set of maps, heat map and contour.
    """
    named = dict(maps) if isinstance(maps, Mapping) else {"attention": maps}
    n, _, h, w = images.shape
    for name, m in named.items():
        if tuple(m.shape) != (n, h, w):
            raise ValueError(f"maps {name!r} must have shape {(n, h, w)} to match the images, got {tuple(m.shape)}")
    rgb = images.detach().float().cpu().permute(0, 2, 3, 1).numpy()
    rows = 1 + 2 * len(named)
    # Fixed margins for the row labels and column titles: a layout engine triples the drawing time.
    left, top, gap = 0.4, 0.25 if titles is not None else 0.05, 0.05  # inches: two lines of row label
    width, height = left + n * (panel_inches + gap), top + rows * (panel_inches + gap)
    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(
        left=left / width, right=1 - gap / width, bottom=gap / height, top=1 - top / height,
        wspace=gap / panel_inches, hspace=gap / panel_inches,
    )
    axes = fig.subplots(rows, n, squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for i in range(n):
        axes[0, i].imshow(rgb[i])
        if titles is not None:
            axes[0, i].set_title(titles[i], fontsize=9)
    axes[0, 0].set_ylabel("image", fontsize=9)

    for row, (name, m) in zip(range(1, rows, 2), named.items()):
        for i in range(n):
            axes[row, i].imshow(overlay_attention(images[i], m[i], mass=None, cmap=cmap, alpha=alpha))
            ax = axes[row + 1, i]
            ax.imshow(overlay_attention(images[i], m[i], mass=mass, alpha=0.0, contour_color=(255, 255, 0)))
            if gt_masks is not None:
                _contour(ax, gt_masks[i].bool().cpu(), colors="cyan", linestyles="dashed")
        axes[row, 0].set_ylabel(name, fontsize=9)
        axes[row + 1, 0].set_ylabel(f"{name}\n{mass:.0%} mass", fontsize=9)  # two lines: fits a short panel
    return fig


def _contour(ax: Any, mask: Tensor, colors: str, linestyles: str) -> None:
    # An empty or full mask has no boundary, and matplotlib warns when asked to trace one.
    if 0 < int(mask.sum()) < mask.numel():
        ax.contour(mask.float().numpy(), levels=[0.5], colors=colors, linestyles=linestyles, linewidths=1.5)


def figure_to_array(fig: Figure) -> np.ndarray:
    """Render a figure on an Agg canvas to an RGB ``uint8`` array ``(H, W, 3)``."""
    canvas = fig.canvas if isinstance(fig.canvas, FigureCanvasAgg) else FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


class AttentionMapLogger(pl.Callback):
    """Log the model's attention maps on the same validation images every ``every_n_epochs``.

    The images are the first ``num_images`` of the first validation dataloader, captured during
    the first full validation epoch and kept on the CPU: every figure shows the same images, so
    figures compare across epochs. At the end of each validation epoch whose number ``e`` (from 0)
    has ``(e + 1) % every_n_epochs == 0`` (never during the sanity check), it calls
    ``pl_module.attention_maps(images, size=(H, W))`` in eval mode under ``torch.no_grad()``,
    draws :func:`plot_attention` and logs it:

    - to TensorBoard as an image, tag ``tag``, when a :class:`TensorBoardLogger` is used;
    - to Weights & Biases through :meth:`WandbLogger.log_image` (which imports ``wandb`` itself;
      this module never does) when a :class:`WandbLogger` is used;
    - as ``<log_dir>/attention_maps/epoch=XXX.png`` when ``save_png`` (default): whatever the
      loggers, so the figures can be opened without a logger's viewer. ``log_dir`` is
      ``trainer.log_dir`` (the TensorBoard/CSV version folder, else the first logger's
      ``save_dir``, else ``default_root_dir``). With several validations per epoch
      (``val_check_interval < 1``) the file of an epoch holds its last one.

    Any model with ``attention_maps(images, size=None)`` -> ``(B, H, W)`` works. A model whose
    pool has no attention (``attention_maps`` raises ``ValueError``) or that has no such method
    gets one warning, and the callback does nothing for the rest of the run.

    Images are de-normalised for display with ``mean`` and ``std``; when ``None``, the
    datamodule's ``mean`` / ``std`` attributes where it has them, else the ImageNet ones that
    every DataModule of this package normalises with.

    Distributed: every rank captures its first images and computes their maps (so that a sharded
    strategy, whose forward needs every rank, cannot stall), and only global rank 0 draws and
    writes. No collective is issued from one rank alone; ``trainer.log_dir``, which broadcasts,
    is read in ``setup`` on every rank.

    Args:
        every_n_epochs: log every this many epochs.
        num_images: how many validation images to show (fewer when the first validation epoch
            has fewer).
        mass: attention mass the contour encloses, in ``(0, 1]``.
        image_size: draw images and maps at this size (an int for a square, or ``(H, W)``); the
            images' own size when ``None``. The model always sees the images as loaded.
        mean, std: normalisation to undo for display (see above).
        save_png: also write PNG files (see above).
        tag: TensorBoard tag / W&B key.
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_images: int = 8,
        mass: float = 0.6,
        image_size: Optional[Size] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
        save_png: bool = True,
        tag: str = "val/attention_maps",
    ) -> None:
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be >= 1, got {every_n_epochs}")
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if not 0.0 < mass <= 1.0:
            raise ValueError(f"mass must be in (0, 1], got {mass}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images
        self.mass = mass
        self.image_size: Optional[tuple[int, int]] = None
        if image_size is not None:
            size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
            if len(size) != 2 or min(size) < 1:
                raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
            self.image_size = (int(size[0]), int(size[1]))
        self.mean = mean
        self.std = std
        self.save_png = save_png
        self.tag = tag

        self._images: list[Tensor] = []
        self._masks: list[Tensor] = []
        self._labels: list[Tensor] = []
        self._captured = False  # the fixed set is complete: never touched again
        self._disabled = False
        self._log_dir: Optional[str] = None

    # ------------------------------------------------------------------ capture

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "attention_maps", None)):
            self._disable(f"{type(pl_module).__name__} has no attention_maps(images, size) method")
        # trainer.log_dir broadcasts from rank 0: every rank must read it, so read it here, not on rank 0 alone.
        self._log_dir = trainer.log_dir or trainer.default_root_dir

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._captured:
            # A sanity check may have captured part of the set; the next epoch starts again from
            # the first batch, so start the set again with it.
            self._images, self._masks, self._labels = [], [], []

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._captured or self._disabled or dataloader_idx != 0:
            return
        images, masks, labels = _unpack(batch)
        if images is None:
            self._disable(
                "validation batches hold no images: expected a dict with 'image' (B, 3, H, W) or a "
                f"tuple/list whose first item is that tensor, got {type(batch).__name__}"
            )
            return
        take = self.num_images - sum(len(x) for x in self._images)
        self._images.append(images[:take].detach().float().cpu())
        if masks is not None:
            self._masks.append(masks[:take].detach().bool().cpu())
        if labels is not None:
            self._labels.append(labels[:take].detach().long().cpu())
        if take <= len(images):
            self._captured = True

    # ------------------------------------------------------------------ logging

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or self._disabled or not self._images:
            return
        self._captured = True  # a validation epoch shorter than num_images: keep what it had
        if (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        images = torch.cat(self._images)
        maps = self._attention_maps(trainer, pl_module, images)
        if maps is None or not trainer.is_global_zero:
            return
        fig = self._figure(trainer, images, maps)
        self._write(trainer, fig)

    def _attention_maps(self, trainer: pl.Trainer, pl_module: pl.LightningModule, images: Tensor) -> Optional[Tensor]:
        """Maps ``(N, H, W)`` on the CPU at the display size, or ``None`` when the model has none."""
        size = self.image_size or tuple(images.shape[-2:])
        inputs = trainer.precision_plugin.convert_input(images.to(pl_module.device))
        was_training = pl_module.training
        pl_module.eval()
        try:
            with trainer.precision_plugin.forward_context(), torch.no_grad():
                maps = pl_module.attention_maps(inputs, size=size)
        except ValueError as err:
            # The contract of attention_maps for a pool without spatial attention (e.g. "avg").
            self._disable(str(err))
            return None
        finally:
            pl_module.train(was_training)
        return maps.float().cpu()

    def _figure(self, trainer: pl.Trainer, images: Tensor, maps: Tensor) -> Figure:
        datamodule = getattr(trainer, "datamodule", None)
        mean, std = self.mean, self.std
        if mean is None:
            has_own = getattr(datamodule, "mean", None) is not None and getattr(datamodule, "std", None) is not None
            mean, std = (datamodule.mean, datamodule.std) if has_own else (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)
        rgb = denormalize(images, mean, std)
        masks = torch.cat(self._masks) if self._masks else None
        if self.image_size is not None:
            rgb = F.interpolate(rgb, size=self.image_size, mode="bilinear", antialias=True, align_corners=False).clamp(0, 1)
            if masks is not None:
                masks = F.interpolate(masks[:, None].float(), size=self.image_size, mode="nearest")[:, 0].bool()
        titles = None
        classes = getattr(datamodule, "classes", None)
        if self._labels and classes:
            titles = [str(classes[i]) for i in torch.cat(self._labels).tolist()]
        return plot_attention(rgb, maps, self.mass, masks, titles)

    def _write(self, trainer: pl.Trainer, fig: Figure) -> None:
        array = figure_to_array(fig)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(self.tag, array, trainer.global_step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=self.tag, images=[array], step=trainer.global_step)
        if self.save_png:
            out_dir = os.path.join(self._log_dir or trainer.default_root_dir, "attention_maps")
            os.makedirs(out_dir, exist_ok=True)
            Image.fromarray(array).save(os.path.join(out_dir, f"epoch={trainer.current_epoch:03d}.png"))

    def _disable(self, reason: str) -> None:
        if not self._disabled:
            rank_zero_warn(f"AttentionMapLogger logs nothing in this run: {reason}")
        self._disabled = True


def _unpack(batch: Any) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """``(images (B, 3, H, W), masks (B, H, W) or None, labels (B,) or None)`` of a batch."""
    if isinstance(batch, Mapping):
        images, masks, labels = batch.get("image"), batch.get("mask"), batch.get("label")
    elif isinstance(batch, (tuple, list)) and batch:
        images, masks, labels = batch[0], None, batch[1] if len(batch) > 1 else None
    else:
        return None, None, None
    if not isinstance(images, Tensor) or images.dim() != 4:
        return None, None, None
    masks = masks if isinstance(masks, Tensor) and masks.dim() == 3 else None
    labels = labels if isinstance(labels, Tensor) and labels.dim() == 1 else None
    return images, masks, labels
