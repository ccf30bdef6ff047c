"""The user-facing knobs: one table from a knob's name to a config field, with its parsing.

The command line (``--clients 5``), the app's form (a slider sends ``5.0``) and the Flower app's
run config (``num-clients=5``) all turn user values into a :class:`~fedmitr.config.RunConfig`
through :func:`config_from_knobs`, so they accept the same values and refuse bad ones with the
same message. A refused knob is a :class:`~fedmitr.errors.SettingError` that knows which knob it
was, also when the config's own check refused it, so each front end can name the knob as its user
wrote it (the command line: ``--keep must be in (0, 1] (got 1.5)``). :func:`knob_values` reads a
config back into knob values (the form's defaults are its preset's).

No torch here: the command line checks its arguments without loading it.
"""

from __future__ import annotations

import math
from dataclasses import KW_ONLY, dataclass
from typing import Any, Mapping

from fedmitr.config import RunConfig, apply_overrides, parse_alpha, preset_config
from fedmitr.errors import ConfigError, SettingError, excerpt
from fedmitr.methods import check_config, parse_methods

KINDS = ("int", "float", "alpha", "methods", "str")


@dataclass(frozen=True)
class Knob:
    name: str  # the user's word for it: the CLI flag (--name), the form field, the Flower key
    field: str | None  # dotted config field it sets, e.g. "data.num_clients" (None: the preset itself)
    kind: str  # one of KINDS: how a string, a float from a slider or an int is read
    help: str  # one line for --help and the app
    _: KW_ONLY
    minimum: float | None = None  # smallest allowed value (numbers)
    flower: str | None = None  # the Flower run-config key, when it differs from ``name``

    def parse(self, value: Any) -> Any:
        """``value`` as the config field's type; a :class:`SettingError` naming the knob otherwise."""
        if self.kind == "int":
            return _whole(self, value)
        if self.kind == "float":
            number = _number(self, value)
            if self.minimum is not None and number < self.minimum:
                raise self.refuse(f"must be >= {self.minimum:g} (got {number:g})")
            return number
        if self.kind == "alpha":
            if value is None:
                raise self.refuse("is required: a number > 0, or 'iid' for an unskewed split")
            try:
                return parse_alpha(value.strip() if isinstance(value, str) else value)
            except ConfigError as err:
                raise self.refused_by(str(err)) from None
        if self.kind == "methods":
            if isinstance(value, str):
                try:
                    return parse_methods(value)
                except ConfigError as err:
                    raise self.refused_by(str(err)) from None
            if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
                return tuple(dict.fromkeys(v.strip() for v in value if v.strip()))
            raise self.refuse(f"must be a comma-separated list of names (got {excerpt(value)})")
        if not isinstance(value, str):
            raise self.refuse(f"must be text (got {excerpt(value)})")
        return value.strip()

    def refuse(self, problem: str) -> SettingError:
        """The error "<knob> <problem>", e.g. refuse("must be >= 1 (got 0)")."""
        return SettingError(self.name, problem, f"{self.name} {problem}")

    def refused_by(self, message: str) -> SettingError:
        """The library's ``message`` about this knob's value (from the config's check or a parser,
        which name the config field: "keep_per_stop must be ...") as an error about the knob."""
        words = self.field_words() + (self.name,)
        for said in sorted(words, key=len, reverse=True):  # "relabel mode" before "relabel"
            if message.startswith(said + " "):
                return SettingError(self.name, message[len(said) + 1:], message)
        return SettingError(self.name, None, message)

    def field_words(self) -> tuple[str, ...]:
        """How the config's messages name this knob's field: "keep_per_stop", "relabel mode"."""
        if self.field is None:
            return ()
        parts = self.field.split(".")
        return (parts[-1], " ".join(parts)) if len(parts) > 1 else (parts[-1],)


