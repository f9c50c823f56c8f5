"""A plain transcription of DINO's weighted k-NN classifier (the oracle for ``knn_classify`` and ``KNNAccuracy``).

Source: facebookresearch/dino at commit 7c446df5b9f45747937fb0d72314eb9f7b66930a, ``eval_knn.py``
``knn_classifier``, rewritten step by step: the test set is cut into 100 chunks of
``len // 100`` queries (so it needs at least 100); per chunk the ``k`` most similar training
features (dot products of L2-normalised features, which DINO's ``extract_features`` caller
normalises) vote for their labels with weight ``exp(sim / T)`` through a one-hot matrix; classes
are sorted by their summed votes; a query counts for top-1 when its label comes first and for
top-5 when it is among the first ``min(5, k)``.

One deliberate choice: DINO sorts with ``probs.sort(1, True)``, which leaves the order of equal
votes unspecified (in practice, classes without a vote when fewer than ``min(5, k)`` classes got
one). This transcription sorts stably, so equal votes go in increasing class order, the rule the
package states.
"""
from __future__ import annotations

import torch
from torch import Tensor


@torch.no_grad()
def knn_classifier(
    train_features: Tensor, train_labels: Tensor, test_features: Tensor, test_labels: Tensor, k: int, T: float, num_classes: int
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy in percent; features ``(N, D)`` / ``(M, D)`` already L2-normalised."""
    top1, top5, total = 0.0, 0.0, 0
    train_features = train_features.t()
    num_test_images, num_chunks = test_labels.shape[0], 100
    imgs_per_chunk = num_test_images // num_chunks
    retrieval_one_hot = torch.zeros(k, num_classes)
    for idx in range(0, num_test_images, imgs_per_chunk):
        features = test_features[idx : min(idx + imgs_per_chunk, num_test_images), :]
        targets = test_labels[idx : min(idx + imgs_per_chunk, num_test_images)]
        batch_size = targets.shape[0]
        similarity = torch.mm(features, train_features)
        distances, indices = similarity.topk(k, largest=True, sorted=True)
        candidates = train_labels.view(1, -1).expand(batch_size, -1)
        retrieved_neighbors = torch.gather(candidates, 1, indices)
        retrieval_one_hot.resize_(batch_size * k, num_classes).zero_()
        retrieval_one_hot.scatter_(1, retrieved_neighbors.view(-1, 1), 1)
        distances_transform = distances.clone().div_(T).exp_()
        probs = torch.sum(
            torch.mul(retrieval_one_hot.view(batch_size, -1, num_classes), distances_transform.view(batch_size, -1, 1)),
            1,
        )
        _, predictions = probs.sort(dim=1, descending=True, stable=True)
        correct = predictions.eq(targets.data.view(-1, 1))
        top1 = top1 + correct.narrow(1, 0, 1).sum().item()
        top5 = top5 + correct.narrow(1, 0, min(5, k)).sum().item()
        total += targets.size(0)
    return top1 * 100.0 / total, top5 * 100.0 / total
