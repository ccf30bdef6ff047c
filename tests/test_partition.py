"""The client partition: Dirichlet label skew or IID, checked as properties over many settings."""

from __future__ import annotations

import numpy as np
import pytest

from fedmitr.config import ConfigError
from fedmitr.data import label_entropy, partition

# A label array with very unequal classes, next to the balanced MNIST one.
SKEWED_LABELS = np.repeat(np.arange(5), [10, 50, 100, 300, 540])


@pytest.fixture(scope="module")
def mnist_labels(mnist5k) -> np.ndarray:
    return mnist5k.train.labels.numpy()


def _labels(which: str, mnist_labels: np.ndarray) -> np.ndarray:
    return mnist_labels if which == "mnist" else SKEWED_LABELS


# (labels, K, alpha, seed, min_samples)
SETTINGS = [
    ("mnist", 2, 0.1, 0, 10),
    ("mnist", 5, 0.5, 1, 20),
    ("mnist", 10, 0.1, 2, 10),
    ("mnist", 10, 1.0, 3, 50),
    ("mnist", 20, 0.3, 4, 10),
    ("mnist", 7, 100.0, 5, 10),
    ("mnist", 5, None, 6, 10),
    ("mnist", 13, None, 7, 300),
    ("skewed", 4, 0.5, 8, 10),
    ("skewed", 3, None, 9, 10),
]


@pytest.mark.parametrize("which, k, alpha, seed, min_samples", SETTINGS)
def test_partition_properties(which, k, alpha, seed, min_samples, mnist_labels):
    labels = _labels(which, mnist_labels)
    num_classes = int(labels.max()) + 1
    part = partition(labels, k, alpha, num_classes, seed=seed, min_samples=min_samples)

    assert part.num_clients == k
    assert part.alpha == alpha
    # Every training index goes to exactly one client.
    everything = np.concatenate(part.client_indices)
    assert len(everything) == len(labels)
    assert np.array_equal(np.sort(everything), np.arange(len(labels)))
    # class_counts is what each client really holds, and adds up to the label histogram.
    assert part.class_counts.shape == (k, num_classes)
    for idx, counts in zip(part.client_indices, part.class_counts):
        assert np.array_equal(np.bincount(labels[idx], minlength=num_classes), counts)
    assert np.array_equal(part.class_counts.sum(axis=0), np.bincount(labels, minlength=num_classes))
    assert min(len(idx) for idx in part.client_indices) >= min_samples

    same = partition(labels, k, alpha, num_classes, seed=seed, min_samples=min_samples)
    assert all(np.array_equal(a, b) for a, b in zip(part.client_indices, same.client_indices))
    other = partition(labels, k, alpha, num_classes, seed=seed + 100, min_samples=min_samples)
    assert not all(np.array_equal(a, b) for a, b in zip(part.client_indices, other.client_indices))


def test_iid_clients_are_near_equal_in_size(mnist_labels):
    for k in (2, 3, 7, 10):
        sizes = [len(idx) for idx in partition(mnist_labels, k, None, 10, seed=k).client_indices]
        assert max(sizes) - min(sizes) <= 1


def test_smaller_alpha_means_more_label_skew(mnist_labels):
    def mean_entropy(alpha):
        return np.mean([label_entropy(partition(mnist_labels, 10, alpha, 10, seed=s).class_counts)
                        for s in range(4)])

    h = {alpha: mean_entropy(alpha) for alpha in (0.1, 0.5, 10.0, None)}
    assert h[0.1] < h[0.5] < h[10.0] < h[None]
    assert h[None] == pytest.approx(np.log(10), abs=0.02)  # IID: every client sees all 10 classes evenly
    assert h[0.1] < 0.6 * np.log(10)  # alpha 0.1 is extreme: most clients hold a few classes


def test_label_entropy_extremes():
    assert label_entropy(np.eye(4, dtype=int) * 7) == 0.0
    assert label_entropy(np.full((3, 5), 2)) == pytest.approx(np.log(5))
    # A client with no samples counts as zero entropy, not NaN.
    assert label_entropy(np.array([[0, 0], [1, 1]])) == pytest.approx(np.log(2) / 2)


@pytest.mark.parametrize(
    "k, alpha, min_samples, expected",
    [
        (1, 0.5, 10, r"clients must be >= 2 \(got 1\)"),
        (401, 0.5, 10, r"401 clients x 10 samples.*4010.*has 4000; use at most 400 clients"),
        (5, 0.0, 10, r"alpha must be > 0 \(got 0.0\); use 'iid'"),
        (5, -1.0, 10, r"alpha must be > 0 \(got -1.0\); use 'iid'"),
        (5, float("nan"), 10, r"alpha must be > 0 .*'iid'"),
        # Possible in principle, hopeless in practice: gives up with advice instead of looping.
        (10, 0.01, 399, r"could not give each of 10 clients at least 399 samples.*fewer clients"),
    ],
)
def test_impossible_partitions_raise_config_error(k, alpha, min_samples, expected, mnist_labels):
    with pytest.raises(ConfigError, match=expected):
        partition(mnist_labels, k, alpha, 10, seed=0, min_samples=min_samples, max_tries=50)
