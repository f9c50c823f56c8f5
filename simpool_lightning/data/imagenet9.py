"""ImageNet-9 background challenge (Xiao, Engstrom, Ilyas, Madry, "Noise or Signal: The Role of Image
Backgrounds in Object Recognition", ICLR 2021), and the map from ImageNet-1k predictions to its 9 classes.

Layout: ``root/bg_challenge/<variant>/val/<NN_class>/*`` with class folders ``00_dog`` ..
``08_fish``; the images are already 224 x 224.

The 1k -> 9 map is the authors' ``in_to_in9.json`` (MadryLab/backgrounds_challenge, checked here
against the file itself, commit 46d224b): 370 ImageNet classes in 9 groups, the other 630 map to
-1. The groups are not plain WordNet ranges: e.g. dog leaves out 171-172, bird leaves out 80-86,
fish includes 0-6, carnivore includes 356-362 and 387-388.

The official score (``in9_eval.py``) takes the argmax over all 1,000 logits and maps it; a
prediction outside the 370 classes counts as wrong. :func:`predict_in9` does exactly that.
:func:`map_in1k_to_in9` gives ``(B, 9)`` scores restricted to the 9 groups (a different, more
lenient number: it never predicts "none of the nine").
"""
from __future__ import annotations

import itertools
import os
import re
from typing import Literal, Sequence, Union

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from .downstream import DownstreamDataModule, require_file
from .imagenet_boxes import IMAGE_EXTENSIONS
from .io import FileDataset, FileSample, OnBadImage
from .transforms import build_eval_transform

__all__ = [
    "IN9_CLASSES",
    "IN9_VARIANTS",
    "IN1K_TO_IN9_GROUPS",
    "in1k_to_in9_index",
    "map_in1k_to_in9",
    "predict_in9",
    "ImageNet9DataModule",
]

IN9_CLASSES: tuple[str, ...] = (
    "dog", "bird", "wheeled vehicle", "reptile", "carnivore", "insect", "musical instrument", "primate", "fish",
)  # fmt: skip

IN9_VARIANTS: tuple[str, ...] = (
    "original", "only_fg", "only_bg_b", "only_bg_t", "no_fg", "mixed_same", "mixed_rand", "mixed_next",
)  # fmt: skip


def _indices(*parts: Union[range, int]) -> tuple[int, ...]:
    return tuple(itertools.chain.from_iterable(p if isinstance(p, range) else (p,) for p in parts))


# ImageNet-1k class indices of each ImageNet-9 class, in IN9_CLASSES order (in_to_in9.json).
IN1K_TO_IN9_GROUPS: tuple[tuple[int, ...], ...] = (
    _indices(range(151, 171), range(173, 269)),  # dog: 116
    _indices(range(7, 25), range(87, 101), range(127, 147)),  # bird: 52
    _indices(  # wheeled vehicle: 42
        407, 408, 428, 436, 444, 468, 511, 547, 555, 561, 565, 569, 573, 586, 603, 609, 612, 627, 656, 661, 665,
        670, 671, 675, 690, 705, 717, 734, 751, 757, 791, 802, 803, 817, 820, 829, 847, 864, 866, 867, 870, 880,
    ),
    _indices(range(33, 69)),  # reptile: 36
    _indices(range(269, 281), range(286, 300), range(356, 363), range(387, 389)),  # carnivore: 35
    _indices(range(300, 327)),  # insect: 27
    _indices(  # musical instrument: 26
        401, 402, 420, 432, 486, 494, 513, 541, 546, 558, 566, 577, 579, 593, 594, 641, 642, 683, 684, 687, 699,
        776, 822, 875, 881, 889,
    ),
    _indices(range(365, 385)),  # primate: 20
    _indices(range(0, 7), range(389, 398)),  # fish: 16
)  # fmt: skip


def in1k_to_in9_index() -> Tensor:
    """``(1000,)`` long: the ImageNet-9 class of each ImageNet-1k class, -1 for the 630 outside."""
    index = torch.full((1000,), -1, dtype=torch.long)
    for in9, group in enumerate(IN1K_TO_IN9_GROUPS):
        index[list(group)] = in9
    return index


def _check_logits(logits: Tensor) -> None:
    if logits.dim() != 2 or logits.shape[1] != 1000:
        raise ValueError(f"logits must be (B, 1000) ImageNet-1k scores, got {tuple(logits.shape)}")


def map_in1k_to_in9(logits: Tensor, reduction: Literal["sum", "max"] = "sum") -> Tensor:
    """ImageNet-9 scores from ImageNet-1k logits, restricted to the 9 groups.

    Args:
        logits: ``(B, 1000)``.
        reduction: ``"sum"`` (default): softmax over the 1,000 classes, then the probability mass of
            each group (a group's score does not grow with how finely ImageNet splits it, the way a
            sum of logits would); ``"max"``: the largest logit in each group.

    Returns:
        ``(B, 9)``: probabilities (each row sums to the mass on the 370 mapped classes, at most 1)
        for ``"sum"``, logits for ``"max"``. Argmax of either never says "none of the nine"; for the
        official accuracy use :func:`predict_in9`.
    """
    _check_logits(logits)
    index = in1k_to_in9_index().to(logits.device)
    mapped = index >= 0
    if reduction == "sum":
        probs = logits.float().softmax(dim=1)[:, mapped]
        return probs.new_zeros(logits.shape[0], len(IN9_CLASSES)).index_add_(1, index[mapped], probs)
    if reduction == "max":
        return torch.stack([logits[:, list(group)].amax(dim=1) for group in IN1K_TO_IN9_GROUPS], dim=1)
    raise ValueError(f"reduction must be 'sum' or 'max', got {reduction!r}")


