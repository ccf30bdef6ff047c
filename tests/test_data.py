"""Datasets: the bundled loaders, the Hub adapter (on in-memory ``datasets``), and subsampling."""

from __future__ import annotations

import re
import time

import numpy as np
import PIL.Image
import pytest
import torch
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image

from fedmitr.errors import ConfigError, DatasetUnavailable
from fedmitr.data import (
    BUNDLED_DIR,
    HUB_DATASETS,
    HubSpec,
    ImageDataset,
    Split,
    check_dataset_name,
    dataset_from_hf,
    label_entropy,
    open_dataset,
    partition,
    subsample,
    validation_view,
)
from fedmitr.knobs import config_from_knobs
from fedmitr.partition import bundled_train_labels, check_split


def _unit_uint8(ds: ImageDataset, images: torch.Tensor) -> torch.Tensor:
    """Normalised images back to the uint8 pixels they came from."""
    return (ds.to_unit(images) * 255).round().to(torch.uint8)


def _row_bytes(images: np.ndarray) -> list[bytes]:
    return sorted(img.tobytes() for img in images)


# --- bundled: mnist5k ------------------------------------------------------------------------------

def test_mnist5k_sizes_shapes_and_balance(mnist5k):
    assert (len(mnist5k.train), len(mnist5k.test)) == (4000, 1000)
    assert mnist5k.train.images.shape == (4000, 1, 28, 28)
    assert mnist5k.test.images.shape == (1000, 1, 28, 28)
    assert mnist5k.train.images.dtype == torch.float32
    assert mnist5k.train.labels.dtype == torch.int64
    assert (mnist5k.channels, mnist5k.image_size, mnist5k.num_classes) == (1, 28, 10)
    assert mnist5k.class_names == tuple(str(d) for d in range(10))
    assert mnist5k.allow_flip is False  # a flipped digit is not the same digit
    assert mnist5k.train.labels.bincount(minlength=10).tolist() == [400] * 10
    assert mnist5k.test.labels.bincount(minlength=10).tolist() == [100] * 10


def test_mnist5k_is_normalised_with_train_statistics(mnist5k):
    per_channel_mean = mnist5k.train.images.mean(dim=(0, 2, 3))
    per_channel_std = mnist5k.train.images.std(dim=(0, 2, 3))
    assert torch.allclose(per_channel_mean, torch.zeros(1), atol=1e-4)
    assert torch.allclose(per_channel_std, torch.ones(1), atol=1e-3)
    # The test split uses the *train* statistics: close to, but not exactly, standardised.
    assert abs(float(mnist5k.test.images.mean())) < 0.1
    # MNIST pixel statistics, so the images were not standardised from some other scale.
    assert mnist5k.mean[0] == pytest.approx(0.13, abs=0.02)
    assert mnist5k.std[0] == pytest.approx(0.31, abs=0.02)


def test_mnist5k_split_is_fixed_and_covers_the_bundled_file_once(mnist5k):
    again = open_dataset("mnist5k")
    assert torch.equal(again.train.images, mnist5k.train.images)
    assert torch.equal(again.train.labels, mnist5k.train.labels)
    assert torch.equal(again.test.images, mnist5k.test.images)
    assert torch.equal(again.test.labels, mnist5k.test.labels)
    # Every bundled image lands in exactly one split, with its pixels intact.
    with np.load(BUNDLED_DIR / "mnist5k.npz") as npz:
        raw = npz["images"]
    both = torch.cat([_unit_uint8(mnist5k, mnist5k.train.images), _unit_uint8(mnist5k, mnist5k.test.images)])
    assert _row_bytes(both.squeeze(1).numpy()) == _row_bytes(raw)


def test_pixel_bounds_and_to_unit_round_trip(mnist5k):
    lo, hi = mnist5k.pixel_bounds()
    assert lo.shape == hi.shape == (1, 1, 1, 1)
    # MNIST has pure black and pure white pixels, so the data reaches both bounds.
    assert float(mnist5k.train.images.min()) == pytest.approx(float(lo), abs=1e-5)
    assert float(mnist5k.train.images.max()) == pytest.approx(float(hi), abs=1e-5)
    assert float(mnist5k.to_unit(lo)) == pytest.approx(0.0, abs=1e-6)
    assert float(mnist5k.to_unit(hi)) == pytest.approx(1.0, abs=1e-6)

    images = mnist5k.test.images[:64]
    unit = mnist5k.to_unit(images)
    assert unit.shape == images.shape
    assert float(unit.min()) >= 0.0 and float(unit.max()) <= 1.0
    mean = torch.tensor(mnist5k.mean).view(1, -1, 1, 1)
    std = torch.tensor(mnist5k.std).view(1, -1, 1, 1)
    assert torch.allclose((unit - mean) / std, images, atol=1e-5)
    # Out-of-range values (e.g. from inversion) are clipped for display.
    assert torch.equal(mnist5k.to_unit(images + 100), torch.ones_like(images))


