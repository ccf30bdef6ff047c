"""How long a run takes: the estimate before it starts, the time left while it runs.

Two pieces, both plain arithmetic (no Gradio, no clock of their own):

* :func:`stage_plan` scales a run recorded on this machine (the example's ``metrics.json``) to
  the settings chosen: the seconds each stage of the new run should take, in run order.
* :func:`remaining_seconds` turns that plan and what the run measured so far (the seconds of the
  finished stages, and the current stage's share of steps done after so many seconds) into the
  time left. The current stage is extrapolated from its own measured rate; the stages still to
  come take their planned seconds times how fast this machine turned out to be so far.

The run view (:class:`app.runview.RunView`) feeds them and the page only renders the numbers.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

# Seconds of evidence the machine's speed needs before it moves far from the plan's: a run that
# measured 2 s of work says little about the next 200.
PRIOR_SECONDS = 5.0
# The current stage is extrapolated from its own rate once this share of its steps is done; before
# that its plan (scaled by the machine's speed) still counts, fading out as the share grows.
TRUST_FRACTION = 0.15
# How a step's time follows its work (images x tokens x the model's cost per token), relative to a
# step of the recorded run: a share that does not change (Python, the optimiser, launching kernels)
# and the rest as work ** WORK_EXPONENT (bigger matrices run closer to the CPU's peak). Fitted on
# this kind of machine against the recorded 16-token run: the tiny preset's steps (clients 0.35x,
# inversion 0.2x of a step for 6x and 37x less work) and the benchmark's 49-token cells
# (assets/bench: clients 2.0x, FedMITR 1.7x-2.0x per step for 2.9x the tokens).
FIXED_SHARE = 0.15
WORK_EXPONENT = 0.7


def format_seconds(seconds: float) -> str:
    """``"45 s"``, ``"3 min 40 s"``, ``"1 h 05 min"``: rounded to what a person reads."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{int(round(seconds))} s"
    if seconds < 3600:
        minutes, rest = divmod(int(round(seconds)), 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(int(round(seconds / 60)), 60)
    return f"{hours} h {rest:02d} min"


def format_estimate(seconds: float) -> str:
    """An estimate, rounded so that it does not pretend to more precision than it has: to the
    second under ten seconds, to 5 s under two minutes, to 10 s under ten, to the minute above."""
    if seconds < 10:
        return format_seconds(max(1, round(seconds)))
    step = 5 if seconds < 120 else 10 if seconds < 600 else 60
    return format_seconds(round(seconds / step) * step)


# --- the plan ----------------------------------------------------------------------------------------

def _mean_tokens(inv: Any, grid: int, sparse: bool) -> float:
    """Tokens a forward pass of inversion processes on average over its iterations (the class
    token and the active patches): sparse inversion keeps ``keep_per_stop`` of the active patches
    at each of its ``stop_at`` fractions of the iterations."""
    patches = grid * grid
    if not sparse:
        return 1.0 + patches
    stops = sorted(float(s) for s in getattr(inv, "stop_at", ()) or ())
    keep = float(getattr(inv, "keep_per_stop", 1.0))
    active, before, mean = 1.0, 0.0, 0.0
    for stop in stops:
        mean += active * (min(stop, 1.0) - before)
        before, active = min(stop, 1.0), active * keep
    mean += active * (1.0 - before)
    return 1.0 + patches * mean


def _tokens(model: Any) -> int:
    """Tokens per image of a model config (the class token and the patches)."""
    grid = model.patch_grid if model.arch == "scratch" else 14  # the timm DeiTs: 224 px in 16 px patches
    return grid * grid + 1


def _width(model: Any, ref_model: Mapping[str, Any]) -> float:
    """How much more one token costs in ``model`` than in the recorded run's model."""
    dim = model.embed_dim if model.arch == "scratch" else 192
    depth = model.depth if model.arch == "scratch" else 12
    return (dim / ref_model["embed_dim"]) ** 2 * depth / ref_model["depth"]


@dataclass(frozen=True)
class RoundLayout:
    """How an inversion method's progress steps are laid out: ``rounds`` rounds of
    ``inversion_steps`` inversion iterations then ``distill_steps`` distillation steps, the
    inversion taking ``inversion_share`` of a round's time."""

    rounds: int
    inversion_steps: int
    distill_steps: int
    inversion_share: float

    def fraction(self, step: int, total: int) -> float:
        """The share of the stage's time done after ``step`` of ``total`` progress steps (steps of
        the two kinds cost differently); the plain ``step / total`` for another layout."""
        per_round = self.inversion_steps + self.distill_steps
        if total <= 0:
            return 0.0
        if total != self.rounds * per_round or per_round <= 0:
            return min(1.0, step / total)
        done_rounds, within = divmod(min(step, total), per_round)
        inv = min(within, self.inversion_steps) / max(1, self.inversion_steps)
        dist = max(0, within - self.inversion_steps) / max(1, self.distill_steps)
        share = self.inversion_share
        return (done_rounds + share * inv + (1 - share) * dist) / self.rounds


@dataclass(frozen=True)
class Plan:
    """Planned seconds of every stage, in run order, and the step layout of the inversion stages."""

    seconds: dict[str, float]
    layouts: dict[str, RoundLayout] = field(default_factory=dict)
    # The stages that run side by side (the methods in worker processes, fedmitr.side_by_side), and
    # how many at a time: 1 runs every stage one after another.
    parallel: frozenset[str] = frozenset()
    lanes: int = 1

    @property
    def total(self) -> float:
        return remaining_seconds(self.seconds, {}, parallel=self.parallel, lanes=self.lanes, speed=1.0)

    def fraction(self, stage: str | None, step: int, total: int) -> float:
        """The share of ``stage``'s time done after ``step`` of ``total`` of its progress steps."""
        if stage in self.layouts:
            return self.layouts[stage].fraction(step, total)
        return min(1.0, step / total) if total > 0 else 0.0


# The seconds of the methods the recorded run does not hold, against the recorded method they are
# planned like (same synthetic images, rounds and distillation steps), paired on the same clients,
# one thread each: the validation records of the paper's baselines (assets/bench/validation).
COST_RECORDS = Path(__file__).resolve().parents[1] / "assets" / "bench" / "validation" / "baselines.jsonl"


@lru_cache(maxsize=1)
def _validation_rows() -> tuple[dict[str, Any], ...]:
    try:
        return tuple(json.loads(line) for line in COST_RECORDS.read_text().splitlines() if line.strip())
    except (OSError, ValueError):
        return ()


def cost_ratio(name: str, like: str) -> float:
    """Median over paired runs (same preset, init, alpha and seed) of ``name``'s server seconds
    over ``like``'s, from :data:`COST_RECORDS`; 1.0 where they hold no pair. Co-Boosting against
    dense-kd: 3.9 (3.5-5.1), DENSE's generator: 2.4 (2.0-3.0)."""
    if name == like:
        return 1.0
    rows = _validation_rows()

    def seconds(method: str) -> dict[tuple, float]:
        out: dict[tuple, float] = {}
        for r in rows:  # the method's own default settings (its variant named as the method, or first)
            key = (r.get("preset"), r.get("client_init"), r.get("alpha"), r.get("seed"))
            if r.get("method") == method and r.get("seconds") and key not in out:
                out[key] = float(r["seconds"])
        return out

    mine, theirs = seconds(name), seconds(like)
    ratios = sorted(mine[k] / theirs[k] for k in mine.keys() & theirs.keys() if theirs[k] > 0)
    return statistics.median(ratios) if ratios else 1.0


class _Recorded:
    """The recorded run's config, read as attributes (a ``metrics.json`` holds it as a dict)."""

    def __init__(self, values: Mapping[str, Any]):
        self.__dict__.update(values)


def _per_step(work_ratio: float) -> float:
    """How much longer a step takes than a step of the recorded run, when it does ``work_ratio``
    times the work (:data:`FIXED_SHARE`, :data:`WORK_EXPONENT`)."""
    return FIXED_SHARE + (1.0 - FIXED_SHARE) * work_ratio ** WORK_EXPONENT


def train_size(cfg: Any, reference: Mapping[str, Any]) -> int:
    """The training images a run of ``cfg`` uses, as far as is known before loading them: the
    recorded run's split (the same bundled data), capped as ``cfg`` caps it."""
    n = int(reference["dataset"]["num_train"])
    if cfg.data.max_train_samples:
        n = min(n, int(cfg.data.max_train_samples))
    return int(n * 0.8) if cfg.data.evaluate_on == "validation" else n


def stage_plan(cfg: Any, reference: Mapping[str, Any] | None, *, num_train: int | None = None,
               device: str = "cpu", speed: float = 1.0, client_workers: int | None = None) -> Plan | None:
    """Planned seconds of every stage of a run of ``cfg`` on this machine, in run order ("data",
    "clients", each method, "privacy" when a method synthesises images), scaled from
    ``reference``: the ``metrics.json`` of a run recorded here. ``num_train``: the training images
    of the run, when they are loaded already (default: :func:`train_size`). On a CPU (``device``)
    the methods that synthesise run side by side as the run will run them
    (:func:`fedmitr.side_by_side.planned_workers`), and the clients train ``client_workers`` at a time
    (None: as many as in the recorded run). ``speed``: this machine's seconds per second of the
    recorded run's (:class:`MachineSpeed`); every stage is scaled by it.

    Each stage takes the recorded run's seconds per step, times the steps ``cfg`` asks for, and
    per step :func:`_per_step` of the work a step does there: client steps of ``batch_size``
    images, inversion iterations over ``images_per_round`` images through every client model
    (counting the tokens sparse inversion keeps active), distillation steps of ``batch_size``
    images; each times the model's cost per token. None when there is nothing to scale from.
    """
    from fedmitr.clients import client_steps
    from fedmitr.config import ClientTrainConfig
    from fedmitr.methods import METHODS

    if not reference or "seconds" not in reference or "config" not in reference:
        return None
    ref_cfg = reference["config"]
    ref_model = ref_cfg["model"]
    width = _width(cfg.model, ref_model)
    scale = width * _tokens(cfg.model) / (ref_model["patch_grid"] ** 2 + 1)  # cost of a whole image
    k, ref_k = cfg.data.num_clients, max(1, len(reference["clients"]))
    plan: dict[str, float] = {"data": float(reference["seconds"].get("data", 0.0))}
    layouts: dict[str, RoundLayout] = {}

    n = num_train if num_train is not None else train_size(cfg, reference)
    ref_clients = ClientTrainConfig(**ref_cfg["clients"])
    ref_steps = sum(client_steps(c["num_samples"], ref_clients) for c in reference["clients"])
    steps = client_steps(n // k, cfg.clients) * k
    plan["clients"] = reference["seconds"]["clients"] * steps / max(1, ref_steps) * _per_step(
        cfg.clients.batch_size / ref_clients.batch_size * scale)
    if client_workers is not None:  # side by side as the recorded run, or fewer at a time (one core)
        ref_workers = min(ref_k, int(reference.get("client_workers") or client_workers))
        plan["clients"] *= ref_workers / max(1, min(k, client_workers))

    ref_methods = reference.get("methods", {})
    recorded = {name: m for name, m in ref_methods.items() if "stage_seconds" in m}
    ref_inv, ref_distill = _Recorded(ref_cfg["inversion"]), _Recorded(ref_cfg["distill"])
    ref_grid = ref_model["patch_grid"]
    grid = cfg.model.patch_grid if cfg.model.arch == "scratch" else 14
    synthesises = False
    for name in cfg.methods:
        spec = METHODS.get(name)
        if spec is None or not spec.synthesises:  # an average or an evaluation: about what it took there
            plan[name] = float(ref_methods.get(name, {}).get("seconds", 0.5))
            continue
        synthesises = True
        like_name = next((m for m in recorded if METHODS.get(m) and METHODS[m].sparse == spec.sparse),
                         next(iter(recorded), None))
        if like_name is None:
            return None
        like, like_sparse = recorded[like_name], bool(METHODS[like_name].sparse) if like_name in METHODS else True
        ref_rounds = max(1, len(like.get("curve", [])) or ref_distill.rounds)
        st = like["stage_seconds"]
        rounds = cfg.distill.rounds
        # Inversion: its iterations, each through every client model for every image; sparse
        # inversion's step costs the share of tokens it keeps active (measured: 2.1x faster on 16
        # tokens, docs/results.md).
        inv_steps = rounds * cfg.inversion.iterations / (ref_rounds * ref_inv.iterations)
        inv_work = cfg.inversion.images_per_round * k / (ref_inv.images_per_round * ref_k) * scale
        active = (_mean_tokens(cfg.inversion, grid, bool(spec.sparse)) / _mean_tokens(cfg.inversion, grid, False)) / (
            _mean_tokens(ref_inv, ref_grid, like_sparse) / _mean_tokens(ref_inv, ref_grid, False))
        inversion = st["inversion"] * inv_steps * _per_step(inv_work) * active
        # The relabel runs after the inversion (its steps do not advance), the test after the distillation.
        inversion += st.get("relabel", 0.0) * rounds / ref_rounds * k / ref_k * scale
        distill_steps = rounds * cfg.distill.steps_per_round / (ref_rounds * ref_distill.steps_per_round)
        distill = st["distill"] * distill_steps * _per_step(cfg.distill.batch_size / ref_distill.batch_size * scale)
        distill += st.get("evaluate", 0.0) * rounds / ref_rounds * scale
        # A method the recording lacks (DENSE's generator, Co-Boosting) takes its measured multiple.
        ratio = 1.0 if name in recorded else cost_ratio(name, like_name)
        plan[name] = (inversion + distill) * ratio
        layouts[name] = RoundLayout(rounds, cfg.inversion.iterations, cfg.distill.steps_per_round,
                                    inversion / max(1e-9, inversion + distill))
    if synthesises:
        # The privacy check and the writing of the run: what the recorded run spent beyond its stages.
        # Its methods' wall-clock: side by side in `method_workers` lanes when it ran them so.
        ref_lanes = int(reference.get("method_workers") or 0)
        ref_side = {m: r.get("seconds", 0.0) for m, r in ref_methods.items()
                    if ref_lanes and m in METHODS and METHODS[m].synthesises}
        ref_wall = sum(r.get("seconds", 0.0) for m, r in ref_methods.items() if m not in ref_side) + (
            remaining_seconds(ref_side, {}, parallel=frozenset(ref_side), lanes=ref_lanes, speed=1.0)
            if ref_side else 0.0)
        ref_stages = reference["seconds"].get("data", 0.0) + reference["seconds"]["clients"] + ref_wall
        extra = max(0.0, reference["seconds"].get("total", ref_stages) - ref_stages)
        plan["privacy"] = extra * _per_step(k / ref_k * n / reference["dataset"]["num_train"] * scale)
    from fedmitr.side_by_side import planned_workers

    lanes = planned_workers(tuple(cfg.methods), device=device)
    parallel = frozenset(m for m in cfg.methods if m in METHODS and METHODS[m].synthesises) if lanes else frozenset()
    plan = {stage: seconds * speed for stage, seconds in plan.items()}
    return Plan(plan, layouts, parallel=parallel, lanes=max(1, lanes))


# --- this machine's speed --------------------------------------------------------------------------

@dataclass
class MachineSpeed:
    """Seconds on this machine per second of the recorded run: first from a probe at start-up (a
    client's training step timed here against the same step timed where the run was recorded,
    :func:`fedmitr.clients.step_seconds`), then from each run finished here (its measured seconds
    against its plan at speed 1), which is the better evidence: the whole pipeline, as it ran."""

    factor: float = 1.0
    source: str = "not measured"

    def probed(self, here: float, recorded: float) -> "MachineSpeed":
        """From the probe: ``here`` and ``recorded`` seconds per step."""
        if here > 0 and recorded > 0:
            self.factor, self.source = here / recorded, "a probe at start-up"
        return self

    def learn(self, planned: float, measured: float) -> None:
        """A run finished here in ``measured`` seconds, where the plan at speed 1 said ``planned``. Its
        rate counts in proportion to its length against :data:`PRIOR_SECONDS` of the factor so far
        (as :func:`speed_factor` weighs a run's stages): a one-second run moves the factor little,
        a two-minute run sets it."""
        if planned > 0 and measured > 0:
            self.factor = (measured + PRIOR_SECONDS * self.factor) / (planned + PRIOR_SECONDS)
            self.source = "the last run here"


# --- the time left -----------------------------------------------------------------------------------

def speed_factor(plan: Mapping[str, float], done: Mapping[str, float], *, current: str | None = None,
                 fraction: float = 0.0, elapsed: float = 0.0,
                 running: Mapping[str, tuple[float, float]] | None = None) -> float:
    """Measured seconds per planned second so far (1.0: the machine is as fast as planned; 2.0: it
    takes twice as long). ``done``: measured seconds of the finished stages; each running stage
    (``running``: stage -> (fraction done, seconds in it); ``current`` is one more) counts once
    :data:`TRUST_FRACTION` of it is done. Smoothed towards 1 by :data:`PRIOR_SECONDS` of planned
    time, so that a few seconds of evidence move it little."""
    running = _running(running, current, fraction, elapsed)
    measured = sum(seconds for stage, seconds in done.items() if stage in plan)
    planned = sum(plan[stage] for stage in done if stage in plan)
    for stage, (part, seconds) in running.items():
        if stage in plan and stage not in done and part > 0:
            # A running stage counts as its rate becomes trustworthy: its first steps are slow
            # (the first batches, the first evaluation) and say little about the rest.
            trust = min(1.0, part / TRUST_FRACTION)
            measured += seconds * trust
            planned += plan[stage] * min(1.0, part) * trust
    return (measured + PRIOR_SECONDS) / (planned + PRIOR_SECONDS)


def _running(running: Mapping[str, tuple[float, float]] | None, current: str | None, fraction: float,
             elapsed: float) -> dict[str, tuple[float, float]]:
    out = {stage: (min(1.0, max(0.0, f)), e) for stage, (f, e) in (running or {}).items()}
    if current is not None:
        out.setdefault(current, (min(1.0, max(0.0, fraction)), elapsed))
    return out


def remaining_seconds(plan: Mapping[str, float], done: Mapping[str, float], *, current: str | None = None,
                      fraction: float = 0.0, elapsed: float = 0.0,
                      running: Mapping[str, tuple[float, float]] | None = None,
                      parallel: frozenset[str] | set[str] = frozenset(), lanes: int = 1,
                      speed: float | None = None) -> float:
    """Seconds until the run ends.

    ``plan``: planned seconds of every stage, in run order (:func:`stage_plan`); ``done``: the
    measured seconds of the finished stages; ``running``: the stages running now, each ``(fraction
    done, seconds in it)`` (``current``, ``fraction`` and ``elapsed``: one running stage).

    A running stage's rest is ``elapsed * (1 - fraction) / fraction`` once :data:`TRUST_FRACTION`
    of it is done, blended with its plan before; every stage not yet started takes its plan times
    :func:`speed_factor` (or ``speed``). The stages in ``parallel`` run ``lanes`` at a time: each
    not yet started takes the lane that frees first, in run order, and they end with the last lane.
    """
    running = _running(running, current, fraction, elapsed)
    if speed is None:
        speed = speed_factor(plan, done, running=running)
    rest: dict[str, float] = {}
    for stage, (part, seconds) in running.items():
        if stage in done:
            continue
        planned_rest = plan.get(stage, 0.0) * speed * (1.0 - part)
        if part > 0 and seconds > 0:
            trust = min(1.0, part / TRUST_FRACTION)
            rest[stage] = trust * seconds * (1.0 - part) / part + (1.0 - trust) * planned_rest
        else:
            rest[stage] = planned_rest
    serial = sum(r for stage, r in rest.items() if stage not in parallel)
    loads = sorted(r for stage, r in rest.items() if stage in parallel)[-max(1, lanes):]
    loads += [0.0] * (max(1, lanes) - len(loads))
    for stage, seconds in plan.items():
        if stage in done or stage in rest:
            continue
        if stage in parallel:
            i = loads.index(min(loads))
            loads[i] += seconds * speed
        else:
            serial += seconds * speed
    return max(0.0, serial + max(loads))


def progress_fraction(elapsed_total: float, remaining: float) -> float:
    """The share of the run done, from the time it took so far and the time left (never 1 while
    time is left)."""
    if elapsed_total <= 0 and remaining <= 0:
        return 0.0
    return min(0.99, elapsed_total / max(1e-9, elapsed_total + remaining)) if remaining > 0 else 0.99