def predict_in9(logits: Tensor) -> Tensor:
    """The official ImageNet-9 prediction: argmax over the 1,000 logits, mapped; -1 outside the 9 groups.

    Args:
        logits: ``(B, 1000)``.

    Returns:
        ``(B,)`` long in ``[-1, 9)``; accuracy is ``(predict_in9(logits) == label).float().mean()``.
    """
    _check_logits(logits)
    return in1k_to_in9_index().to(logits.device)[logits.argmax(dim=1)]


class ImageNet9DataModule(DownstreamDataModule):
    """ImageNet-9 background-challenge variants, for evaluation only (no training loader).

    Batch: ``image`` ``(B, 3, S, S)``, ``label`` ``(B,)`` in ``[0, 9)`` (the folder's ``NN``; the
    values of ``in_to_in9.json``). An ImageNet-1k model's logits go through :func:`predict_in9`.

    Args:
        root: the folder that holds ``bg_challenge/``.
        variants: one variant, a list of them, or ``"all"`` (:data:`IN9_VARIANTS`). With one,
            ``val_dataloader`` / ``test_dataloader`` return a loader; with several, a list in the
            order given (Lightning's ``dataloader_idx`` indexes :attr:`variants`).
        crop_pct: the images are 224 x 224 already and the official evaluation feeds them as they
            are, hence 1.0 (resize to ``image_size``, crop nothing).
        Other arguments: see :class:`~.downstream.DownstreamDataModule`.
    """

    def __init__(
        self,
        root: str,
        variants: Union[str, Sequence[str]] = "original",
        image_size: int = 224,
        batch_size: int = 64,
        num_workers: int = 0,
        pin_memory: bool = False,
        on_bad_image: OnBadImage = "raise",
        crop_pct: float = 1.0,
    ) -> None:
        super().__init__(root, image_size, batch_size, num_workers, pin_memory, on_bad_image)
        if variants == "all":
            variants = IN9_VARIANTS
        elif isinstance(variants, str):
            variants = (variants,)
        unknown = [v for v in variants if v not in IN9_VARIANTS]
        if unknown or not variants:
            raise ValueError(f"variants must be 'all' or taken from {IN9_VARIANTS}, got {variants!r}")
        self.variants: tuple[str, ...] = tuple(variants)
        self.eval_transform = build_eval_transform(image_size, crop_pct)
        self.variant_sets: dict[str, FileDataset] = {}

    def _read_classes(self) -> list[str]:
        return list(IN9_CLASSES)

    def _variant(self, variant: str) -> FileDataset:
        folder = require_file(self.root / "bg_challenge" / variant / "val", f"ImageNet-9 {variant} folder")
        samples = []
        seen: dict[int, str] = {}
        for name in sorted(entry.name for entry in os.scandir(folder) if entry.is_dir()):
            match = re.fullmatch(r"(\d\d)_.+", name)
            label = int(match.group(1)) if match else -1
            if not 0 <= label < len(IN9_CLASSES) or label in seen:
                raise ValueError(
                    f"class folder {str(folder / name)!r}: expected '<NN>_<class>' with NN one of 00..08, once each"
                    + (f" (NN also used by {seen[label]!r})" if label in seen else "")
                )
            seen[label] = name
            samples += [
                FileSample(str(folder / name / f), label)
                for f in sorted(os.listdir(folder / name))
                if f.lower().endswith(IMAGE_EXTENSIONS)
            ]
        if not samples:
            raise FileNotFoundError(f"no images in the class folders of {str(folder)!r}")
        return self._files(samples, self.eval_transform)

    def _build(self) -> tuple[None, Dataset, Dataset]:
        self.variant_sets = {v: self._variant(v) for v in self.variants}
        first = self.variant_sets[self.variants[0]]
        return None, first, first

    @property
    def skipped(self) -> list[str]:
        return [path for s in self.variant_sets.values() for path in s.skipped]

    def _loaders(self, split: str) -> Union[DataLoader, list[DataLoader]]:
        if not self.variant_sets:
            raise RuntimeError(f"{type(self).__name__} has no {split} split (was setup() called?)")
        loaders = [self._loader(self.variant_sets[v], split) for v in self.variants]
        return loaders[0] if len(loaders) == 1 else loaders

    def val_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        return self._loaders("val")

    def test_dataloader(self) -> Union[DataLoader, list[DataLoader]]:
        return self._loaders("test")