def test_digits_are_16px_with_a_fixed_80_20_split():
    ds = open_dataset("digits")
    assert ds.train.images.shape[1:] == (1, 16, 16)
    assert ds.test.images.shape[1:] == (1, 16, 16)
    assert len(ds.train) + len(ds.test) == 1797  # scikit-learn's load_digits
    assert len(ds.test) / 1797 == pytest.approx(0.2, abs=0.01)
    assert set(ds.train.labels.tolist()) == set(range(10))
    assert ds.num_classes == 10
    assert torch.equal(open_dataset("digits").test.images, ds.test.images)


def test_unknown_dataset_names_the_choices():
    with pytest.raises(ConfigError) as err:
        open_dataset("nope")
    message = str(err.value)
    assert "'nope'" in message
    for name in ("mnist5k", "digits", "cifar10", "hf:owner/name"):
        assert name in message


@pytest.mark.parametrize("name, message", [
    ("hf:foo", "hf:owner/name"), ("hf:/name", "hf:owner/name"), ("hf:owner/", "hf:owner/name"),
    ("hf:a/b/c", "hf:owner/name"), ("hf:own er/x", "hf:owner/name"), ("", "unknown dataset"),
    ("x" * 500, "unknown dataset 'xxxxxxxx"),
])
def test_dataset_names_are_checked_without_loading(name, message):
    with pytest.raises(ConfigError, match=message) as err:
        check_dataset_name(name)
    assert len(str(err.value)) < 300  # a long value is cut, not echoed in full


def test_valid_dataset_names_pass():
    for name in ("mnist5k", "digits", "cifar10", "hf:someone/some-images"):
        check_dataset_name(name)


