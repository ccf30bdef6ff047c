"""Who holds which training sample: the fixed splits of the bundled datasets and the non-IID
client partition, in numpy alone.

:mod:`fedmitr.data` loads the images and re-exports all of this; living here, without torch, the
command line can draw a run's split from the labels before it loads anything heavy, so an
impossible split (20 clients at alpha 0.001) is refused in a fraction of a second.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmitr.catalog import BUNDLED
from fedmitr.config import RunConfig
from fedmitr.errors import ConfigError

__all__ = ["BUNDLED_TEST_FRACTION", "Partition", "SPLIT_SEED", "VALIDATION_FRACTION", "bundled_split",
           "bundled_train_labels", "check_split", "label_entropy", "partition", "stratified_split",
           "stratified_subset", "validation_split"]

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"  # data files inside the package (pip install . has them)
# Fixed seed for the train/test split of datasets that ship without one: the test set must not
# change with the run seed, or runs could not be compared.
SPLIT_SEED = 1234
BUNDLED_TEST_FRACTION = 0.2  # the bundled sets hold out a fixed stratified 20% as their test split
VALIDATION_FRACTION = 0.2  # of the training split, held out by data.validation_view


# --- fixed, stratified splits ----------------------------------------------------------------------

def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a class-stratified train/test split, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def stratified_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """About ``size`` indices with the class proportions of ``labels``, deterministic for ``seed``."""
    if size >= len(labels):
        return np.arange(len(labels))
    _, keep = stratified_split(labels, size / len(labels), seed)
    return keep


def bundled_split(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices of a bundled dataset: its fixed stratified 80/20 split."""
    return stratified_split(labels, BUNDLED_TEST_FRACTION, SPLIT_SEED)


def validation_split(train_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) indices of a training split for a validation run: a fixed stratified 20%."""
    return stratified_split(train_labels, VALIDATION_FRACTION, SPLIT_SEED + 1)


def bundled_train_labels(name: str, max_train: int | None = None, *,
                         validation: bool = False) -> tuple[np.ndarray, int]:
    """(labels of the training split, number of classes) of a bundled dataset, as
    ``open_dataset(name, max_train)`` (then ``validation_view`` with ``validation``) has them,
    read without the images."""
    if name in ("mnist5k", "mnist-canvas"):  # the canvas set moves the same digits
        path = BUNDLED_DIR / "mnist5k.npz"
        if not path.exists():
            raise ConfigError(f"bundled file {path} is missing; rebuild it with assets/make_mnist5k.py")
        with np.load(path) as npz:
            labels = npz["labels"].astype(np.int64)
    elif name == "digits":
        from sklearn.datasets import load_digits

        labels = load_digits().target.astype(np.int64)
    else:
        raise ConfigError(f"{name!r} is not a bundled dataset; those are {', '.join(BUNDLED)}")
    train = labels[bundled_split(labels)[0]]
    if max_train is not None and max_train < len(train):
        train = train[stratified_subset(train, max_train, SPLIT_SEED)]
    if validation:
        train = train[validation_split(train)[0]]
    return train, 10  # the digits 0-9


# --- the client partition --------------------------------------------------------------------------

@dataclass(frozen=True)
class Partition:
    client_indices: tuple[np.ndarray, ...]  # K arrays of training-set indices, disjoint, covering it
    class_counts: np.ndarray  # [K, C] int, samples of class c held by client k
    alpha: float | None  # None = IID

    @property
    def num_clients(self) -> int:
        return len(self.client_indices)


def partition(labels: np.ndarray, num_clients: int, alpha: float | None, num_classes: int, *,
              seed: int, min_samples: int = 10, max_tries: int = 1000) -> Partition:
    """Split training indices over clients: per-class Dirichlet(alpha) label skew, or IID.

    For each class, proportions over the K clients are drawn from Dir(alpha * 1) and the class's
    samples are dealt out accordingly. The draw is repeated, at most ``max_tries`` times, until
    every client holds at least ``min_samples``. Deterministic for a given ``seed``. Every sample
    goes to exactly one client.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if num_clients < 2:
        raise ConfigError(f"clients must be >= 2 (got {num_clients})")
    if num_clients * min_samples > n:
        raise ConfigError(
            f"{num_clients} clients x {min_samples} samples each needs {num_clients * min_samples} "
            f"training samples, but the dataset has {n}; use at most {n // min_samples} clients"
        )
    rng = np.random.default_rng(seed)
    if alpha is None:
        shards = np.array_split(rng.permutation(n), num_clients)
        return _finish(labels, [np.sort(s) for s in shards], num_classes, None)
    if not alpha > 0:
        raise ConfigError(f"alpha must be > 0 (got {alpha}); use 'iid' for an unskewed split")
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    class_sizes = np.array([len(idx) for idx in by_class])
    concentration = np.full(num_clients, alpha)
    most_served = 0  # the most clients any draw gave min_samples to
    for _ in range(max_tries):
        # Per class: shuffle its samples, draw the clients' shares, cut. Only the clients' sizes are
        # counted here (one array operation for all classes); the shards are built for the draw
        # that is kept. At a tiny alpha nearly every draw is rejected, and a rejection is cheap.
        shuffled = []
        shares = np.empty((num_classes, num_clients))
        for c, idx in enumerate(by_class):
            shuffled.append(rng.permutation(idx))
            shares[c] = rng.dirichlet(concentration)
        cuts = (np.cumsum(shares[:, :-1], axis=1) * class_sizes[:, None]).astype(int)  # [C, K-1]
        ends = np.minimum(np.hstack([cuts, class_sizes[:, None]]), class_sizes[:, None])  # [C, K]
        sizes = np.diff(ends, axis=1, prepend=0).sum(axis=0)  # [K] samples per client
        served = int((sizes >= min_samples).sum())
        if served == num_clients:
            parts: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
            for idx, class_cuts in zip(shuffled, cuts):
                for k, chunk in enumerate(np.split(idx, class_cuts)):
                    parts[k].append(chunk)
            return _finish(labels, [np.sort(np.concatenate(p)) for p in parts], num_classes, alpha)
        most_served = max(most_served, served)
    raise ConfigError(
        f"could not give each of {num_clients} clients at least {min_samples} samples at alpha={alpha:g} "
        f"in {max_tries} draws (the best draw gave that many to {most_served} of them: a small alpha deals "
        f"each class to few clients); use fewer clients, a larger alpha, 'iid', or a smaller min_client_samples"
    )


def check_split(cfg: RunConfig) -> Partition | None:
    """The client split ``cfg`` asks for, drawn from a bundled dataset's labels alone exactly as the
    run will draw it; :class:`ConfigError` if it is impossible. None for a Hub dataset (its labels
    come with its download)."""
    d = cfg.data
    if d.dataset not in BUNDLED:
        return None
    labels, num_classes = bundled_train_labels(d.dataset, d.max_train_samples, validation=d.evaluate_on == "validation")
    return partition(labels, d.num_clients, d.alpha, num_classes, seed=cfg.seed, min_samples=d.min_client_samples)


def _finish(labels: np.ndarray, shards: list[np.ndarray], num_classes: int, alpha: float | None) -> Partition:
    counts = np.stack([np.bincount(labels[s], minlength=num_classes) for s in shards]).astype(np.int64)
    return Partition(tuple(shards), counts, alpha)


def label_entropy(class_counts: np.ndarray) -> float:
    """Mean over clients of the entropy (nats) of each client's label distribution. Lower = more skew."""
    p = class_counts / np.maximum(class_counts.sum(axis=1, keepdims=True), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(axis=1)
    return float(h.mean())
