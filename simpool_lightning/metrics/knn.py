"""Weighted k-NN classification on frozen features (Wu et al., CVPR 2018; DINO's ``eval_knn.py``).

Follows facebookresearch/dino at commit 7c446df, ``eval_knn.py`` ``knn_classifier``:
:func:`knn_classify` gives its votes, :func:`knn_topk_correct` and :class:`KNNAccuracy` its
top-1 / top-5 rule; ``tests/reference/dino_knn.py`` transcribes it and the tests compare.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric

__all__ = ["KNNAccuracy", "gather_features", "knn_classify", "knn_topk_correct"]


@torch.no_grad()
def knn_classify(
    train_features: Tensor,
    train_labels: Tensor,
    test_features: Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 256,
) -> Tensor:
    """Class probabilities of test samples by a temperature-weighted vote of their nearest neighbours.

    Features are L2-normalised, so similarity is cosine. Each test sample takes its ``k`` most
    similar training samples; neighbour ``j`` votes for its label with weight
    ``exp(sim_j / temperature)``, and the votes are normalised to sum to 1 (DINO leaves them
    unnormalised; the order of the classes is the same). Classes without a vote get exactly 0.
    Score the result with :func:`knn_topk_correct` or :class:`KNNAccuracy`, which apply DINO's
    top-k rule (for ``k < 5`` a plain ``probs.topk(5)`` would count classes that got no vote).
    Which of equally similar neighbours enter the top ``k`` is up to ``torch.topk``. ``k`` is
    capped at the number of training samples.

    Args:
        train_features: ``(N, D)``.
        train_labels: ``(N,)`` integers in ``[0, num_classes)``.
        test_features: ``(M, D)``, on the device of ``train_features``.
        num_classes: ``C``.
        k: neighbours per test sample (DINO: 20).
        temperature: ``T`` of the vote weights (DINO: 0.07).
        chunk_size: test samples per similarity block; memory grows as ``chunk_size * N``.

    Returns:
        Probabilities ``(M, C)``, float32.
    """
    if train_features.dim() != 2 or test_features.dim() != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            f"train_features (N, D) and test_features (M, D) must be 2-d with the same D, "
            f"got {tuple(train_features.shape)} and {tuple(test_features.shape)}"
        )
    if train_labels.shape != train_features.shape[:1]:
        raise ValueError(
            f"train_labels must have shape (N,) = ({train_features.shape[0]},), got {tuple(train_labels.shape)}"
        )
    if train_features.shape[0] == 0:
        raise ValueError("train_features is empty: k-NN needs at least one training sample")
    if train_labels.min() < 0 or train_labels.max() >= num_classes:
        raise ValueError(f"train_labels must lie in [0, num_classes) = [0, {num_classes})")
    if k < 1 or temperature <= 0 or chunk_size < 1:
        raise ValueError(
            f"k and chunk_size must be positive and temperature > 0, got {k=}, {temperature=}, {chunk_size=}"
        )
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    labels = train_labels.long().to(train.device)
    k = min(k, train.shape[0])
    probs = []
    for chunk in test.split(chunk_size):
        sim, idx = (chunk @ train.T).topk(k, dim=1)
        # exp(sim / T) scaled by exp(-max / T): the normalised votes are the same, and nothing overflows.
        weights = ((sim - sim[:, :1]) / temperature).exp()
        votes = torch.zeros(chunk.shape[0], num_classes, device=chunk.device).scatter_add_(1, labels[idx], weights)
        probs.append(votes / votes.sum(dim=1, keepdim=True))
    return torch.cat(probs) if probs else test.new_zeros(0, num_classes)


def knn_topk_correct(probs: Tensor, targets: Tensor, top_k: int, k: int) -> Tensor:
    """Whether each query's label is among its first ``min(top_k, k)`` classes by vote: DINO's rule.

    DINO's ``knn_classifier`` sorts the classes by their votes and counts a top-5 hit among the
    first ``min(5, k)`` of them, because with ``k`` neighbours at most ``k`` classes can have a
    vote (``top5`` with ``k = 1`` is top-1). Equal votes are ranked by increasing class index (a
    stable sort), so the result is deterministic; DINO's ``sort`` leaves their order unspecified,
    which matters only when fewer than ``min(top_k, k)`` classes got a vote and the label got none.

    Args:
        probs: votes ``(M, C)``, e.g. from :func:`knn_classify`.
        targets: labels ``(M,)`` in ``[0, C)``.
        top_k: 1 for top-1, 5 for top-5.
        k: the neighbours that voted: :func:`knn_classify`'s ``k`` capped at the number of
            training samples.

    Returns:
        Boolean ``(M,)``.
    """
    if probs.dim() != 2 or targets.shape != probs.shape[:1]:
        raise ValueError(
            f"probs must be (M, C) and targets (M,), got {tuple(probs.shape)} and {tuple(targets.shape)}"
        )
    if top_k < 1 or k < 1:
        raise ValueError(f"top_k and k must be positive, got {top_k=}, {k=}")
    if targets.numel() and (targets.min() < 0 or targets.max() >= probs.shape[1]):
        raise ValueError(f"targets must lie in [0, num_classes) = [0, {probs.shape[1]})")
    slots = min(top_k, k, probs.shape[1])
    ranked = probs.sort(dim=1, descending=True, stable=True).indices[:, :slots]
    return (ranked == targets.to(ranked.device)[:, None]).any(dim=1)


class KNNAccuracy(Metric):
    """Top-k accuracy of k-NN votes by DINO's rule (:func:`knn_topk_correct`), as a torchmetrics ``Metric``.

    Counts are sums (``dist_reduce_fx="sum"``), so under DDP the processes' queries add up.

    Args:
        top_k: 1 or 5 (any positive int): the ``acc{top_k}`` this metric logs.
        k: the neighbours that voted (``knn_classify``'s ``k`` capped at the number of references).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    correct: Tensor
    total: Tensor

    def __init__(self, top_k: int, k: int, **kwargs) -> None:
        super().__init__(**kwargs)
        if top_k < 1 or k < 1:
            raise ValueError(f"top_k and k must be positive, got {top_k=}, {k=}")
        self.top_k, self.k = top_k, k
        self.add_state("correct", default=torch.tensor(0), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, probs: Tensor, targets: Tensor) -> None:
        """Accumulate votes ``(M, C)`` and labels ``(M,)``."""
        self.correct += knn_topk_correct(probs, targets, self.top_k, self.k).sum().to(self.correct.device)
        self.total += targets.shape[0]

    def compute(self) -> Tensor:
        """Fraction of queries counted correct, in ``[0, 1]`` (float32)."""
        return self.correct.float() / self.total


def _all_gather_rows(x: Tensor, counts: list[int]) -> Tensor:
    """All-gather ``(n_r, ...)`` blocks of unequal length ``counts[r]``, concatenated in rank order."""
    padded = x.new_zeros((max(counts), *x.shape[1:]))
    padded[: x.shape[0]] = x
    blocks = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(blocks, padded.contiguous())
    return torch.cat([b[:n] for b, n in zip(blocks, counts)])


@torch.no_grad()
def gather_features(features: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Collect features and labels from every process, in rank order; the identity without ``torch.distributed``.

    Processes may hold different numbers of samples: each pads its block to the largest count and
    the padding is cut off after the all-gather. Rows stay paired with their labels; their order is
    rank by rank, which is not the dataset order under a ``DistributedSampler`` (k-NN does not
    care), and samples the sampler repeated to even out the ranks stay repeated.

    Args:
        features: this process's ``(n, D)``.
        labels: this process's ``(n,)``.

    Returns:
        ``(features (N, D), labels (N,))`` with ``N`` the sum of ``n`` over processes.
    """
    if features.dim() < 1 or labels.shape[:1] != features.shape[:1]:
        raise ValueError(
            f"features (n, D) and labels (n,) must have the same length, "
            f"got {tuple(features.shape)} and {tuple(labels.shape)}"
        )
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, labels
    count = torch.tensor([features.shape[0]], device=features.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c) for c in counts]
    return _all_gather_rows(features, sizes), _all_gather_rows(labels.to(features.device), sizes)
