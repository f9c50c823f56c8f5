"""ImageFilesDataModule: unlabelled images from disk (a folder, a glob, a list of files) for ``predict``.

Each image is decoded upright (its EXIF orientation applied), as RGB whatever its mode, and brought
to the model's input size by the evaluation pipeline of the labelled DataModules,
:func:`~simpool_lightning.data.transforms.build_eval_transform` (``resize="crop"``: the short side
resized to ``image_size / crop_pct``, then the centre cropped), or resized whole to a square
(``"squash"``, as :func:`~simpool_lightning.data.downstream.build_squash_transform`). Each sample
also says which part of the original image the model saw (``crop_box``), by torchvision's rules
for that resize and crop; ``tests/data/test_image_files.py`` finds a marked spot of the original
through it.

Bad files follow ``on_bad_image`` (see :mod:`simpool_lightning.data.io`) when the DataModule is set
up: every file is decoded once then, so ``"raise"`` stops before any prediction with an error that
names the file, and ``"skip"`` leaves it out of the predictions (no other image stands in for it)
and lists it in :attr:`ImageFilesDataModule.skipped`, in every process.
"""
from __future__ import annotations

import glob
import logging
import os
from collections.abc import Sequence
from typing import Any, Optional, Union

import torch
import torch.nn.functional as F
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from .base import BaseDataModule
from .downstream import EvalResize
from .io import BadImageError, OnBadImage, load_rgb
from .transforms import build_eval_transform, to_normalized_tensor

__all__ = [
    "DEFAULT_CROP_PCT",
    "DEFAULT_IMAGE_SIZE",
    "IMAGE_EXTENSIONS",
    "ImageFilesDataModule",
    "ImageFilesDataset",
    "find_images",
    "map_to_original",
    "short_names",
]

log = logging.getLogger(__name__)

DEFAULT_IMAGE_SIZE = 224
DEFAULT_CROP_PCT = 0.875  # timm's and build_eval_transform's

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
"""File endings (any case) taken from folders and globs; files named one by one are taken whatever their ending."""


PathLike = Union[str, os.PathLike]


def find_images(paths: Union[PathLike, Sequence[PathLike]], extensions: Sequence[str] = IMAGE_EXTENSIONS) -> list[str]:
    """The image files that ``paths`` names, in order, each once.

    Args:
        paths: one entry or several; each is a folder (its image files, sorted; not its
            subfolders), a glob (``photos/*.jpg``; ``**`` matches subfolders; image files only,
            sorted) or a file (taken as it is).
        extensions: what counts as an image file in folders and globs.

    Raises:
        FileNotFoundError: an entry names nothing, or a folder or glob holds no image file; the
            message names the entry.
    """
    entries = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
    if not entries:
        raise ValueError("paths is empty: give a folder, a glob such as 'photos/*.jpg', or image files")
    endings = tuple(e.lower() for e in extensions)
    found: list[str] = []
    for entry in entries:
        entry = os.path.expanduser(os.fspath(entry))
        if os.path.isdir(entry):
            files = sorted(os.path.join(entry, name) for name in os.listdir(entry))
            what = f"folder {entry!r}"
        elif any(c in entry for c in "*?["):
            files = sorted(glob.glob(entry, recursive=True))
            what = f"the glob {entry!r}"
        elif os.path.isfile(entry):
            found.append(entry)
            continue
        else:
            raise FileNotFoundError(f"image file or folder not found: {entry!r}")
        images = [f for f in files if f.lower().endswith(endings) and os.path.isfile(f)]
        if not images:
            raise FileNotFoundError(f"{what} holds no image file (endings {', '.join(endings)})")
        found += images
    return list(dict.fromkeys(found))


def map_to_original(attn: Tensor, size: Sequence[int], crop_box: Sequence[float]) -> Tensor:
    """A map over the model's input, placed over the original image: ``(h, w)`` -> ``(H, W)``.

    Each pixel of the original image whose centre lies in ``crop_box`` (the part the model saw)
    takes the map's bilinear value there, as ``F.interpolate(..., align_corners=False)`` samples;
    the others get 0. With ``crop_box = (0, 0, W, H)`` this is a plain bilinear resize.

    Args:
        attn: the map, ``(h, w)``.
        size: the original ``(H, W)``.
        crop_box: ``(x0, y0, x1, y1)`` in the original's pixel coordinates (see :class:`ImageFilesDataset`).
    """
    height, width = (int(v) for v in size)
    x0, y0, x1, y1 = (float(v) for v in crop_box)
    # Normalised sampling positions of the pixel centres, -1 and 1 being the crop's outer edges.
    xs = ((torch.arange(width, dtype=torch.float64) + 0.5 - x0) / (x1 - x0) * 2 - 1).float()
    ys = ((torch.arange(height, dtype=torch.float64) + 0.5 - y0) / (y1 - y0) * 2 - 1).float()
    grid = torch.stack([xs[None, :].expand(height, width), ys[:, None].expand(height, width)], dim=-1)
    # "border" clamps at the map's edge as F.interpolate does; pixels outside the crop are zeroed after.
    out = F.grid_sample(attn.float()[None, None], grid[None], mode="bilinear", padding_mode="border", align_corners=False)[0, 0]
    seen = (ys.abs() <= 1)[:, None] & (xs.abs() <= 1)[None, :]
    return torch.where(seen, out.clamp_min(0), 0.0)


