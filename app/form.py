"""The Run form as data: one definition of its fields, and form values -> a checked RunConfig.

:class:`FormValues` lists the form's inputs once, in order: the page builds its components from
it, the run endpoint takes its values in that order (and names them, over the API), and the tests
submit them through it. Each field is a knob of :data:`fedmitr.knobs.KNOBS`, parsed by the library
exactly as the command line and the Flower app parse it, with the same messages. The form adds only
the app's caps (a shared machine must stay stoppable within seconds); its defaults are the cpu
preset's.

Everything here is plain Python (no Gradio). Only :func:`fedmitr.hub.hub_reachable` touches the
network, and only for a run that needs the Hub. Errors are :class:`fedmitr.errors.ConfigError`.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from fedmitr.catalog import BUNDLED, HUB_DATASETS, is_hub_dataset
from fedmitr.config import RunConfig, preset_config
from fedmitr.errors import ConfigError, excerpt
from fedmitr.hub import hub_offline, hub_reachable
from fedmitr.knobs import KNOBS, config_from_knobs, knob_values

__all__ = ["FormValues", "APP_CAPS", "main_methods", "more_methods", "HIGH_TOKEN_PRESET", "HIGH_TOKEN_METHODS", "high_token_settings", "SKEW_CHOICES", "RELABEL_HELP", "with_form_parameters", "check_hub",
           "hub_offline", "hub_reachable", "needs_hub", "is_hub_dataset", "dataset_choices"]

# The app's caps (the library has none): a run on a shared machine must stay stoppable within a
# few seconds, and one inversion step on 2,000 images takes about a second on 2 CPU cores.
APP_CAPS = {"clients": 20, "images": 2_000, "epochs": 1_000, "iterations": 100_000, "rounds": 1_000}
MIN_CLIENTS, MAX_CLIENTS = int(KNOBS["clients"].minimum or 2), APP_CAPS["clients"]
MAX_IMAGES_PER_ROUND = APP_CAPS["images"]

RELABEL_HELP = {
    "token": "token: each client's classifier on its own patch token (Token Labeling)",
    "image": "image: the ensemble's soft label of the whole image",
    "neighbourhood": "neighbourhood: the ensemble's prediction on the patch's 3x3 neighbourhood",
}
INIT_CHOICES = [("from scratch", "scratch"), ("pretrained on drawn fractals (offline)", "fractal")]
SKEW_CHOICES = [
    ("iid: no skew", "iid"),
    ("10: mild skew", "10"),
    ("1.0: some skew", "1.0"),
    ("0.5: moderate skew", "0.5"),
    ("0.1: extreme skew", "0.1"),
    ("0.05: very extreme skew", "0.05"),
]


# The "49 tokens per image" switch: the preset it picks, and the methods it runs there: the
# references, the baseline, and FedMITR (whose default, H = the top 20% with the relabel at work,
# is also what the results recommend on 49 tokens). Change the list here; nothing else names a method.
HIGH_TOKEN_PRESET = "cpu-49"
HIGH_TOKEN_METHODS = ("fedavg", "ensemble", "dense-kd", "fedmitr")
DEFAULT_PRESET = "cpu"  # what the form starts with, and what the switch turned off restores


def main_methods() -> list[str]:
    """The methods the form lists up front: the method, the references and the default run's
    baselines (FedAvg, dense-kd). Everything else is under Advanced (:func:`more_methods`)."""
    from fedmitr.config import DEFAULT_METHODS
    from fedmitr.methods import METHODS

    return [n for n, m in METHODS.items() if m.role in ("method", "reference") or n in DEFAULT_METHODS]


def more_methods() -> list[str]:
    """The methods under Advanced: the paper's other baselines (DENSE, Co-Boosting), which cost
    several times FedMITR's server time and are opt-in, and the ablations."""
    from fedmitr.methods import METHODS

    main = main_methods()
    return [n for n in METHODS if n not in main]


def _names(value: Any, field: str) -> list[str]:
    """A method list as the form or the API sends it: a list of names, a comma-separated string, or nothing."""
    if value is None:
        return []
    if isinstance(value, str):
        from fedmitr.methods import parse_methods

        return list(parse_methods(value))
    if isinstance(value, (list, tuple)) and all(isinstance(m, str) for m in value):
        return list(value)
    raise ConfigError(f"{field} must be a list of method names or a comma-separated string (got {excerpt(value)})")