@pytest.fixture
def hub_calls(monkeypatch, tmp_path):
    """Every datasets.load_dataset call (each one fails as an unreachable Hub would); the Hub caches
    point at empty folders, so nothing is cached unless a test puts it there."""
    import datasets

    calls = []

    def load_dataset(hub_id, *args, **kwargs):
        calls.append(hub_id)
        raise ConnectionError(f"Couldn't reach '{hub_id}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    return calls


def _no_hub(monkeypatch) -> None:
    """No offline flag, and a Hub that does not answer: a port nobody listens on."""
    import socket

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")


@pytest.mark.parametrize("offline", ["flag", "no network"])
@pytest.mark.parametrize("name", ["cifar10", "tiny-imagenet", "hf:someone/some-images"])
def test_hub_dataset_offline_is_refused_without_asking_the_hub(name, offline, hub_calls, monkeypatch):
    """Refused before datasets.load_dataset (whose retries took ~35 s), saying why and what works offline."""
    if offline == "no network":
        _no_hub(monkeypatch)
    with pytest.raises(DatasetUnavailable) as err:
        open_dataset(name)
    assert hub_calls == []
    message = str(err.value)
    assert "HF_HUB_OFFLINE" in message if offline == "flag" else "does not answer" in message
    assert "no cached copy" in message and "bundled dataset: mnist5k, mnist-canvas, digits" in message


@pytest.mark.parametrize("cache", ["hub/datasets--uoft-cs--cifar10", "datasets/uoft-cs___cifar10"])
def test_a_cached_hub_dataset_is_still_loaded_offline(cache, hub_calls, tmp_path):
    """datasets loads a cached copy offline: that is not refused (here the mocked load fails)."""
    (tmp_path / cache).mkdir(parents=True)
    with pytest.raises(DatasetUnavailable, match="cannot load 'cifar10'"):
        open_dataset("cifar10")
    assert hub_calls == ["uoft-cs/cifar10"]


# --- the Hub adapter, on in-memory datasets ---------------------------------------------------------

def _images(n: int, size: tuple[int, int] | list[tuple[int, int]], gray: bool = False, seed: int = 0):
    """``n`` random uint8 images as (PIL list, numpy list); ``size`` is (width, height) or one per image."""
    rng = np.random.default_rng(seed)
    sizes = size if isinstance(size, list) else [size] * n
    arrays = [rng.integers(0, 256, (h, w) if gray else (h, w, 3), dtype=np.uint8) for w, h in sizes]
    return [PIL.Image.fromarray(a) for a in arrays], arrays


def _hf_split(images, labels, names, image_col="img", label_col="label", extra=None) -> Dataset:
    data = {image_col: images, label_col: labels}
    features = {image_col: Image(), label_col: ClassLabel(names=list(names))}
    for col, (values, feature) in (extra or {}).items():
        data[col] = values
        features[col] = feature
    return Dataset.from_dict(data, features=Features(features))


def _chw(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


HF_LAYOUTS = {
    # name: (registry spec, image column, label column, {split: size}, expected test split)
    "cifar10": (HUB_DATASETS["cifar10"], "img", "label", {"train": 12, "test": 6}, "test"),
    "cifar100": (HUB_DATASETS["cifar100"], "img", "fine_label", {"train": 12, "test": 6}, "test"),
    "tiny-imagenet": (HUB_DATASETS["tiny-imagenet"], "image", "label", {"train": 12, "valid": 6}, "valid"),
    # The spec's own test split wins over an earlier name in the fallback list.
    "mini-imagenet": (HUB_DATASETS["mini-imagenet"], "image", "label",
                      {"train": 12, "test": 3, "validation": 6}, "validation"),
}


@pytest.mark.parametrize("layout", list(HF_LAYOUTS))
def test_dataset_from_hf_adapts_hub_layouts(layout):
    spec, image_col, label_col, sizes, test_name = HF_LAYOUTS[layout]
    names = ("cat", "dog", "eel")
    px = spec.image_size
    splits, arrays, labels = {}, {}, {}
    for i, (split, n) in enumerate(sizes.items()):
        images, arrays[split] = _images(n, (px, px), seed=i)
        labels[split] = [(j + i) % 3 for j in range(n)]
        extra = None
        if label_col == "fine_label":  # CIFAR-100 also carries a coarse label that must be ignored
            extra = {"coarse_label": ([2 - y for y in labels[split]], ClassLabel(names=["x", "y", "z"]))}
        splits[split] = _hf_split(images, labels[split], names, image_col, label_col, extra)

    ds = dataset_from_hf(DatasetDict(splits), layout, spec)

    assert ds.name == layout
    assert ds.class_names == names
    assert ds.train.images.shape == (sizes["train"], 3, px, px)
    assert ds.test.images.shape == (sizes[test_name], 3, px, px)
    assert ds.train.labels.tolist() == labels["train"]
    assert ds.test.labels.tolist() == labels[test_name]
    assert torch.equal(_unit_uint8(ds, ds.train.images), _chw(arrays["train"]))
    assert torch.equal(_unit_uint8(ds, ds.test.images), _chw(arrays[test_name]))
    assert ds.allow_flip is True
    assert spec.hub_id in ds.source
    assert torch.allclose(ds.train.images.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_dataset_from_hf_holds_out_a_stratified_20_percent_without_a_test_split():
    names = [f"c{i}" for i in range(5)]
    labels = [i % 5 for i in range(50)]
    images, arrays = _images(50, (32, 32))
    splits = {"train": _hf_split(images, labels, names)}
    spec = HubSpec("someone/train-only", 32)

    ds = dataset_from_hf(splits, "train-only", spec)

    assert (len(ds.train), len(ds.test)) == (40, 10)
    assert ds.train.labels.bincount(minlength=5).tolist() == [8] * 5
    assert ds.test.labels.bincount(minlength=5).tolist() == [2] * 5
    train_px = _unit_uint8(ds, ds.train.images).permute(0, 2, 3, 1).numpy()
    test_px = _unit_uint8(ds, ds.test.images).permute(0, 2, 3, 1).numpy()
    assert not set(_row_bytes(train_px)) & set(_row_bytes(test_px))
    assert _row_bytes(np.concatenate([train_px, test_px])) == _row_bytes(np.stack(arrays))
    again = dataset_from_hf(splits, "train-only", spec)  # the held-out part does not move
    assert torch.equal(again.test.images, ds.test.images)


def test_dataset_from_hf_resizes_odd_sizes_to_the_spec_size():
    images, _ = _images(6, [(37, 23), (32, 32), (64, 64), (5, 50), (33, 31), (32, 16)])
    splits = {"train": _hf_split(images[:4], [0, 1, 0, 1], "ab"),
              "test": _hf_split(images[4:], [0, 1], "ab")}
    ds = dataset_from_hf(splits, "odd", HubSpec("someone/odd", 32))
    assert ds.train.images.shape == (4, 3, 32, 32)
    assert ds.test.images.shape == (2, 3, 32, 32)
    # A same-size image passes through untouched.
    assert torch.equal(_unit_uint8(ds, ds.train.images[1:2]), _chw([np.asarray(images[1])]))


def test_dataset_from_hf_turns_grayscale_into_rgb():
    images, arrays = _images(4, (32, 32), gray=True)
    splits = {"train": _hf_split(images, [0, 1, 0, 1], "ab"), "test": _hf_split(images[:2], [0, 1], "ab")}
    ds = dataset_from_hf(splits, "gray", HUB_DATASETS["cifar10"])
    assert ds.channels == 3
    pixels = _unit_uint8(ds, ds.train.images)
    for c in range(3):
        assert torch.equal(pixels[:, c], torch.from_numpy(np.stack(arrays)))


@pytest.mark.parametrize(
    "columns, missing, found",
    [(("img", "target"), "label", "target"), (("picture", "label"), "image", "picture")],
)
def test_dataset_from_hf_missing_column_is_a_clear_error(columns, missing, found):
    image_col, label_col = columns
    images, _ = _images(4, (32, 32))
    splits = {"train": _hf_split(images, [0, 1, 0, 1], "ab", image_col, label_col)}
    with pytest.raises(DatasetUnavailable) as err:
        dataset_from_hf(splits, "odd", HubSpec("someone/odd-columns", 32))
    message = str(err.value)
    assert "someone/odd-columns" in message
    assert f"no {missing} column" in message
    assert found in message  # what the dataset has instead
    assert ("fine_label" in message) if missing == "label" else ("img" in message)


def test_dataset_from_hf_without_train_split_is_a_clear_error():
    images, _ = _images(2, (32, 32))
    with pytest.raises(DatasetUnavailable, match="no 'train' split.*test"):
        dataset_from_hf({"test": _hf_split(images, [0, 1], "ab")}, "x", HubSpec("someone/x", 32))


# --- subsample -------------------------------------------------------------------------------------

def _labelled(counts: list[int]) -> Split:
    labels = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
    images = torch.arange(len(labels), dtype=torch.float32).view(-1, 1, 1, 1)  # image i holds value i
    return Split(images, labels)


def test_subsample_keeps_class_proportions():
    ds = ImageDataset(name="skewed", train=_labelled([100, 300, 600]), test=_labelled([20, 60, 120]),
                      class_names=("a", "b", "c"), mean=(0.0,), std=(1.0,), allow_flip=False, source="test")
    cut = subsample(ds, 100, 20)
    assert cut.train.labels.bincount().tolist() == [10, 30, 60]
    assert cut.test.labels.bincount().tolist() == [2, 6, 12]
    # Images stay with their labels, and each is used once.
    kept = cut.train.images.flatten().long()
    assert torch.equal(ds.train.labels[kept], cut.train.labels)
    assert len(set(kept.tolist())) == 100
    assert torch.equal(subsample(ds, 100, 20).train.images, cut.train.images)  # fixed for a size
    # No cap, or a cap above the size, leaves a split alone.
    assert subsample(ds, None, None) is ds
    assert subsample(ds, 5000, None).train is ds.train


def test_tiny_preset_subsample_of_mnist_is_stratified(tiny_data, mnist5k):
    assert tiny_data.train.labels.bincount(minlength=10).tolist() == [60] * 10
    assert tiny_data.test.labels.bincount(minlength=10).tolist() == [20] * 10
    assert tiny_data.mean == mnist5k.mean  # normalised with the full split's statistics


# --- the client partition: Dirichlet label skew or IID, checked as properties over many settings ---

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


def _reference_partition(labels, num_clients, alpha, num_classes, seed, min_samples, max_tries):
    """The split as fedmitr first drew it (client indices, or None when no draw worked): every run
    recorded so far used these splits, so a faster draw must give the same ones."""
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(labels == c) for c in range(num_classes)]
    for _ in range(max_tries):
        parts = [[] for _ in range(num_clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            share = rng.dirichlet(np.full(num_clients, alpha))
            cuts = (np.cumsum(share)[:-1] * len(idx)).astype(int)
            for k, chunk in enumerate(np.split(idx, cuts)):
                parts[k].append(chunk)
        shards = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in shards) >= min_samples:
            return shards
    return None


@pytest.mark.parametrize("which", ["mnist", "skewed"])
def test_partition_draws_the_same_splits_as_before(which, mnist_labels):
    labels = _labels(which, mnist_labels)
    num_classes = int(labels.max()) + 1
    for k, alpha, seed, min_samples in [(2, 0.1, 0, 10), (5, 0.5, 1, 20), (10, 0.1, 2, 10), (20, 0.3, 4, 10),
                                        (7, 100.0, 5, 10), (4, 0.05, 6, 1), (10, 0.05, 7, 30), (20, 0.01, 8, 10)]:
        expected = _reference_partition(labels, k, alpha, num_classes, seed, min_samples, max_tries=100)
        try:
            got = partition(labels, k, alpha, num_classes, seed=seed, min_samples=min_samples, max_tries=100)
        except ConfigError:
            assert expected is None, (k, alpha, seed, min_samples)
            continue
        assert expected is not None and len(got.client_indices) == k
        assert all(np.array_equal(a, b) for a, b in zip(got.client_indices, expected)), (k, alpha, seed, min_samples)


def test_an_impossible_split_is_refused_after_max_tries_cheap_draws(mnist_labels, monkeypatch):
    """20 clients at alpha 0.001 (each class goes to about one client): every draw is rejected, each
    from the clients' sizes alone; no shard is built (building them every draw took seconds)."""
    import fedmitr.partition as split_module

    dirichlet_calls, shard_builds = [], []
    real_rng, real_split = np.random.default_rng, np.split

    class CountingRng:
        def __init__(self, seed):
            self.rng = real_rng(seed)

        def dirichlet(self, *args, **kwargs):
            dirichlet_calls.append(1)
            return self.rng.dirichlet(*args, **kwargs)

        def __getattr__(self, name):
            return getattr(self.rng, name)

    monkeypatch.setattr(split_module.np.random, "default_rng", CountingRng)
    monkeypatch.setattr(split_module.np, "split", lambda *a, **k: shard_builds.append(1) or real_split(*a, **k))
    start = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        partition(mnist_labels, 20, 0.001, 10, seed=0, min_samples=20, max_tries=1000)
    seconds = time.perf_counter() - start
    assert len(dirichlet_calls) == 1000 * 10  # 1000 draws of 10 classes, then it stops
    assert shard_builds == []
    message = str(err.value)
    assert message.startswith("could not give each of 20 clients at least 20 samples at alpha=0.001 in 1000 draws")
    best = int(re.search(r"gave that many to (\d+) of them", message).group(1))
    assert 1 <= best < 20 and "fewer clients, a larger alpha, 'iid'" in message
    assert seconds < 10  # generous; about 0.1 s on an idle core (the count above is the real check)


@pytest.mark.parametrize("name", ["mnist5k", "mnist-canvas", "digits"])
def test_bundled_train_labels_are_the_loaded_ones_without_the_images(name, mnist5k):
    """The command line checks a split from these labels before it loads torch: they must be exactly
    the labels the run partitions (after max_train_samples, and on the validation view)."""
    ds = mnist5k if name == "mnist5k" else open_dataset(name)
    for max_train, validation in [(None, False), (600, False), (None, True), (600, True)]:
        expected = subsample(ds, max_train, None)
        expected = validation_view(expected) if validation else expected
        labels, num_classes = bundled_train_labels(name, max_train, validation=validation)
        assert num_classes == ds.num_classes
        assert np.array_equal(labels, expected.train.labels.numpy()), (max_train, validation)


def test_check_split_refuses_what_the_run_would_refuse_and_agrees_on_what_it_accepts(mnist5k):
    cfg = config_from_knobs({"preset": "tiny", "clients": 4, "alpha": "0.3", "seed": 2})
    drawn = check_split(cfg)
    ds = subsample(mnist5k, cfg.data.max_train_samples, cfg.data.max_test_samples)
    run_split = partition(ds.train.labels.numpy(), 4, 0.3, 10, seed=2, min_samples=cfg.data.min_client_samples)
    assert all(np.array_equal(a, b) for a, b in zip(drawn.client_indices, run_split.client_indices))
    with pytest.raises(ConfigError, match="could not give each of 20 clients"):
        check_split(config_from_knobs({"preset": "tiny", "clients": 20, "alpha": "0.001"}))
    assert check_split(config_from_knobs({"preset": "tiny", "dataset": "cifar10"})) is None  # labels come with it


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
