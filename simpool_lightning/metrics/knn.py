"""Weighted k-NN classification on frozen features (Wu et al., CVPR 2018; DINO's ``eval_knn.py``)."""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gather_features", "knn_classify"]


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
    ``exp(sim_j / temperature)``, and the votes are normalised to sum to 1. The argmax is DINO's
    top-1 prediction (``probs.topk(5)`` gives its top-5); ``torch.argmax`` breaks ties towards the
    lower class index. Which of equally similar neighbours enter the top ``k`` is up to
    ``torch.topk``. ``k`` is capped at the number of training samples.

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
