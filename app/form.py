"""The app's controls as data: dataset choices, preset knobs, and form values -> a checked RunConfig.

Everything here is plain Python (no Gradio), so the rules the UI enforces can be tested directly.
Only :func:`hub_reachable` touches the network, and only for a run that needs the Hub.
Errors are :class:`fedmitr.config.ConfigError` with a message for the person at the keyboard.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from fedmitr.config import ConfigError, PRESETS, RunConfig, apply_overrides, parse_alpha, preset_config
from fedmitr.data import BUNDLED, HUB_DATASETS
from fedmitr.methods import METHODS
from fedmitr.relabel import RELABEL_MODES

MIN_CLIENTS, MAX_CLIENTS = 2, 20

RELABEL_HELP = {
    "token": "token: each client's classifier on its own patch token (Token Labeling)",
    "image": "image: the ensemble's soft label of the whole image",
    "neighbourhood": "neighbourhood: the ensemble's prediction on the patch's 3x3 neighbourhood",
}
BUNDLED_HELP = {  # kept short: the label must fit the dropdown
    "mnist5k": "5k MNIST, offline",
    "digits": "sklearn 8x8, offline",
}
SKEW_CHOICES = [
    ("iid: no skew", "iid"),
    ("10: mild skew", "10"),
    ("1.0: some skew", "1.0"),
    ("0.5: moderate skew", "0.5"),
    ("0.1: extreme skew", "0.1"),
    ("0.05: very extreme skew", "0.05"),
]


def hub_offline() -> bool:
    """True when the environment forbids the Hugging Face Hub (checked without touching the network)."""
    flags = (os.environ.get("HF_HUB_OFFLINE", ""), os.environ.get("HF_DATASETS_OFFLINE", ""))
    return any(f.strip().lower() in ("1", "true", "yes", "on") for f in flags)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within ``timeout_s``.

    Called only when a run needs the Hub, never at startup: without it an offline machine spends
    ~25 s in the Hub client's retries before it says so.
    """
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    try:
        with socket.create_connection((host.hostname, host.port or 443), timeout=timeout_s):
            return True
    except OSError:
        return False


def needs_hub(cfg: RunConfig) -> list[str]:
    """What of ``cfg`` must come from the Hugging Face Hub (empty for the bundled, offline setups)."""
    needs = []
    if is_hub_dataset(cfg.data.dataset):
        needs.append(f"the dataset {cfg.data.dataset!r}")
    if cfg.model.pretrained:
        needs.append(f"the pretrained weights of {cfg.model.arch!r}")
    return needs


def check_hub(cfg: RunConfig, reachable=hub_reachable) -> None:
    """Refuse a run that needs the Hub when it cannot be had, with what to do instead."""
    needs = needs_hub(cfg)
    if not needs:
        return
    what = " and ".join(needs)
    fix = f"Choose a bundled dataset ({', '.join(BUNDLED)}) and the cpu or tiny preset, which work offline."
    if hub_offline():
        raise ConfigError(f"{what} must come from the Hugging Face Hub, but this app runs offline "
                          f"(HF_HUB_OFFLINE is set). {fix}")
    if not reachable():
        raise ConfigError(f"{what} must come from the Hugging Face Hub, which this machine cannot reach right "
                          f"now. {fix} (A copy already in the local cache is used with HF_HUB_OFFLINE=1.)")


def is_hub_dataset(name: str) -> bool:
    return name in HUB_DATASETS or name.startswith("hf:")


def dataset_choices() -> list[tuple[str, str]]:
    """(label, value) pairs: bundled sets first, then Hub sets marked as needing the network."""
    choices = [(f"{name} · {BUNDLED_HELP.get(name, 'bundled')}", name) for name in BUNDLED]
    suffix = "Hub, offline now" if hub_offline() else "Hub, needs internet"
    choices += [(f"{name} · {suffix}", name) for name in HUB_DATASETS]
    return choices


