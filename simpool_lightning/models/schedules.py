"""Per-iteration schedules, precomputed as DINO does: linear warm-up, then a cosine."""
from __future__ import annotations

import math

__all__ = ["cosine_schedule"]


def cosine_schedule(
    step: int,
    total_steps: int,
    base_value: float,
    final_value: float,
    warmup_steps: int = 0,
    warmup_start_value: float = 0.0,
) -> float:
    """Value at ``step`` of a linear warm-up to ``base_value`` then a cosine to ``final_value``.

    Args:
        step: 0-based iteration; steps past ``total_steps`` hold ``final_value``.
        total_steps: length of the whole schedule, warm-up included.
        base_value: value at the end of the warm-up (the peak).
        final_value: value at ``total_steps``.
        warmup_steps: iterations of linear warm-up from ``warmup_start_value``.
    """
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    if not 0 <= warmup_steps <= total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], got {warmup_steps}")
    if step < warmup_steps:
        return warmup_start_value + (base_value - warmup_start_value) * step / warmup_steps
    decay_steps = total_steps - warmup_steps
    progress = min(step - warmup_steps, decay_steps) / max(decay_steps, 1)
    return final_value + 0.5 * (base_value - final_value) * (1 + math.cos(math.pi * progress))
