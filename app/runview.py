"""What one session has seen of its run so far: the pipeline's events folded into plain data.

The app feeds every event to :meth:`RunView.apply`, which returns which parts of the page changed;
the app then redraws only those parts with the functions of :mod:`app.views`. A live run and a
recorded one (a run directory's ``events.jsonl``) go through the same :meth:`apply`. The view is
changed only through its own methods: :meth:`apply`, :meth:`waiting`, :meth:`set_plan`,
:meth:`finish`, :meth:`fail`, :meth:`cancel`, :meth:`set_tint` and :meth:`attach_training_images`.

Its clock starts when the run gets the device; a recorded event carries its own time (``t`` in
``events.jsonl``), so a replay's log and stages read as they did live. With a plan
(:func:`app.timeline.stage_plan`) the status card counts down the time left, and the progress bar
is the share of the time done: 100% only once the run has finished.
"""

from __future__ import annotations

import hashlib
import html
import time
from dataclasses import KW_ONLY, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from fedmitr.config import RunConfig
from fedmitr.events import (Event, Metric, PartitionReady, PrivacyChecked, Progress, RunFinished, StageFinished,
                            StageStarted, SyntheticRound)
from fedmitr.methods import METHODS, headline

from app import timeline, views
from app.timeline import Plan, format_estimate, format_seconds

GALLERY_PER_ROUND = 8  # synthetic images kept and shown per round (one per class for 10 classes)
MAX_ROUNDS_KEPT = 12  # per method: the first round and the latest ones, so memory stays bounded


def gallery_picks(labels: np.ndarray, round_: int, n: int = GALLERY_PER_ROUND) -> np.ndarray:
    """Indices of the ``n`` images of a round the gallery keeps: one per class, the classes taken in
    turn from round to round (round 1 starts at the first class, round 2 where round 1 stopped), so
    that over the rounds every class is shown; then the round's other images, in order."""
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if len(classes) == 0:
        return np.arange(0)
    start = ((round_ - 1) * n) % len(classes)
    turn = np.roll(classes, -start)
    firsts = [int(np.flatnonzero(labels == c)[0]) for c in turn][:n]
    rest = [i for i in range(len(labels)) if i not in set(firsts)]
    return np.asarray((firsts + rest)[:n], dtype=int)


def _slim(event: SyntheticRound) -> SyntheticRound:
    """A few images of a round (:func:`gallery_picks`), pixels as uint8: what the gallery and relabel
    map need."""
    keep = gallery_picks(event.labels, event.round)
    images = np.asarray(event.images)[keep]
    if images.dtype != np.uint8:
        images = (np.clip(images, 0, 1) * 255 + 0.5).astype(np.uint8)
    per_image = {name: np.asarray(getattr(event, name))[keep]
                 for name in ("labels", "stop_step", "density", "high_mask", "token_labels", "token_relabelled",
                              "token_weight", "token_source") if getattr(event, name) is not None}
    return replace(event, images=images, **per_image)


