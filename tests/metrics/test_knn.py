"""Weighted k-NN on hand-worked votes and separable clusters, top-k by DINO's rule against a
transcription of its knn_classifier; gather_features without distributed."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from simpool_lightning.metrics import KNNAccuracy, gather_features, knn_classify, knn_topk_correct
from tests.reference import dino_knn


def at(degrees: float, norm: float = 1.0) -> list[float]:
    """A 2-d feature at an angle; the norm must not matter (features are L2-normalised)."""
    return [norm * math.cos(math.radians(degrees)), norm * math.sin(math.radians(degrees))]


TRAIN = torch.tensor([at(0, 3.0), at(60), at(90, 0.5), at(180), at(-45, 2.0)])
LABELS = torch.tensor([0, 1, 1, 0, 2])


def test_knn_hand_worked_votes():
    # Query at 0 deg: cosines to the train set are 1, 0.5, 0, -1, cos 45 = 0.7071.
    # k = 3 keeps 0 deg (class 0, sim 1), -45 deg (class 2, sim 0.7071), 60 deg (class 1, sim 0.5).
    # Query at 80 deg: cosines cos 80 = 0.1736, cos 20 = 0.9397, cos 10 = 0.9848, cos 100, cos 125;
    # k = 3 keeps 90 deg (class 1), 60 deg (class 1), 0 deg (class 0).
    # With T = 1 the votes are exp(sim); probabilities are votes over their sum.
    probs = knn_classify(TRAIN, LABELS, torch.tensor([at(0), at(80)]), num_classes=3, k=3, temperature=1.0)
    c45, c20, c10, c80 = (math.cos(math.radians(a)) for a in (45, 20, 10, 80))
    votes = torch.tensor(
        [
            [math.exp(1.0), math.exp(0.5), math.exp(c45)],
            [math.exp(c80), math.exp(c10) + math.exp(c20), 0.0],
        ]
    )
    assert torch.allclose(probs, votes / votes.sum(1, keepdim=True), atol=1e-6)
    assert probs.argmax(1).tolist() == [0, 1]


def test_knn_temperature_sharpens_towards_the_nearest():
    # Query at 0 deg; neighbours at 0 deg (class 0, sim 1) and +-30 deg (class 1, sim 0.866 each).
    # T = 1:    class 0 gets e^1 = 2.72, class 1 gets 2 e^0.866 = 4.75: the majority wins.
    # T = 0.07: class 0 gets e^14.29, class 1 gets 2 e^12.37: ratio e^1.91 / 2 = 3.4, the nearest wins.
    train = torch.tensor([at(0), at(30), at(-30)])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([at(0)])
    assert knn_classify(train, labels, query, num_classes=2, k=3, temperature=1.0).argmax().item() == 1
    sharp = knn_classify(train, labels, query, num_classes=2, k=3, temperature=0.07)
    ratio = math.exp((1 - math.cos(math.radians(30))) / 0.07) / 2
    assert sharp[0, 0].item() == pytest.approx(ratio / (1 + ratio), rel=1e-5)


def test_knn_separable_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(0)
    centers = 5 * torch.eye(4, 16)
    train_labels = torch.arange(4).repeat_interleave(50)
    test_labels = torch.arange(4).repeat_interleave(25)
    train = centers[train_labels] + torch.randn(200, 16, generator=g)
    test = centers[test_labels] + torch.randn(100, 16, generator=g)
    probs = knn_classify(train, train_labels, test, num_classes=4, chunk_size=32)
    assert probs.shape == (100, 4)
    assert torch.allclose(probs.sum(1), torch.ones(100))
    assert (probs.argmax(1) == test_labels).float().mean().item() == 1.0
    # Chunking changes nothing.
    assert torch.allclose(knn_classify(train, train_labels, test, num_classes=4, chunk_size=1000), probs)


def test_knn_caps_k_and_rejects_bad_input():
    probs = knn_classify(TRAIN, LABELS, torch.tensor([at(0)]), num_classes=3, k=100)
    assert probs.shape == (1, 3)
    with pytest.raises(ValueError, match="same D"):
        knn_classify(TRAIN, LABELS, torch.rand(2, 3), num_classes=3)
    with pytest.raises(ValueError, match=r"train_labels must have shape \(N,\)"):
        knn_classify(TRAIN, LABELS[:3], torch.rand(2, 2), num_classes=3)
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(TRAIN, LABELS, torch.rand(2, 2), num_classes=2)


def clusters(seed: int, classes: int = 20, dim: int = 16, n_train: int = 400, n_test: int = 300, spread: float = 1.2):
    """Noisy Gaussian clusters: neighbours often disagree, so top-1 and top-5 differ."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g)
    train_labels = torch.randint(0, classes, (n_train,), generator=g)
    test_labels = torch.randint(0, classes, (n_test,), generator=g)
    train = centers[train_labels] + spread * torch.randn(n_train, dim, generator=g)
    test = centers[test_labels] + spread * torch.randn(n_test, dim, generator=g)
    return train, train_labels, test, test_labels, classes