KNOBS: dict[str, Knob] = {k.name: k for k in (
    Knob("preset", None, "str", "starting config, a preset"),
    Knob("dataset", "data.dataset", "str", "dataset: a bundled name or hf:owner/name"),
    Knob("clients", "data.num_clients", "int", "number of clients K, >= 2", minimum=2, flower="num-clients"),
    Knob("alpha", "data.alpha", "alpha", "Dirichlet label skew, a number > 0 (0.1 extreme, 0.5 moderate), or 'iid'"),
    Knob("methods", "methods", "methods", "comma-separated methods to run"),
    Knob("seed", "seed", "int", "integer seed for split, models and synthesis", minimum=0),
    Knob("epochs", "clients.epochs", "int", "local training epochs per client", minimum=1),
    Knob("iterations", "inversion.iterations", "int", "inversion iterations per synthetic batch", minimum=1),
    Knob("images", "inversion.images_per_round", "int", "synthetic images per round", minimum=1),
    Knob("keep", "inversion.keep_per_stop", "float", "share of still-active patches kept at each stop (0, 1]"),
    Knob("relabel", "relabel.mode", "str", "relabel of low-information patches: token, image or neighbourhood"),
    Knob("stopped", "relabel.stopped", "str", "what a stopped patch teaches: image (its image's soft label), blank "
                                              "(the background's label), uniform or ignore (nothing)"),
    Knob("vote", "distill.vote", "float", "Token Labeling's vote: predict with cls + VOTE x max over patch tokens of "
                                          "the aux head, in [0, 10] (0: the class token alone)", minimum=0),
    Knob("mixtoken", "distill.mixtoken", "float", "MixToken: probability that a distillation step swaps a box of "
                                                  "patches between two images, in [0, 1] (0: off)", minimum=0),
    Knob("rounds", "distill.rounds", "int", "synthesis + distillation rounds", minimum=1),
    Knob("init", "model.init", "str", "where the clients start: scratch, fractal (a backbone pretrained on drawn "
                                      "fractals, bundled for the cpu and cpu-49 models) or a `fedmitr pretrain` file"),
)}


def config_from_knobs(values: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """``base`` (default: the preset named by ``values["preset"]``, else ``cpu``) with every knob in
    ``values`` applied, validated. Pass only the knobs that were set (None is refused as a value)."""
    unknown = [k for k in values if k not in KNOBS]
    if unknown:
        raise ConfigError(f"unknown setting(s) {', '.join(excerpt(k) for k in unknown[:3])}; known: {', '.join(KNOBS)}")
    if base is None:
        base = preset_config(KNOBS["preset"].parse(values.get("preset") or "cpu"))
    overrides: dict[str, Any] = {}
    for name, value in values.items():
        knob = KNOBS[name]
        if knob.field is None:
            continue
        *parents, leaf = knob.field.split(".")
        target = overrides
        for part in parents:
            target = target.setdefault(part, {})
        parsed = knob.parse(value)
        target[leaf] = "iid" if knob.kind == "alpha" and parsed is None else parsed
    cfg = apply_overrides(base, overrides)
    try:
        return check_config(cfg)
    except ConfigError as err:
        # The config's check names its fields; a field a knob set is the knob's error.
        for name in values:
            knob = KNOBS[name]
            if any(str(err).startswith(said + " ") for said in knob.field_words()):
                raise knob.refused_by(str(err)) from None
        raise


def knob_values(cfg: RunConfig) -> dict[str, Any]:
    """The knobs' values in ``cfg`` (alpha as text: a number or "iid"; methods as a list)."""
    out: dict[str, Any] = {"preset": cfg.preset}
    for name, knob in KNOBS.items():
        if knob.field is None:
            continue
        value: Any = cfg
        for part in knob.field.split("."):
            value = getattr(value, part)
        if knob.kind == "alpha":
            value = "iid" if value is None else f"{value:g}"
        elif knob.kind == "methods":
            value = list(value)
        out[name] = value
    return out


def _number(knob: Knob, value: Any) -> float:
    if isinstance(value, bool):
        raise knob.refuse("must be a number (got a yes/no value)")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError):
        raise knob.refuse(f"must be a number (got {excerpt(value)})") from None
    if not math.isfinite(number):
        raise knob.refuse(f"must be a finite number (got {excerpt(value)})")
    return number


def _whole(knob: Knob, value: Any) -> int:
    """A whole number from an int, a whole float (sliders send floats) or a string of digits."""
    number = _number(knob, value)
    minimum = knob.minimum
    at_least = f" >= {minimum:g}" if minimum is not None else ""
    if not number.is_integer():
        raise knob.refuse(f"must be a whole number{at_least} (got {number:g})")
    if minimum is not None and number < minimum:
        raise knob.refuse(f"must be a whole number{at_least} (got {int(number)})")
    return int(number)
