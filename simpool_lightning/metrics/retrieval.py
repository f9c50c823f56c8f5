"""Instance retrieval on revisited Oxford and Paris (Radenović et al., CVPR 2018): mAP, Medium and Hard.

Follows the revisitop reference (``compute_ap``, ``compute_map`` and the protocol set-up of its
``example_evaluate``): per query, the junk images are taken out of the ranking, and the average
precision integrates the precision-recall curve by trapezoids.

Protocols, from each query's ground truth ``easy``, ``hard`` and ``junk``:

========  ===============  ===================
protocol  positives        junk
========  ===============  ===================
easy      easy             junk + hard
medium    easy + hard      junk
hard      hard             junk + easy
========  ===============  ===================
"""
from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["PROTOCOLS", "average_precision", "compute_map", "revisited_map"]

# protocol -> (ground-truth lists that are positives, lists that are junk)
PROTOCOLS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}

GroundTruth = Sequence[Mapping[str, Sequence[int]]]


def average_precision(positive_ranks: Tensor, num_positives: int) -> float:
    """Average precision from the 0-based ranks of the retrieved positives (revisitop's ``compute_ap``).

    The ``j``-th retrieved positive (0-based) at rank ``r`` adds a trapezoid of width
    ``1 / num_positives`` between the precision just before it, ``j / r`` (1 when ``r == 0``), and
    the precision at it, ``(j + 1) / (r + 1)``. Positives absent from ``positive_ranks`` (not
    retrieved) add nothing.

    Args:
        positive_ranks: ``(P,)`` increasing ranks of the positives, junk already removed.
        num_positives: all positives of the query, retrieved or not (> 0).

    Returns:
        AP in ``[0, 1]``.
    """
    ranks = positive_ranks.double()
    j = torch.arange(ranks.numel(), dtype=torch.float64)
    precision_before = torch.where(ranks > 0, j / ranks.clamp_min(1), torch.ones_like(ranks))
    precision_at = (j + 1) / (ranks + 1)
    return float(((precision_before + precision_at) / 2).sum() / num_positives)


def _as_ranks(ranks_or_scores: Tensor | np.ndarray) -> Tensor:
    x = torch.as_tensor(ranks_or_scores)
    if x.dim() != 2:
        raise ValueError(f"ranks or scores must have shape (num_db, num_queries), got {tuple(x.shape)}")
    if x.is_floating_point():
        # Stable, so that equal scores keep database order.
        return x.argsort(dim=0, descending=True, stable=True)
    return x.long()


def compute_map(
    ranks: Tensor | np.ndarray,
    gnd: GroundTruth,
    protocol: str = "medium",
) -> tuple[float, list[float]]:
    """Mean average precision over queries under a revisited protocol.

    Args:
        ranks: either integer ranks ``(num_db, num_queries)``, column ``q`` listing database
            indices from most to least similar to query ``q`` (revisitop's ``ranks``; a column may
            be truncated), or floating scores ``(num_db, num_queries)``, higher meaning more
            similar, which are ranked here (equal scores keep database order).
        gnd: one dict per query with ``"easy"``, ``"hard"`` and ``"junk"`` database indices
            (the ``gnd`` of ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl``).
        protocol: ``"medium"``, ``"hard"`` or ``"easy"`` (see the module's table).

    Returns:
        ``(mAP, aps)``: mAP in ``[0, 1]`` over the queries that have positives, and per-query APs
        ``(num_queries,)`` with NaN for a query without positives, which the reference skips
        (it neither counts in the mean nor in its denominator). mAP is NaN if no query has
        positives.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    ranks = _as_ranks(ranks).cpu()
    if len(gnd) != ranks.shape[1]:
        raise ValueError(
            f"gnd must hold one dict per query: ranks (num_db, num_queries) has {ranks.shape[1]} queries, "
            f"gnd has {len(gnd)}"
        )
    positive_keys, junk_keys = PROTOCOLS[protocol]
    aps = []
    for q, g in enumerate(gnd):
        missing = [key for key in ("easy", "hard", "junk") if key not in g]
        if missing:
            raise ValueError(f"gnd[{q}] lacks the keys {missing}; expected 'easy', 'hard' and 'junk'")
        positives = torch.as_tensor(np.concatenate([np.asarray(g[key], dtype=np.int64) for key in positive_keys]))
        if positives.numel() == 0:
            aps.append(math.nan)
            continue
        junk = torch.as_tensor(np.concatenate([np.asarray(g[key], dtype=np.int64) for key in junk_keys]))
        ranking = ranks[:, q]
        is_junk = torch.isin(ranking, junk)
        (positive_ranks,) = torch.isin(ranking, positives).nonzero(as_tuple=True)
        # Taking junk out of the ranking moves each positive up by the junk ranked before it.
        junk_before = is_junk.long().cumsum(0) - is_junk.long()
        aps.append(average_precision(positive_ranks - junk_before[positive_ranks], positives.numel()))
    valid = [ap for ap in aps if not math.isnan(ap)]
    mean_ap = sum(valid) / len(valid) if valid else math.nan
    return mean_ap, aps


@torch.no_grad()
def revisited_map(
    query_feats: Tensor,
    db_feats: Tensor,
    gnd: GroundTruth,
    protocols: Sequence[str] = ("medium", "hard"),
) -> dict[str, float]:
    """mAP in percent of cosine-similarity retrieval, as reported for revisited Oxford and Paris.

    Args:
        query_feats: ``(num_queries, D)``.
        db_feats: ``(num_db, D)``, on the device of ``query_feats``.
        gnd: one dict per query with ``"easy"``, ``"hard"`` and ``"junk"`` database indices.
        protocols: which protocols to evaluate.

    Returns:
        ``{protocol: mAP in %}``, e.g. ``{"medium": 37.2, "hard": 12.5}``.
    """
    if query_feats.dim() != 2 or db_feats.dim() != 2 or query_feats.shape[1] != db_feats.shape[1]:
        raise ValueError(
            f"query_feats (num_queries, D) and db_feats (num_db, D) must be 2-d with the same D, "
            f"got {tuple(query_feats.shape)} and {tuple(db_feats.shape)}"
        )
    scores = F.normalize(db_feats.float(), dim=1) @ F.normalize(query_feats.float(), dim=1).T
    ranks = _as_ranks(scores)
    return {protocol: 100.0 * compute_map(ranks, gnd, protocol)[0] for protocol in protocols}
