"""The names of the datasets fedmitr can load, and how each is found; no loading, no torch.

The command line, the config check and the app list and check dataset names from here, so that
``fedmitr --help`` or a typo answers at once. :mod:`fedmitr.data` loads them.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedmitr.errors import ConfigError, excerpt

# Bundled, offline: name -> a few words for menus (the loaders are in fedmitr.data).
BUNDLED: dict[str, str] = {
    "mnist5k": "5k MNIST, offline",
    "mnist-canvas": "MNIST on a 56px canvas, offline",
    "digits": "sklearn 8x8, offline",
}


@dataclass(frozen=True)
class HubSpec:
    hub_id: str
    image_size: int  # images are resized (squashed) to this square size
    allow_flip: bool = True
    test_split: str | None = None  # None: the first of data.TEST_SPLITS present, else hold out 20%


HUB_DATASETS: dict[str, HubSpec] = {
    "cifar10": HubSpec("uoft-cs/cifar10", 32),
    "cifar100": HubSpec("uoft-cs/cifar100", 32),
    "tiny-imagenet": HubSpec("zh-plus/tiny-imagenet", 64, test_split="valid"),
    "mini-imagenet": HubSpec("timm/mini-imagenet", 64, test_split="validation"),
    "office-home": HubSpec("flwrlabs/office-home", 64),
}
DATASETS: tuple[str, ...] = (*BUNDLED, *HUB_DATASETS)


def hub_spec(name: str) -> HubSpec:
    """Where a Hub dataset comes from: its registry entry, or for ``hf:owner/name`` the repo at 64 px."""
    if name in HUB_DATASETS:
        return HUB_DATASETS[name]
    if name.startswith("hf:"):
        return HubSpec(name[3:], image_size=64)
    raise ConfigError(f"{excerpt(name)} is not a Hub dataset; those are {', '.join(HUB_DATASETS)} or hf:owner/name")


def is_hub_dataset(name: str) -> bool:
    """Whether ``name`` must come from the Hugging Face Hub (a registry name or ``hf:owner/name``)."""
    return name in HUB_DATASETS or name.startswith("hf:")


def check_dataset_name(name: str) -> None:
    """Refuse a name that is neither in the registry nor ``hf:owner/name``, without loading anything."""
    if not isinstance(name, str):
        raise ConfigError(f"dataset must be a name (got {type(name).__name__})")
    if name in BUNDLED or name in HUB_DATASETS:
        return
    if name.startswith("hf:"):
        owner, _, repo = name[3:].partition("/")
        if owner.strip() and repo.strip() and "/" not in repo and not any(c.isspace() for c in name):
            return
        raise ConfigError(f"a Hub dataset is written hf:owner/name, e.g. hf:uoft-cs/cifar10 "
                          f"(got {excerpt(name)}); bundled (offline): {', '.join(BUNDLED)}")
    raise ConfigError(
        f"unknown dataset {excerpt(name)}; bundled (offline): {', '.join(BUNDLED)}; "
        f"from the Hub: {', '.join(HUB_DATASETS)}, or hf:owner/name"
    )