@pytest.mark.parametrize("k", [1, 3, 20])
@pytest.mark.parametrize("seed", [0, 1])
def test_knn_top1_and_top5_equal_dinos_knn_classifier(k: int, seed: int):
    train, train_labels, test, test_labels, classes = clusters(seed)
    top1, top5 = dino_knn.knn_classifier(
        F.normalize(train, dim=1), train_labels, F.normalize(test, dim=1), test_labels, k, 0.07, classes
    )
    probs = knn_classify(train, train_labels, test, classes, k=k, temperature=0.07, chunk_size=64)
    counts = []
    for top_k in (1, 5):
        metric = KNNAccuracy(top_k, k)
        metric.update(probs, test_labels)
        counts.append(metric.correct.item())
        assert metric.compute().item() == pytest.approx(counts[-1] / len(test_labels))
    # DINO's percentages are counts * 100 / 300: compare the counts exactly.
    assert counts == [round(top1 * 3), round(top5 * 3)]
    assert 0 < counts[0] < len(test_labels) and counts[0] <= counts[1]
    if k == 1:
        assert counts[1] == counts[0]  # one neighbour, one class with a vote: top-5 is top-1
    if k < 5:
        # Counting 5 places regardless of k (the earlier rule) credits classes that got no vote.
        assert knn_topk_correct(probs, test_labels, 5, 5).sum().item() > counts[1]


def test_knn_top5_hand_worked_for_k_below_5():
    # Query at 0 deg; k = 3 keeps 0 deg (class 0), -45 deg (class 2), 60 deg (class 1) of TRAIN:
    # classes by vote 0, 2, 1, then the classes without a vote (3, 4, 5) by index.
    train = torch.cat([TRAIN, torch.tensor([at(170), at(-170), at(150)])])
    labels = torch.cat([LABELS, torch.tensor([3, 4, 5])])
    probs = knn_classify(train, labels, torch.tensor([at(0)] * 6), num_classes=6, k=3, temperature=1.0)
    targets = torch.arange(6)
    assert knn_topk_correct(probs, targets, 5, 3).tolist() == [True, True, True, False, False, False]
    assert knn_topk_correct(probs, targets, 1, 3).tolist() == [True, False, False, False, False, False]
    # k = 2: classes 0 and 2 only.
    probs = knn_classify(train, labels, torch.tensor([at(0)] * 6), num_classes=6, k=2, temperature=1.0)
    assert knn_topk_correct(probs, targets, 5, 2).tolist() == [True, False, True, False, False, False]


def test_knn_topk_ties_go_to_the_lower_class_index():
    # Two classes with equal votes and three without: k = 3 places are 1, 3 (equal votes, by index), then 0.
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).expand(5, 5)
    assert knn_topk_correct(probs, torch.arange(5), 5, 3).tolist() == [True, True, False, True, False]
    assert knn_topk_correct(probs, torch.arange(5), 1, 3).tolist() == [False, True, False, False, False]


def test_knn_accuracy_merges_like_ddp_and_rejects_bad_input():
    train, train_labels, test, test_labels, classes = clusters(2, n_test=50)
    probs = knn_classify(train, train_labels, test, classes, k=3)
    whole, rank0, rank1 = KNNAccuracy(5, 3), KNNAccuracy(5, 3), KNNAccuracy(5, 3)
    whole.update(probs, test_labels)
    rank0.update(probs[:30], test_labels[:30])
    rank1.update(probs[30:], test_labels[30:])
    rank0.merge_state(rank1)  # applies the states' dist_reduce_fx, as the DDP sync does
    assert rank0.compute().item() == whole.compute().item()
    with pytest.raises(ValueError, match=r"probs must be \(M, C\) and targets \(M,\)"):
        knn_topk_correct(probs, test_labels[:3], 5, 3)
    with pytest.raises(ValueError, match="targets must lie in"):
        knn_topk_correct(probs, torch.full((50,), classes), 5, 3)
    with pytest.raises(ValueError, match="top_k and k must be positive"):
        KNNAccuracy(5, 0)


def test_gather_features_is_identity_without_distributed():
    features, labels = torch.rand(5, 3), torch.arange(5)
    out_features, out_labels = gather_features(features, labels)
    assert out_features is features and out_labels is labels
    with pytest.raises(ValueError, match="same length"):
        gather_features(features, labels[:4])