def default_methods() -> list[str]:
    return [m for m in ("fedavg", "ensemble", "fedmitr") if m in METHODS]


@dataclass(frozen=True)
class Knobs:
    """The Advanced section: the main knobs of a preset, shown and overridable in the UI."""

    epochs: int  # local epochs per client
    iterations: int  # inversion iterations per synthetic batch
    images: int  # synthetic images per round
    keep: float  # fraction of still-active patches kept at each stop
    relabel: str  # low-density relabel mode
    rounds: int  # synthesis + distillation rounds
    seed: int


def preset_knobs(preset: str) -> Knobs:
    cfg = preset_config(preset)
    return Knobs(cfg.clients.epochs, cfg.inversion.iterations, cfg.inversion.images_per_round,
                 cfg.inversion.keep_per_stop, cfg.relabel.mode, cfg.distill.rounds, cfg.seed)


def _whole(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An integer form value (sliders and number boxes send floats) within [low, high]."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a whole number (got {value!r})") from None
    if not number.is_integer():
        raise ConfigError(f"{name} must be a whole number (got {value!r})")
    out = int(number)
    if out < low or (high is not None and out > high):
        allowed = f"{low} to {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be {allowed} (got {out})")
    return out


def build_config(dataset: str, clients: Any, alpha: Any, methods: Any, preset: str, epochs: Any,
                 iterations: Any, images: Any, keep: Any, relabel: str, rounds: Any, seed: Any) -> RunConfig:
    """Form values -> a validated :class:`RunConfig` (the preset, with the form's values overriding it).

    Checks what can be checked without loading data. A Hub dataset while offline is refused here.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(PRESETS)}")
    dataset = (dataset or "").strip()
    if not dataset:
        raise ConfigError("choose a dataset")
    if dataset not in BUNDLED and not is_hub_dataset(dataset):
        raise ConfigError(f"unknown dataset {dataset!r}; bundled (offline): {', '.join(BUNDLED)}; "
                          f"from the Hub: {', '.join(HUB_DATASETS)}, or hf:owner/name")
    num_clients = _whole("number of clients", clients, MIN_CLIENTS, MAX_CLIENTS)
    alpha_value = parse_alpha(alpha.strip() if isinstance(alpha, str) else alpha)
    if isinstance(methods, str):
        methods = [m.strip() for m in methods.split(",") if m.strip()]
    methods = list(dict.fromkeys(methods or []))
    if not methods:
        raise ConfigError(f"choose at least one method: {', '.join(METHODS)}")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; known: {', '.join(METHODS)}")
    try:
        keep_value = float(keep)
    except (TypeError, ValueError):
        raise ConfigError(f"keep ratio must be a number in (0, 1] (got {keep!r})") from None
    if not 0 < keep_value <= 1:
        raise ConfigError(f"keep ratio must be in (0, 1] (got {keep_value:g}): the share of active patches "
                          f"kept at each stop")
    if relabel not in RELABEL_MODES:
        raise ConfigError(f"relabel must be one of {', '.join(RELABEL_MODES)} (got {relabel!r})")
    overrides = {
        "seed": _whole("seed", seed, 0),
        "methods": tuple(methods),
        "data": {"dataset": dataset, "num_clients": num_clients, "alpha": alpha_value},
        "clients": {"epochs": _whole("local epochs", epochs, 1, 1000)},
        "inversion": {"iterations": _whole("inversion iterations", iterations, 1, 100_000),
                      "images_per_round": _whole("synthetic images per round", images, 1, 10_000),
                      "keep_per_stop": keep_value},
        "relabel": {"mode": relabel},
        "distill": {"rounds": _whole("rounds", rounds, 1, 1000)},
    }
    cfg = apply_overrides(preset_config(preset), overrides).validate()
    check_hub(cfg, reachable=lambda: True)  # offline by setting: refused here; unreachable: see check_hub
    return cfg
