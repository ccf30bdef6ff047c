"""The Run form as data: one definition of its fields, and form values -> a checked RunConfig.

:class:`FormValues` lists the form's inputs once, in order: the page builds its components from
it, the run endpoint takes its values in that order (and names them, over the API), and the tests
submit them through it. The form keeps only UI rules (whole numbers in the number boxes, the
slider's range, the app's caps); every other check and its message come from
:meth:`fedmitr.config.RunConfig.validate`, so the CLI and the app can never disagree.

Everything here is plain Python (no Gradio). Only :func:`hub_reachable` touches the network, and
only for a run that needs the Hub. Errors are :class:`fedmitr.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

from fedmitr.config import RunConfig, apply_overrides, preset_config
from fedmitr.data import BUNDLED, HUB_DATASETS
from fedmitr.errors import ConfigError, excerpt
from fedmitr.methods import METHODS

MIN_CLIENTS, MAX_CLIENTS = 2, 20
# Caps of the app (the library has none): a run on a shared machine must stay stoppable within a
# few seconds, and one inversion step on this many images takes about a second on 2 CPU cores.
MAX_IMAGES_PER_ROUND = 2_000

RELABEL_HELP = {
    "token": "token: each client's classifier on its own patch token (Token Labeling)",
    "image": "image: the ensemble's soft label of the whole image",
    "neighbourhood": "neighbourhood: the ensemble's prediction on the patch's 3x3 neighbourhood",
}
BUNDLED_HELP = {  # kept short: the label must fit the dropdown
    "mnist5k": "5k MNIST, offline",
    "mnist-canvas": "MNIST on a 56px canvas, offline",
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


@dataclass(frozen=True)
class FormValues:
    """The Run form's values, one field per input, in the order of the inputs.

    Defaults are the cpu preset's. Number boxes and sliders send floats; :meth:`to_config` accepts
    only whole values for the integer fields.
    """

    dataset: str = "mnist5k"  # registry name or hf:owner/name
    clients: Any = 5  # K, MIN_CLIENTS..MAX_CLIENTS
    alpha: Any = "0.5"  # Dirichlet skew: a number > 0, or "iid"
    methods: Any = ("fedavg", "ensemble", "fedmitr")  # methods to run
    preset: str = "cpu"  # the preset the knobs below override
    epochs: Any = 40  # local epochs per client
    iterations: Any = 80  # inversion iterations per synthetic batch
    images: Any = 100  # synthetic images per round
    keep: Any = 0.8  # fraction of still-active patches kept at each stop
    relabel: str = "neighbourhood"  # low-density relabel mode
    rounds: Any = 5  # synthesis + distillation rounds
    seed: Any = 0

    @classmethod
    def names(cls) -> list[str]:
        """The field names, in input order."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_inputs(cls, values: Sequence[Any]) -> "FormValues":
        """From the values of the inputs, in :meth:`names` order."""
        if len(values) != len(cls.names()):
            raise ConfigError(f"the run form has {len(cls.names())} inputs ({', '.join(cls.names())}); "
                              f"got {len(values)} values")
        return cls(*values)

    @classmethod
    def for_preset(cls, preset: str, **changes: Any) -> "FormValues":
        """The form showing ``preset``'s knobs (the Advanced section follows the chosen preset)."""
        cfg = preset_config(preset)
        base = cls(preset=preset, epochs=cfg.clients.epochs, iterations=cfg.inversion.iterations,
                   images=cfg.inversion.images_per_round, keep=cfg.inversion.keep_per_stop,
                   relabel=cfg.relabel.mode, rounds=cfg.distill.rounds, seed=cfg.seed)
        return dataclasses.replace(base, **changes)

    def inputs(self) -> list[Any]:
        """The values in input order (what the run endpoint takes positionally)."""
        return [getattr(self, name) for name in self.names()]

    def to_config(self) -> RunConfig:
        """The preset with the form's values overriding it, validated by the library."""
        if self.alpha is None:
            raise ConfigError("the skew α is required: a number > 0, or 'iid' for an unskewed split")
        methods = self.methods
        if isinstance(methods, str):
            methods = [m.strip() for m in methods.split(",") if m.strip()]
        overrides = {
            "seed": _whole("seed", self.seed, 0),
            "methods": tuple(dict.fromkeys(methods or [])),
            "data": {"dataset": (self.dataset or "").strip(),
                     "num_clients": _whole("number of clients", self.clients, MIN_CLIENTS, MAX_CLIENTS),
                     "alpha": self.alpha.strip() if isinstance(self.alpha, str) else self.alpha},
            "clients": {"epochs": _whole("local epochs", self.epochs, 1, 1000)},
            "inversion": {"iterations": _whole("inversion iterations", self.iterations, 1, 100_000),
                          "images_per_round": _whole("synthetic images per round", self.images, 1,
                                                     MAX_IMAGES_PER_ROUND),
                          "keep_per_stop": _number("keep ratio", self.keep)},
            "relabel": {"mode": self.relabel},
            "distill": {"rounds": _whole("rounds", self.rounds, 1, 1000)},
        }
        return apply_overrides(preset_config(self.preset), overrides).validate()


def with_form_parameters(fn: Callable) -> Callable:
    """Name the form's fields in the signature of ``fn(<special parameters>, *values)``.

    Gradio passes an event's input values positionally after the parameters it fills itself
    (``gr.Request``, ``gr.Progress``); with this signature its API lists each input by its field
    name, so an API client can call ``/run`` with ``dataset=..., alpha=...``.
    """
    sig = inspect.signature(fn)
    special = [p for p in sig.parameters.values() if p.kind is not p.VAR_POSITIONAL]
    fields = [inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default)
              for f in dataclasses.fields(FormValues)]
    fn.__signature__ = sig.replace(parameters=special + fields)
    return fn


def _whole(name: str, value: Any, low: int, high: int | None = None) -> int:
    """An integer form value (number boxes and sliders send floats) within [low, high]."""
    number = _number(name, value)
    if not number.is_integer():
        raise ConfigError(f"{name} must be a whole number (got {number:g})")
    out = int(number)
    if out < low or (high is not None and out > high):
        allowed = f"{low} to {high}" if high is not None else f">= {low}"
        raise ConfigError(f"{name} must be {allowed} (got {out})")
    return out


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{name} must be a number (got a yes/no value)")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number (got {type(value).__name__})") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(f"{name} must be a finite number")
    return number


# --- the Hub ---------------------------------------------------------------------------------------

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
        needs.append(f"the dataset {excerpt(cfg.data.dataset)}")
    if cfg.model.pretrained:
        needs.append(f"the pretrained weights of {excerpt(cfg.model.arch)}")
    return needs


def check_hub(cfg: RunConfig, reachable: Callable[[], bool] = hub_reachable) -> None:
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
    return list(FormValues().methods)


def method_choices() -> list[str]:
    return list(METHODS)
