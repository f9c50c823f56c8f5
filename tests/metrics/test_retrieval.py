"""Revisited Oxford/Paris mAP on hand-worked rankings."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from simpool_lightning.metrics import average_precision, compute_map, revisited_map

# One query over a database of 6 images, ranked 4, 1, 3, 0, 5, 2 (column = query).
RANKING = [4, 1, 3, 0, 5, 2]
GND = {"easy": [1], "hard": [0], "junk": [4]}


def test_average_precision_by_hand():
    # Two positives at ranks 0 and 2. Trapezoids of width 1/2:
    #   1st: precision before 1 (rank 0), at it 1/1      -> (1 + 1) / 2 * 1/2     = 1/2
    #   2nd: precision before 1/2, at it 2/3             -> (1/2 + 2/3) / 2 * 1/2 = 7/24
    assert average_precision(torch.tensor([0, 2]), 2) == pytest.approx(19 / 24)
    # A positive never retrieved adds nothing: only the first trapezoid.
    assert average_precision(torch.tensor([0]), 2) == pytest.approx(1 / 2)


def test_junk_is_removed_before_ap():
    ranks = torch.tensor(RANKING)[:, None]
    # Medium: positives {1, 0}, junk {4}. Raw positions 1 and 3; junk image 4 at position 0 is
    # taken out, so the positives rank 0 and 2: AP 19/24 as above.
    # (Counting the junk as a negative would give ranks 1 and 3 and AP 1/3.)
    medium, aps = compute_map(ranks, [GND], "medium")
    assert medium == pytest.approx(19 / 24) and aps == [pytest.approx(19 / 24)]
    # Hard: positives {0}, junk {4} + easy {1}. Image 0 at position 3 has two junk before it: rank 1.
    # One trapezoid of width 1: precision before 0/1, at it 1/2 -> AP 1/4.
    assert compute_map(ranks, [GND], "hard")[0] == pytest.approx(1 / 4)
    # Easy: positives {1}, junk {4} + hard {0}: image 1 ranks first, AP 1.
    assert compute_map(ranks, [GND], "easy")[0] == pytest.approx(1.0)


def test_query_without_positives_is_skipped():
    # Query 1 has no hard images: under Hard it is left out of the mean (not counted as 0).
    gnd = [GND, {"easy": [2], "hard": [], "junk": []}]
    ranks = torch.tensor([RANKING, [2, 0, 1, 3, 4, 5]]).T
    hard, aps = compute_map(ranks, gnd, "hard")
    assert hard == pytest.approx(1 / 4)
    assert aps[0] == pytest.approx(1 / 4) and math.isnan(aps[1])
    # Under Medium it has a positive, ranked first: mean of 19/24 and 1.
    assert compute_map(ranks, gnd, "medium")[0] == pytest.approx((19 / 24 + 1) / 2)
    assert math.isnan(compute_map(ranks[:, 1:], gnd[1:], "hard")[0])


def test_truncated_ranking_and_numpy_input():
    # Only the top 3 are listed: positive 0 is never retrieved, so only image 1 (rank 0) counts.
    ranks = np.array(RANKING[:3])[:, None]
    assert compute_map(ranks, [GND], "medium")[0] == pytest.approx(1 / 2)


def test_scores_are_ranked_in_decreasing_order():
    scores = torch.zeros(6, 1)
    scores[RANKING, 0] = torch.linspace(1.0, 0.0, 6)
    assert compute_map(scores, [GND], "medium")[0] == pytest.approx(19 / 24)


def test_revisited_map_in_percent_from_cosine_similarity():
    # Database image at position p of RANKING sits at 10 * p degrees from the query at 0 degrees,
    # with varying norms: cosine similarity reproduces RANKING.
    angles = torch.zeros(6)
    angles[RANKING] = torch.arange(6.0) * math.radians(10)
    db = torch.stack([angles.cos(), angles.sin()], 1) * torch.arange(1.0, 7.0)[:, None]
    query = torch.tensor([[2.0, 0.0]])
    result = revisited_map(query, db, [GND])
    assert result == {"medium": pytest.approx(100 * 19 / 24), "hard": pytest.approx(25.0)}


def reference_ap(ranking: list[int], positives: set[int], junk: set[int]) -> float:
    """Independent oracle: walk the ranking, skipping junk, and add each positive's trapezoid."""
    ap, found, rank = 0.0, 0, 0
    for image in ranking:
        if image in junk:
            continue
        if image in positives:
            before = 1.0 if rank == 0 else found / rank
            found += 1
            ap += (before + found / (rank + 1)) / 2 / len(positives)
        rank += 1
    return ap


def test_matches_a_direct_walk_on_random_rankings():
    rng = np.random.default_rng(0)
    num_db, num_queries = 40, 8
    ranks = np.stack([rng.permutation(num_db) for _ in range(num_queries)], 1)
    gnd = []
    for _ in range(num_queries):
        easy, hard, junk = np.split(rng.permutation(num_db)[:15], [4, 9])
        gnd.append({"easy": easy.tolist(), "hard": hard.tolist(), "junk": junk.tolist()})
    _, aps = compute_map(ranks, gnd, "hard")
    for q, g in enumerate(gnd):
        expected = reference_ap(ranks[:, q].tolist(), set(g["hard"]), set(g["junk"]) | set(g["easy"]))
        assert aps[q] == pytest.approx(expected)


def test_rejects_bad_input():
    ranks = torch.tensor(RANKING)[:, None]
    with pytest.raises(ValueError, match="protocol"):
        compute_map(ranks, [GND], "extreme")
    with pytest.raises(ValueError, match="one dict per query"):
        compute_map(ranks, [GND, GND], "medium")
    with pytest.raises(ValueError, match=r"gnd\[0\] lacks"):
        compute_map(ranks, [{"easy": [1]}], "medium")
    with pytest.raises(ValueError, match=r"\(num_db, num_queries\)"):
        compute_map(torch.tensor(RANKING), [GND], "medium")