def short_names(files: Sequence[str]) -> list[str]:
    """Short unique names: each file's path relative to the deepest folder that holds them all,
    without its ending unless another file has the same name before it (``cat.jpg`` and ``cat.png``)."""
    full = [os.path.abspath(f) for f in files]
    try:
        root = os.path.commonpath([os.path.dirname(f) for f in full])
        relative = [os.path.relpath(f, root) for f in full]
    except ValueError:  # files on different drives have no common folder
        relative = [f.lstrip(os.sep) for f in full]
    stems = [os.path.splitext(r)[0] for r in relative]
    count: dict[str, int] = {}
    for stem in stems:
        count[stem] = count.get(stem, 0) + 1
    return [stem if count[stem] == 1 else r for stem, r in zip(stems, relative)]


class ImageFilesDataset(Dataset):
    """Image files as the model's input, each with where it came from.

    A sample is a dict:

    - ``image``: ``(3, S, S)`` float, normalised with ``mean`` and ``std``;
    - ``path``: the file; ``name``: a short unique name for it (see :func:`short_names`);
    - ``size``: ``(2,)`` long, the upright image's ``(height, width)``;
    - ``crop_box``: ``(4,)`` float, the part of the upright image the model sees, ``(x0, y0, x1, y1)``
      in its pixel coordinates (edges, not centres: the whole image is ``(0, 0, width, height)``).

    Args:
        files: image files, all readable (bad files are sorted out by :class:`ImageFilesDataModule`;
            one that fails here raises :class:`~.io.BadImageError` naming it).
        names: one per file (see ``name``).
        image_size: side ``S`` of the model's input.
        resize: ``"crop"``: :func:`~.transforms.build_eval_transform` (short side to
            ``floor(S / crop_pct)``, then the centre ``S x S``); ``"squash"``: the whole image to
            ``S x S`` (bicubic).
        crop_pct: see ``resize``; in ``(0, 1]``.
        mean, std: normalisation.
    """

    def __init__(
        self,
        files: Sequence[str],
        names: Sequence[str],
        image_size: int = 224,
        resize: EvalResize = "crop",
        crop_pct: float = 0.875,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
    ) -> None:
        if len(files) != len(names):
            raise ValueError(f"got {len(files)} files but {len(names)} names")
        _check_settings(image_size, resize, crop_pct)
        self.files = list(files)
        self.names = list(names)
        self.image_size = image_size
        self.resize = resize
        self.crop_pct = crop_pct
        self.mean = list(mean)
        self.std = list(std)
        self.eval_transform = build_eval_transform(image_size, crop_pct, mean, std) if resize == "crop" else None
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.files)

    def geometry(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``((resized_h, resized_w), (top, left))``: the resize, then the ``S x S`` crop's corner in it.

        The evaluation pipeline's short side, and torchvision's rules for resizing to it (long side
        ``int(short * long / short_side)``) and for the centre crop (offsets ``int(round((resized - S) / 2))``).
        """
        s = self.image_size
        if self.eval_transform is None:
            return (s, s), (0, 0)
        short = self.eval_transform.resize[0]
        if width <= height:
            resized = (int(short * height / width), short)
        else:
            resized = (short, int(short * width / height))
        return resized, (int(round((resized[0] - s) / 2.0)), int(round((resized[1] - s) / 2.0)))

    def __getitem__(self, index: int) -> dict[str, Any]:
        path = self.files[index]
        image = load_rgb(path, exif_transpose=True)
        width, height = image.size
        (rh, rw), (top, left) = self.geometry(height, width)
        s = self.image_size
        if self.eval_transform is not None:
            tensor = self.eval_transform({"image": image})["image"]
        else:
            squashed = TF.resize(image, [s, s], interpolation=InterpolationMode.BICUBIC, antialias=True)
            tensor = to_normalized_tensor(squashed, self._mean, self._std)
        return {
            "image": tensor,
            "path": path,
            "name": self.names[index],
            "size": torch.tensor([height, width]),
            "crop_box": torch.tensor(
                [left * width / rw, top * height / rh, (left + s) * width / rw, (top + s) * height / rh], dtype=torch.float64
            ),
        }


def _check_settings(image_size: int, resize: str, crop_pct: float) -> None:
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if resize not in ("crop", "squash"):
        raise ValueError(f"resize must be 'crop' or 'squash', got {resize!r}")
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")


class ImageFilesDataModule(BaseDataModule):
    """Predict on images from disk: ``simpool predict ... --data ImageFilesDataModule --data.init_args.paths 'photos/*.jpg'``.

    It has a ``predict`` split only (``predict_set``, an :class:`ImageFilesDataset`, in file order);
    batches hold ``image`` ``(B, 3, S, S)``, ``path`` and ``name`` (lists of strings), ``size``
    ``(B, 2)`` and ``crop_box`` ``(B, 4)`` (see :class:`ImageFilesDataset`), and no ``label``.

    Args:
        paths: a folder, a glob (quote it on the command line) or a file, or a list of them (see
            :func:`find_images`).
        image_size: side of the model's input: the size the checkpoint was trained at (a ViT
            without ``dynamic_img_size`` accepts no other). ``None``: :data:`DEFAULT_IMAGE_SIZE`,
            unless ``simpool`` fills it in from the checkpoint (see :class:`~simpool_lightning.cli.SimPoolCLI`).
        resize: ``"crop"`` (the classification protocol: short side to ``image_size / crop_pct``,
            centre crop) or ``"squash"`` (the whole image, aspect not kept).
        crop_pct: see ``resize``; ``None``: :data:`DEFAULT_CROP_PCT`, or the checkpoint's as ``image_size``.
        mean, std: normalisation (every DataModule of this package uses ImageNet's).
        batch_size, num_workers, pin_memory: see :class:`~.base.BaseDataModule`.
        on_bad_image: ``"raise"``: :meth:`setup` stops with :class:`~.io.BadImageError` naming the
            first corrupt, truncated, empty or non-image file; ``"skip"``: such files are logged,
            left out and listed in :attr:`skipped`.
        extensions: file endings that count as images in folders and globs.
    """

    def __init__(
        self,
        paths: Union[str, list[str]],
        image_size: Optional[int] = None,
        resize: EvalResize = "crop",
        crop_pct: Optional[float] = None,
        mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
        std: Sequence[float] = IMAGENET_DEFAULT_STD,
        batch_size: int = 32,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
        extensions: Sequence[str] = IMAGE_EXTENSIONS,
    ) -> None:
        super().__init__(batch_size=batch_size, num_workers=num_workers, pin_memory=pin_memory)
        if on_bad_image not in ("raise", "skip"):
            raise ValueError(f"on_bad_image must be 'raise' or 'skip', got {on_bad_image!r}")
        _check_settings(
            DEFAULT_IMAGE_SIZE if image_size is None else image_size, resize, DEFAULT_CROP_PCT if crop_pct is None else crop_pct
        )
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {list(mean)} and {list(std)}")
        self.paths = paths
        self.image_size = image_size
        self.resize = resize
        self.crop_pct = crop_pct
        self.mean = list(mean)
        self.std = list(std)
        self.on_bad_image = on_bad_image
        self.extensions = tuple(extensions)
        self.predict_set: Optional[ImageFilesDataset] = None
        self.skipped: list[str] = []

    def setup(self, stage: Optional[str] = None) -> None:
        if self.predict_set is not None:
            return
        files = find_images(self.paths, self.extensions)
        readable = []
        for path in files:
            try:
                load_rgb(path)
            except BadImageError as err:
                if self.on_bad_image == "raise":
                    raise BadImageError(f"{err}; on_bad_image='skip' leaves such files out") from err
                self.skipped.append(path)
                log.warning("skipping bad image (%d so far): %s", len(self.skipped), err)
                continue
            readable.append(path)
        if not readable:
            raise BadImageError(f"none of the {len(files)} image files is readable (first: {files[0]!r})")
        self.predict_set = ImageFilesDataset(
            readable,
            short_names(readable),
            DEFAULT_IMAGE_SIZE if self.image_size is None else self.image_size,
            self.resize,
            DEFAULT_CROP_PCT if self.crop_pct is None else self.crop_pct,
            self.mean,
            self.std,
        )

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_set, "predict")
