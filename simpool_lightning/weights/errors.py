"""The one error every weight load raises when keys or shapes do not fit."""
from __future__ import annotations

from typing import Mapping, Optional

from torch import Tensor

__all__ = ["WeightsMismatchError", "check_fits"]

Shapes = Mapping[str, tuple[int, ...]]


class WeightsMismatchError(RuntimeError):
    """Weights (a file, a checkpoint) do not fit the model: their keys or shapes differ.

    Attributes:
        path: the file, where there is one.
        missing: keys the model needs that the file lacks.
        unexpected: keys of the file the model has no place for.
        mismatched: ``(key, file shape, model shape)`` for keys present in both.
    """

    _SHOWN = 20  # per list in the message; the attributes keep everything

    def __init__(
        self,
        what: str,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        hint: str = "",
        path: Optional[str] = None,
    ) -> None:
        self.path, self.missing, self.unexpected, self.mismatched = path, missing, unexpected, mismatched
        lines = [f"{what} does not fit the model:"]
        for title, items in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("mis-shaped (file vs model)", [f"{k}: {tuple(a)} vs {tuple(b)}" for k, a, b in mismatched]),
        ):
            if items:
                more = f" ... and {len(items) - self._SHOWN} more" if len(items) > self._SHOWN else ""
                lines.append(f"  {title} ({len(items)}): {', '.join(items[: self._SHOWN])}{more}")
        if hint:
            lines.append(hint)
        super().__init__("\n".join(lines))


def check_fits(expected: Shapes, state: Mapping[str, Tensor], what: str, hint: str = "", path: Optional[str] = None) -> None:
    """Raise :class:`WeightsMismatchError` unless ``state`` has exactly the keys and shapes of ``expected``.

    Args:
        expected: key -> shape the model needs (``{k: tuple(v.shape) for k, v in module.state_dict().items()}``).
        state: the weights offered, under the same names.
        what: how the message names the weights (``"pretrained_path 'x.pth' (a DINO checkpoint)"``).
    """
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [(k, tuple(state[k].shape), tuple(expected[k])) for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k])]
    if missing or unexpected or mismatched:
        raise WeightsMismatchError(what, missing, unexpected, mismatched, hint, path)