def _write_png(image, folder: Path) -> str:
    """``image`` as a PNG in ``folder``, named by its content (written once, shared by every view)."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    data = buffer.getvalue()
    path = folder / f"{hashlib.sha256(data).hexdigest()[:32]}.png"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{time.time_ns()}.part")
        partial.write_bytes(data)
        partial.replace(path)  # atomic: a concurrent reader never sees half a file
    return str(path)


@dataclass
class RunView:
    cfg: RunConfig
    _: KW_ONLY
    started: float = field(default_factory=time.time)
    stages: list[str] = field(default_factory=list)  # planned stage names, in order
    finished: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    plan: Plan | None = None  # planned seconds of every stage on this machine (app.timeline.stage_plan)
    run_started: float | None = None  # wall clock when the run got the device (None: not yet)
    clock: float = 0.0  # seconds since the run started, as of the latest event
    stage_started: dict[str, float] = field(default_factory=dict)  # stage -> `clock` when it started
    stage: str | None = None
    stage_info: dict[str, str] = field(default_factory=dict)
    step: int = 0
    total: int = 0
    message: str = ""
    # Every stage running now -> (step, total, message): the methods run side by side on a CPU.
    running: dict[str, tuple[int, int, str]] = field(default_factory=dict)
    device: str = ""
    class_counts: np.ndarray | None = None
    class_names: tuple[str, ...] = ()
    client_accuracy: dict[int, float] = field(default_factory=dict)  # 0-based client -> accuracy
    method_accuracy: dict[str, float] = field(default_factory=dict)  # final accuracy of each method
    curves: dict[str, dict[int, float]] = field(default_factory=dict)  # method -> round -> accuracy
    rounds: dict[str, list[SyntheticRound]] = field(default_factory=dict)  # method -> slimmed rounds
    round_size: dict[str, int] = field(default_factory=dict)  # method -> synthetic images per round
    # (method, round) -> where the gallery's images of that round sit in the whole round (gallery_picks)
    picks: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    tint: bool = True  # draw the stop tint over the gallery and the relabel map
    log: list[str] = field(default_factory=list)
    state: str = "running"  # running | done | cancelled | failed
    queue_position: int = 0  # place in the line for the device while waiting (0: on the device)
    metrics: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)
    out_dir: str | None = None  # the finished run's directory (for Share and Try)
    models: list[str] = field(default_factory=list)  # methods of the finished run with a saved global model
    privacy: dict[str, PrivacyChecked] = field(default_factory=dict)  # method -> its privacy check
    # The training split's pixels in [0, 1] [M, C, H, W] and labels, to show a nearest real image.
    train_images: tuple[np.ndarray, np.ndarray] | None = None
    seconds: float | None = None  # how long the run took, once it ended
    recorded: str = ""  # for a replayed run: what it is (shown instead of "Finished"), HTML
    name: str = "your run"  # what the run is called on the page ("the recorded example", ...)
    thumbnails: Path | None = None  # where gallery thumbnails are written once (None: drawn for every call)
    _thumbs: dict[tuple, str] = field(default_factory=dict, repr=False)  # (method, round, image, tint) -> file
    _bar: float = field(default=0.0, repr=False)  # the progress bar never moves back

    def __post_init__(self) -> None:
        if not self.stages:
            synthesises = any(METHODS.get(m) is not None and METHODS[m].synthesises for m in self.cfg.methods)
            self.stages = ["data", "clients", *self.cfg.methods, *(["privacy"] if synthesises else [])]

    # --- events -> state ---------------------------------------------------------------------------
    def apply(self, event: Event, at: float | None = None) -> set[str]:
        """Fold one event in; return the parts of the page that changed. ``at``: when it happened,
        in seconds since the run started (a recorded event's ``t``); None: now."""
        self.clock = self._now() if at is None else float(at)
        if isinstance(event, StageStarted):
            self.stage, self.step, self.total, self.message = event.stage, 0, event.total or 0, ""
            self.running[event.stage] = (0, event.total or 0, "")
            self.stage_started[event.stage] = self.clock
            if event.info:
                self.stage_info[event.stage] = event.info
            if event.device is not None:
                self.device = str(event.device)
            self._log(f"[{event.stage}] started" + (f" ({event.info})" if event.info else ""))
            return {"status"}
        if isinstance(event, Progress):
            self.stage, self.step, self.total, self.message = event.stage, event.step, event.total, event.message
            if event.stage not in self.finished:
                self.running[event.stage] = (event.step, event.total, event.message)
            return {"status"}
        if isinstance(event, StageFinished):
            self.finished[event.stage] = event.seconds
            self.running.pop(event.stage, None)
            self._log(f"[{event.stage}] done in {event.seconds:.1f} s")
            return {"status"}
        if isinstance(event, PartitionReady):
            self.class_counts = np.asarray(event.class_counts)
            self.class_names = tuple(event.class_names)
            return {"partition", "clients"}
        if isinstance(event, Metric):
            return self._metric(event)
        if isinstance(event, PrivacyChecked):
            self.privacy[event.method] = event
            return set()
        if isinstance(event, RunFinished):
            self.metrics = event.metrics
            return set()
        if isinstance(event, SyntheticRound):
            kept = self.rounds.setdefault(event.method, [])
            self.round_size[event.method] = len(event.images)
            self.picks[(event.method, event.round)] = gallery_picks(event.labels, event.round)
            kept.append(_slim(event))
            if len(kept) > MAX_ROUNDS_KEPT:
                del kept[1]  # keep round 1 for comparison, drop the oldest of the rest
            self._log(f"  {event.method} round {event.round}: {len(event.images)} synthetic images")
            return {"gallery"}
        return set()

    def _metric(self, event: Metric) -> set[str]:
        if event.name != "accuracy":
            self._log(f"  {event.source}: {event.name} = {event.value:.4f}")
            return {"log"}
        if event.client is not None:
            self.client_accuracy[event.client] = event.value
            self._log(f"  {event.source}: accuracy {event.value:.1%}")
            return {"clients"}
        if event.step is not None:
            self.curves.setdefault(event.source, {})[event.step] = event.value
            self._log(f"  {event.source} round {event.step}: accuracy {event.value:.1%}")
            return {"curves"}
        self.method_accuracy[event.source] = event.value
        self._log(f"  {event.source}: accuracy {event.value:.1%}")
        return {"clients", "curves"}

    def _log(self, line: str) -> None:
        self.log.append(f"{self.clock:6.1f}s {line}")

    def _now(self) -> float:
        """Seconds since the run got the device (the clock starts with the first event)."""
        if self.run_started is None:
            self.run_started = time.time()
        return time.time() - self.run_started

    # --- the run's outcome ------------------------------------------------------------------------
    def waiting(self, position: int) -> None:
        """The run's place in the line for the device (0: it holds the device, and its clock runs)."""
        self.queue_position = position
        if position == 0 and self.run_started is None:
            self.run_started = time.time()

    def set_plan(self, plan: Plan | None) -> None:
        """The planned seconds of every stage (:func:`app.timeline.stage_plan`), for the time left."""
        self.plan = plan

    def finish(self, metrics: dict[str, Any], *, out_dir: str | None = None, files: list[str] | None = None,
               models: list[str] | None = None, seconds: float | None = None) -> None:
        """The run ended: its metrics, and (for a run with a directory) the downloads and the
        methods whose global model was saved. ``seconds``: what the run took (default: the run's
        own total, from its metrics)."""
        self.state, self.metrics, self.queue_position = "done", metrics, 0
        if seconds is None:
            seconds = float(metrics.get("seconds", {}).get("total", self.clock))
        self.seconds, self.clock = float(seconds), float(seconds)
        self.out_dir = out_dir
        self.files = list(files or [])
        self.models = list(models or [])

    def fail(self, message: str) -> None:
        self.state, self.seconds = "failed", self.elapsed()
        self._log(f"failed: {message}")

    def cancel(self) -> bool:
        """Mark a running view stopped; False if it had already ended."""
        if self.state != "running":
            return False
        self.state, self.seconds = "cancelled", self.elapsed()
        return True

    def partial_metrics(self) -> dict[str, Any]:
        """What a stopped run finished, shaped as ``metrics.json``'s methods: each method that
        reported its final accuracy, with its seconds (for the results table after a Stop)."""
        return {"methods": {m: {"accuracy": acc, "seconds": self.finished.get(m, 0.0)}
                            for m, acc in self.method_accuracy.items()}}

    def mark_recorded(self, note: str, name: str = "the recorded run") -> None:
        """This finished view is a replay of a recorded run; ``note`` (HTML) says which, ``name``
        is what the page calls it ("the recorded example")."""
        self.recorded, self.name = note, name

    def set_tint(self, tint: bool) -> None:
        self.tint = bool(tint)

    def attach_training_images(self, train_unit: np.ndarray, train_labels: np.ndarray) -> None:
        """The training split (pixels in [0, 1], labels), so the privacy check can show the nearest real
        image of a synthetic one. Without it the view shows only the distances."""
        self.train_images = (train_unit, train_labels)

    # --- derived ---------------------------------------------------------------------------------------
    def elapsed(self, now: float | None = None) -> float:
        """Seconds the run has taken so far on the device (all of it once it ended; 0 while queued).
        ``now``: the time to read it at, in seconds since the run started (default: the clock)."""
        if self.seconds is not None:
            return self.seconds
        if now is not None:
            return now
        return self._now() if self.run_started is not None else 0.0

    def remaining(self, now: float | None = None) -> float | None:
        """Seconds left at ``now`` (:func:`app.timeline.remaining_seconds`); None without a plan,
        or while the run waits for the device."""
        if self.state != "running" or self.plan is None or (now is None and self.run_started is None):
            return None
        now = self.elapsed(now)
        running = {stage: (self.plan.fraction(stage, step, total), now - self.stage_started.get(stage, now))
                   for stage, (step, total, _) in self.running.items() if stage not in self.finished}
        return timeline.remaining_seconds(self.plan.seconds, self.finished, running=running,
                                          parallel=self.plan.parallel, lanes=self.plan.lanes)

    def fraction(self) -> float:
        """Overall progress 0..1: 1 only once the run is done. With a plan, the share of the time
        (taken / (taken + left)); without one, stages weighted by a rough share of the run's time."""
        if self.state == "done":
            return 1.0
        if self.state != "running":
            return self._bar
        left = self.remaining()
        if left is not None:
            done = timeline.progress_fraction(self.elapsed(), left)
        else:
            done = self._weighted_fraction()
        self._bar = max(self._bar, min(0.99, done))
        return self._bar

    def _weighted_fraction(self) -> float:
        inversion = [m for m in self.cfg.methods if METHODS.get(m) is not None and METHODS[m].synthesises]
        weights = {"data": 0.02, "clients": 0.45 if inversion else 0.9}
        rest = 1 - sum(weights.values())
        for m in self.cfg.methods:
            weights[m] = (rest * 0.95 / len(inversion)) if m in inversion else rest * 0.03 / max(1, len(self.cfg.methods))
        if inversion:
            weights["privacy"] = rest * 0.02
        scale = sum(weights.values())
        done = sum(weights.get(s, 0) for s in self.finished)
        for stage, (step, total, _) in self.running.items():
            if stage not in self.finished and total:
                done += weights.get(stage, 0) * min(1.0, step / total)
        return done / scale

    def references(self) -> dict[str, float]:
        """Single numbers drawn as reference lines: the methods without rounds (FedAvg, the ensemble)."""
        return {m: a for m, a in self.method_accuracy.items() if m in METHODS and not METHODS[m].synthesises}

    def client_chart(self):
        k = self.cfg.data.num_clients
        sizes = self.class_counts.sum(axis=1).tolist() if self.class_counts is not None else None
        return views.client_accuracy_chart([self.client_accuracy.get(i) for i in range(k)], sizes, self.references())

    def curves_chart(self):
        return views.accuracy_curves(self.curves, self.references(),
                                     rounds=self.cfg.distill.rounds if self.curves else None)

    def gallery_methods(self) -> list[str]:
        return list(self.rounds)

    def gallery_items(self, method: str | None) -> tuple[list, list[tuple[str, int, int]]]:
        """(image, caption) pairs of ``method``'s rounds, and which (method, round, image) each one is.

        With a ``thumbnails`` folder each thumbnail is drawn and written once, and the same file is
        sent again when the gallery grows: Gradio does not encode it again, and the browser keeps it.
        """
        if method not in self.rounds:
            return [], []
        items, index = [], []
        names = self.class_names or None
        for r, event in enumerate(self.rounds[method]):
            keys = [(method, event.round, i, self.tint) for i in range(len(event.images))]
            if self.thumbnails is None or any(not Path(self._thumbs.get(k, "")).is_file() for k in keys):
                drawn = views.mask_overlay(event, tint=self.tint, class_names=names)
                if self.thumbnails is not None:
                    self._thumbs.update({k: _write_png(img, self.thumbnails) for k, img in zip(keys, drawn)})
            for i, key in enumerate(keys):
                # The caption is drawn under the image (not over a patch); the text is the image's
                # alt text (the page hides Gradio's own caption strip).
                img = self._thumbs[key] if self.thumbnails is not None else drawn[i]
                items.append((img, views.alt_text(event, i, names)))
                index.append((method, r, i))
        return items, index

    def relabel_figure(self, method: str | None, round_pos: int = -1, image: int = 0):
        if method not in self.rounds or not self.rounds[method]:
            return views.placeholder_figure("The relabel map appears with the first synthetic round.", height=420)
        event = self.rounds[method][round_pos]
        image = min(max(0, image), len(event.images) - 1)
        spec = METHODS.get(method)
        return views.relabel_map(event, image, self.class_names or None, relabel_used=bool(spec and spec.relabel),
                                 tint=self.tint)

    def relabel_summary(self, method: str | None) -> str:
        """The finished run's relabel diagnostics of ``method`` (empty while it runs)."""
        entry = ((self.metrics or {}).get("methods") or {}).get(method or "", {})
        return views.relabel_summary(entry.get("relabel"), self.class_names or None, entry)

    def shown_method(self) -> str | None:
        """The method the gallery follows: the latest to synthesise, and at the end the headline
        method if it ran."""
        if not self.rounds:
            return None
        if self.state == "done" and headline().name in self.rounds:
            return headline().name
        return list(self.rounds)[-1]

    def privacy_view(self, method: str | None, round_pos: int = -1, image: int = 0):
        """(picture of a synthetic image beside its nearest real one, the text that explains it)."""
        if method not in self.rounds or not self.rounds[method]:
            return None, views.PRIVACY_HINT
        event = self.rounds[method][round_pos]
        image = min(max(0, image), len(event.images) - 1)
        check = self.privacy.get(method)
        if check is None:
            return None, views.PRIVACY_HINT
        place = int(self.picks.get((method, event.round), np.arange(image + 1))[image])  # its place in the round
        g = (event.round - 1) * self.round_size.get(method, 0) + place  # the image's place in the method's set
        if g >= len(check.nearest_index):
            return None, views.PRIVACY_HINT
        distance = {space: float(d[g]) for space, d in check.distance.items()}
        if self.train_images is None:
            return None, views.privacy_text(distance, check.summary)
        train_unit, train_labels = self.train_images
        j = int(check.nearest_index[g])
        names = self.class_names or tuple(str(c) for c in range(10))
        text = views.privacy_text(distance, check.summary,
                                  classes=(names[int(event.labels[image])], names[int(train_labels[j])]))
        real = (np.clip(train_unit[j], 0, 1) * 255 + 0.5).astype(np.uint8)
        picture = views.privacy_pair(event.images[image], real, f"synthetic r{event.round} #{place + 1}",
                                     f"nearest real: class {names[int(train_labels[j])]}")
        return picture, text

    def latest_round(self, method: str | None) -> SyntheticRound | None:
        return self.rounds[method][-1] if method in self.rounds and self.rounds[method] else None

    def legend_html(self, method: str | None) -> str:
        """The gallery's colour key, and how many of the round's images it shows."""
        latest = self.latest_round(method)
        if latest is None:
            return ""
        return views.stop_legend_html(latest, shown=len(latest.images), total=self.round_size.get(method))

    # --- status ------------------------------------------------------------------------------------
    def time_line(self) -> str:
        """The status card's clock: the time left while the run goes, what it took once it ended."""
        if self.state == "running" and self.queue_position > 0:
            return f"waiting {format_seconds(time.time() - self.started)}"
        pct = f"{self.fraction() * 100:.0f}%"
        if self.state == "running":
            left = self.remaining()
            so_far = f"{format_seconds(self.elapsed())} so far"
            if left is None:
                return f"{pct} · {so_far}"
            return f"{pct} · {so_far} · " + (f"about {format_estimate(left)} left" if left >= 1 else "finishing")
        took = format_seconds(self.elapsed())
        return {"done": f"{pct} · took {took}", "cancelled": f"stopped after {took}",
                "failed": f"failed after {took}"}[self.state]

    def status_html(self) -> str:
        chips = []
        for s in self.stages:
            if s in self.finished:
                cls, mark = "done", "✓"
            elif s in self.running and self.state == "running":
                cls, mark = "active", "●"
            else:
                cls, mark = "todo", "○"
            chips.append(f'<span class="fm-stage fm-{cls}">{mark} {html.escape(s)}</span>')
        pct = self.fraction() * 100
        clock = html.escape(self.time_line())
        if self.state == "running" and self.queue_position > 0:
            ahead = self.queue_position - 1
            head = (f"Queued: position {self.queue_position} in line for the device "
                    f"(another session's run is using it{f', {ahead} waiting before you' if ahead else ''})")
        elif self.state == "running":
            now = [(stage, message) for stage, (_, _, message) in self.running.items() if stage not in self.finished]
            if len(now) > 1:  # methods side by side
                head = "Running side by side: " + "; ".join(
                    html.escape(stage + (f" · {message}" if message else "")) for stage, message in now)
            else:
                stage, message = now[0] if now else (self.stage, self.message)
                head = f"Running: {html.escape(stage or 'starting')}"
                if message:
                    head += f" · {html.escape(message)}"
        elif self.recorded:
            head = self.recorded
        else:
            head = {"done": "Finished", "cancelled": "Stopped", "failed": "Failed"}[self.state]
        device = html.escape(self.device) if self.device else "not yet chosen"
        return (
            f'<div class="fm-status fm-state-{self.state}">'
            f'<div class="fm-status-head"><b>{head}</b><span class="fm-time">{clock}</span></div>'
            f'<div class="fm-bar"><div style="width:{pct:.1f}%"></div></div>'
            f'<div class="fm-stages">{"".join(chips)}</div>'
            f'<div class="fm-meta">Device: {device} · {self.cfg.data.num_clients} clients · '
            f'{html.escape(self.cfg.data.dataset)} · preset {html.escape(self.cfg.preset)}</div></div>'
        )


def idle_status_html(device: str, message: str = "Ready. Choose the settings on the left and press Run.") -> str:
    return (f'<div class="fm-status fm-state-idle"><div class="fm-status-head"><b>{html.escape(message)}</b></div>'
            f'<div class="fm-bar"><div style="width:0%"></div></div>'
            f'<div class="fm-meta">Device: {html.escape(device)}</div></div>')