@dataclass(frozen=True, kw_only=True)
class FormValues:
    """The Run form's values, one field per input, in the order of the inputs; each field is the
    knob of the same name (:data:`fedmitr.knobs.KNOBS`). Number boxes and sliders send floats."""

    dataset: Any  # registry name or hf:owner/name
    clients: Any  # K, 2..APP_CAPS["clients"]
    alpha: Any  # Dirichlet skew: a number > 0, or "iid"
    methods: Any  # methods to run
    preset: Any  # the preset the knobs below override
    epochs: Any  # local epochs per client
    iterations: Any  # inversion iterations per synthetic batch
    images: Any  # synthetic images per round
    keep: Any  # fraction of still-active patches kept at each stop
    relabel: Any  # low-density relabel mode
    rounds: Any  # synthesis + distillation rounds
    seed: Any
    init: Any  # where the clients start: "scratch" or "fractal" (a backbone pretrained on drawn fractals)
    # More methods, listed under Advanced (the paper's other baselines and the ablations); the run
    # takes ``methods`` and these together, so either field accepts any registered method.
    more_methods: Any = ()

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
        return cls(**dict(zip(cls.names(), values)))

    @classmethod
    def for_preset(cls, preset: str = "cpu", **changes: Any) -> "FormValues":
        """The form showing ``preset``'s values (the Advanced section follows the chosen preset)."""
        values = knob_values(preset_config(preset))
        main = main_methods()
        values["more_methods"] = [m for m in values["methods"] if m not in main]
        values["methods"] = [m for m in values["methods"] if m in main]
        return dataclasses.replace(cls(**{name: values[name] for name in cls.names()}), **changes)

    def inputs(self) -> list[Any]:
        """The values in input order (what the run endpoint takes positionally)."""
        return [getattr(self, name) for name in self.names()]

    def to_config(self) -> RunConfig:
        """The preset with the form's values overriding it, checked by the library, within the app's caps."""
        values = dataclasses.asdict(self)
        # One list of methods for the library, in the form's order: the main list, then Advanced's.
        more = _names(values.pop("more_methods"), "more_methods")
        if more:
            values["methods"] = _names(values["methods"], "methods") + more
        for name, cap in APP_CAPS.items():
            number = KNOBS[name].parse(values[name])
            if number > cap:
                raise ConfigError(f"{name} must be at most {cap:,} in this app (got {number:,}); the command line "
                                  f"has no such cap")
        return config_from_knobs(values)


def high_token_settings(on: bool) -> tuple[str, list[str]]:
    """(preset, methods) of the 49-token switch: on, :data:`HIGH_TOKEN_PRESET` with
    :data:`HIGH_TOKEN_METHODS`; off, the form's 16-token defaults. A method in the list that is not
    registered is an error that names it."""
    from fedmitr.methods import METHODS

    if not on:
        return DEFAULT_PRESET, list(FormValues.for_preset(DEFAULT_PRESET).methods)
    unknown = [m for m in HIGH_TOKEN_METHODS if m not in METHODS]
    if unknown:
        raise ConfigError(f"the 49-token switch names methods that are not registered: {', '.join(unknown)} "
                          f"(registered: {', '.join(METHODS)}); fix app/form.py's HIGH_TOKEN_METHODS")
    return HIGH_TOKEN_PRESET, list(HIGH_TOKEN_METHODS)


def with_form_parameters(fn: Callable) -> Callable:
    """Name the form's fields in the signature of ``fn(<special parameters>, *values)``.

    Gradio passes an event's input values positionally after the parameters it fills itself
    (``gr.Request``, ``gr.Progress``); with this signature its API lists each input by its field
    name (defaults: the cpu preset's), so an API client can call ``/run`` with ``dataset=..., alpha=...``.
    """
    sig = inspect.signature(fn)
    special = [p for p in sig.parameters.values() if p.kind is not p.VAR_POSITIONAL]
    defaults = FormValues.for_preset(DEFAULT_PRESET)
    fields = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=getattr(defaults, name))
              for name in FormValues.names()]
    fn.__signature__ = sig.replace(parameters=special + fields)
    return fn


# --- the Hub ---------------------------------------------------------------------------------------

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


def dataset_choices() -> list[tuple[str, str]]:
    """(label, value) pairs: bundled sets first, then Hub sets marked as needing the network."""
    choices = [(f"{name} · {about}", name) for name, about in BUNDLED.items()]
    suffix = "Hub, offline now" if hub_offline() else "Hub, needs internet"
    choices += [(f"{name} · {suffix}", name) for name in HUB_DATASETS]
    return choices
