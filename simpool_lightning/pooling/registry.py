"""Pool registry: a string names a pooling method everywhere (code, configs, command line)."""
from __future__ import annotations

from typing import Callable, TypeVar

from torch import nn

__all__ = ["register_pool", "create_pool", "list_pools", "is_pool"]

_POOLS: dict[str, Callable[..., nn.Module]] = {}

T = TypeVar("T", bound=Callable[..., nn.Module])


def register_pool(name: str) -> Callable[[T], T]:
    """Class decorator that registers a pool constructor under ``name``.

    The constructor is called as ``cls(dim, **kwargs)``.
    """

    def decorator(cls: T) -> T:
        if name in _POOLS:
            raise ValueError(f"pool {name!r} is already registered (by {_POOLS[name]!r})")
        _POOLS[name] = cls
        return cls

    return decorator


def list_pools() -> list[str]:
    """Sorted names of every registered pool."""
    return sorted(_POOLS)


def is_pool(name: str) -> bool:
    return name in _POOLS


def create_pool(name: str, dim: int, **kwargs) -> nn.Module:
    """Build the pool registered as ``name`` for ``dim``-channel features.

    Raises:
        ValueError: ``name`` is not registered; the message lists the known names.
    """
    try:
        cls = _POOLS[name]
    except KeyError:
        raise ValueError(f"unknown pool {name!r}; known pools: {', '.join(list_pools())}") from None
    return cls(dim, **kwargs)
