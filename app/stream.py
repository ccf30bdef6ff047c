"""One session's run, streamed to the page: check the settings, wait for the device, fold the
pipeline's events into the session's :class:`~app.runview.RunView`, and redraw what changed.

The pipeline runs in a worker thread (:class:`app.jobs.Job`); :func:`run_job` is the
generator that drains its events, and :func:`cancellable` streams it to Gradio from worker
threads whose steps a Stop abandons at once. Nothing here blocks Gradio's event loop: the
generator waits on the job's queue with a short timeout, and on the way out (finished, Stop, tab
closed, error) it only signals the worker.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator

import anyio
import gradio as gr
import pandas as pd

from fedmitr.catalog import BUNDLED
from fedmitr.config import RunConfig
from fedmitr.data import ImageDataset
from fedmitr.errors import USER_ERRORS, ConfigError, redact
from fedmitr.events import DeviceInfo
from fedmitr.methods import headline
from fedmitr.rundir import RunDir

from app import form, jobs, views
from app.layout import BENCH_HINT, RELABEL_PLACEHOLDER, Page, gallery_hint
from app.runview import RunView
from app.timeline import MachineSpeed, Plan, format_estimate, format_seconds, stage_plan

log = logging.getLogger("fedmitr.app")
ROOT = Path(__file__).resolve().parent.parent  # the repository (the Space's files)

# The most often the page is redrawn while a run streams events. Every update costs the visitor's
# browser a redraw on a machine that also trains: Chromium's renderer used 16% of a core at one
# update a second and 13% at one every two seconds (the default run, scripts/app_probe.py run).
YIELD_EVERY_S = 2.0
_DEVICE: list[DeviceInfo | None] = []
# This machine's speed against the recorded run's (app.timeline.MachineSpeed): probed at start-up
# (calibrate), then learnt from every run finished here, so a new tab's estimate follows both.
SPEED = MachineSpeed()


def refuse(message: str, title: str = "Invalid settings") -> gr.Error:
    """A refusal shown to the user: credentials masked, and no traceback in the server's log."""
    return gr.Error(redact(message), title=title, print_exception=False)


def startup_device() -> DeviceInfo | None:
    """The device a run will use, as the pipeline will describe it, computed once: creating an
    Accelerator resets accelerate's process-wide state, which must not happen while a job trains."""
    if not _DEVICE:
        try:
            from fedmitr.runtime import describe_device, make_accelerator

            _DEVICE.append(describe_device(make_accelerator()))
        except Exception as err:  # noqa: BLE001 - only a label; the run itself reports the real device
            log.warning("could not describe the device: %s", err)
            _DEVICE.append(None)
    return _DEVICE[0]


def startup_device_label() -> str:
    device = startup_device()
    return str(device) if device is not None else "unknown"


def session_of(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def checked_config(values: tuple) -> RunConfig:
    """Form values -> RunConfig, or a refusal the user can act on (also when the Hub is needed but
    out of reach)."""
    try:
        cfg = form.FormValues.from_inputs(values).to_config()
        form.check_hub(cfg)
        return cfg
    except ConfigError as err:
        raise refuse(str(err)) from None


def checked_data(cfg: RunConfig) -> ImageDataset | None:
    """Load a bundled dataset and split it, so that an impossible split is refused at once; returns
    the loaded data for the run. Hub datasets are checked by the run itself (loading them can mean a
    download)."""
    if cfg.data.dataset not in BUNDLED:
        return None
    from fedmitr.pipeline import prepare

    try:
        return prepare(cfg).dataset
    except USER_ERRORS as err:
        raise refuse(str(err)) from None


def _friendly(err: BaseException) -> str:
    if isinstance(err, USER_ERRORS):
        return str(err)
    return f"the run failed ({type(err).__name__}). The app is still up; try again or change the settings."


def run_job(page: Page, values: tuple, request: gr.Request | None, *, reference: dict[str, Any] | None = None,
            started: list | None = None):
    """Run the whole pipeline for this session and stream the page as its events arrive.

    ``reference``: the ``metrics.json`` of a run recorded on this machine (the example), from which
    the time each stage takes is planned (:func:`app.timeline.stage_plan`). ``started``: a list
    that receives the run's :class:`app.jobs.Job` as it is made (so that a cancel can stop it
    while this generator is busy, see :func:`cancellable`).

    What is streamed is bounded: at most one update every :data:`YIELD_EVERY_S` seconds, and in
    it only what changed since the last one (the status card when its text changed, the log when
    it grew, a figure when its data changed, the gallery when a round arrived); the last update
    carries the whole page.
    """
    session = session_of(request)
    cfg = checked_config(values)
    dataset = checked_data(cfg)
    if jobs.active_job(session) is not None:
        raise refuse("A run is already going in this browser tab. Press Stop first, or wait for it to finish.",
                     title="Busy")
    if jobs.DEVICE.waiting() >= jobs.MAX_WAITING:
        raise refuse(f"The app is busy: {jobs.DEVICE.waiting()} runs are waiting for the device. "
                     f"Try again in a few minutes.", title="Busy")
    device = startup_device()
    if cfg.preset == "gpu" and (device is None or device.type != "cuda"):
        gr.Warning("The gpu preset fine-tunes a 224 px DeiT and is sized for a GPU; on this CPU it takes hours. "
                   "Press Stop and pick the cpu preset for a demo.")
    job = jobs.Job(cfg, jobs.new_run_dir(session), session, dataset=dataset)
    if started is not None:
        started.append(job)
    view = RunView(cfg, thumbnails=jobs.thumbnails_root())
    view.set_plan(plan_of(cfg, reference, num_train=len(dataset.train) if dataset is not None else None))
    index: list = []
    try:
        job.start()
        yield first_update(page, view)
        dirty: set[str] = set()
        logged, status = 0, ""  # log lines and status card already on the page
        # The first thing the run makes (the split) goes out at once; after that, one every YIELD_EVERY_S.
        last_yield = -math.inf
        finished = False
        while not finished:
            try:
                event = job.events.get(timeout=0.25)
            except queue.Empty:
                event = None
            while event is not None:  # drain whatever else is already waiting
                if event is jobs.DONE:
                    finished = True
                    break
                dirty |= view.apply(event)
                try:
                    event = job.events.get_nowait()
                except queue.Empty:
                    event = None
            if finished or time.monotonic() - last_yield < YIELD_EVERY_S:
                continue
            view.waiting(0 if job.started_on_device.is_set() else job.queue_position())
            if len(view.log) != logged:
                dirty.add("log")
                logged = len(view.log)
            update, index = render(page, view, dirty | {"status"}, index)
            if update.get(page.status) == status:
                del update[page.status]  # the card's text did not change: nothing to redraw
            status = update.get(page.status, status)
            dirty, last_yield = set(), time.monotonic()  # drawing took time too: the next one a second from now
            if update:
                yield update

        if job.error is not None:
            view.fail(str(job.error))
            yield {page.status: view.status_html(), page.log_box: "\n".join(view.log),
                   page.estimate: estimate_line(cfg, view.plan)}
            if not isinstance(job.error, USER_ERRORS):
                log.error("run failed", exc_info=job.error)
            raise refuse(_friendly(job.error), title="Run failed")
        if job.cancelled:
            view.cancel()
            yield {page.status: view.status_html(), page.log_box: "\n".join(view.log),
                   page.estimate: estimate_line(cfg, view.plan)}
            return
        run_dir = RunDir(job.out_dir)
        first = headline().name  # the method's own model is offered first
        view.finish(job.metrics, out_dir=str(job.out_dir), files=[str(p) for p in run_dir.downloads()],
                    models=sorted(run_dir.global_models(), key=lambda m: m != first), seconds=view.elapsed())
        unscaled = plan_of(cfg, reference, num_train=len(job.dataset.train) if job.dataset is not None else None,
                           speed=1.0)
        if unscaled is not None:  # the next estimate, in this tab and in a new one, learns from this run
            SPEED.learn(unscaled.total, float(job.metrics.get("seconds", {}).get("total", 0.0)))
        if job.dataset is not None:  # bundled data, loaded by the check: the privacy view shows real images
            view.attach_training_images(*train_images(job.dataset))
        # The last update carries every panel, so that an API caller's final output is the whole page
        # (the browser redraws the figures once more; the gallery's files are the same).
        update, index = render(page, view, {"status", "log", "partition", "clients", "curves", "gallery", "final"},
                               index)
        update[page.view_state] = view
        update[page.estimate] = took_text(view)
        yield update
    finally:
        # On Stop or a closed tab Gradio runs this on its event loop: signal the worker and return.
        # The worker stops within one step, releases the device and unregisters itself.
        job.cancel()


_EXHAUSTED = object()


async def cancellable(updates: Iterator[Any], on_cancel: Callable[[], Any] = lambda: None) -> AsyncIterator[Any]:
    """Stream a synchronous generator (:func:`run_job`) from worker threads so that a cancel (Stop,
    the API's cancel, a closed tab) ends the event at once.

    Gradio iterates a plain generator one ``next()`` per thread hop and cannot cancel a hop: a Stop
    waited for the generator's next update, up to :data:`YIELD_EVERY_S` later. Here each hop is
    abandoned on cancel: ``on_cancel`` stops the session's job straight away, and a background
    thread closes the generator (running its clean-up) as soon as its current step returns. The
    event loop itself never waits.
    """
    try:
        while True:
            update = await anyio.to_thread.run_sync(next, updates, _EXHAUSTED, abandon_on_cancel=True)
            if update is _EXHAUSTED:
                return
            yield update
    except (anyio.get_cancelled_exc_class(), GeneratorExit):  # Stop, the API's cancel, a closed tab
        on_cancel()
        threading.Thread(target=_close_when_free, args=(updates,), name="fedmitr-close", daemon=True).start()
        raise


def _close_when_free(updates: Iterator[Any]) -> None:
    """Close a generator whose ``next()`` may still be running in an abandoned thread."""
    while True:
        try:
            updates.close()  # type: ignore[attr-defined]
            return
        except ValueError:  # "generator already executing": its step ends within a second
            time.sleep(0.02)


def first_update(page: Page, view: RunView) -> dict[Any, Any]:
    """The page as a new run starts: every panel of the last run (or of the example) cleared."""
    return {
        page.status: view.status_html(),
        page.partition_plot: views.placeholder_figure("Splitting the data…"),
        page.clients_plot: views.placeholder_figure("Client accuracies appear after local training."),
        page.gallery: [], page.gallery_method: gr.update(choices=[], value=None), page.legend: gallery_hint(),
        page.relabel_plot: views.placeholder_figure(RELABEL_PLACEHOLDER, height=420), page.relabel_summary: "",
        page.curves_plot: view.curves_chart(), page.results: pd.DataFrame(columns=views.RESULT_HEADERS), page.results_note: "",
        page.files: None, page.log_box: "", page.view_state: view, page.gallery_index: [],
        page.privacy_pair: None, page.privacy_text: views.PRIVACY_HINT, page.bench_note: BENCH_HINT,
        page.share_method: gr.update(choices=[], value=None), page.try_method: gr.update(choices=[], value=None),
        page.estimate: running_text(view),
    }


def render(page: Page, view: RunView, dirty: set[str], index: list) -> tuple[dict[Any, Any], list]:
    """The page updates for the parts in ``dirty``; also returns the gallery's index."""
    update: dict[Any, Any] = {}
    if "status" in dirty:
        update[page.status] = view.status_html()
    if "log" in dirty or "final" in dirty:  # the log only when it grew: a redraw costs the browser too
        update[page.log_box] = "\n".join(view.log[-400:])
    if "partition" in dirty and view.class_counts is not None:
        update[page.partition_plot] = views.partition_heatmap(view.class_counts, view.class_names)
    if "clients" in dirty:
        update[page.clients_plot] = view.client_chart()
    if "curves" in dirty:
        update[page.curves_plot] = view.curves_chart()
    shown = view.shown_method()
    if "gallery" in dirty and shown is not None:
        # Follow the method that is running; at the end show the method itself. The dropdown picks any.
        items, index = view.gallery_items(shown)
        update[page.gallery] = items
        update[page.gallery_method] = gr.update(choices=view.gallery_methods(), value=shown)
        update[page.legend] = view.legend_html(shown)
        update[page.relabel_plot] = view.relabel_figure(shown)
        update[page.relabel_summary] = view.relabel_summary(shown)
        update[page.gallery_index] = index
    if "final" in dirty and view.metrics is not None:
        update[page.results] = pd.DataFrame(views.results_rows(view.metrics), columns=views.RESULT_HEADERS)
        update[page.results_note] = views.results_note(view.metrics, benchmark_pair_of(view.cfg))
        first = view.models[0] if view.models else None
        update[page.share_method] = gr.update(choices=view.models, value=first)
        update[page.try_method] = gr.update(choices=view.models, value=first, label=f"Global model of {view.name}")
        update[page.privacy_pair], update[page.privacy_text] = view.privacy_view(shown)
        update[page.bench_note] = bench_note(view.cfg)
        update[page.files] = view.files or None
    return update, index


def calibrate(recorded: dict[str, Any] | None) -> MachineSpeed:
    """Probe this machine's speed once (about a second: :func:`fedmitr.clients.step_seconds` of the
    recorded run's model), against the probe ``recorded`` (the example's ``recorded.json``) holds."""
    if recorded and recorded.get("step_seconds") and SPEED.source == "not measured":
        from fedmitr.clients import step_seconds
        from fedmitr.config import preset_config

        SPEED.probed(step_seconds(preset_config("cpu").model), float(recorded["step_seconds"]))
        log.info("this machine runs at %.2fx the recorded run's time (%s)", SPEED.factor, SPEED.source)
    return SPEED


def plan_of(cfg: RunConfig, reference: dict[str, Any] | None, *, num_train: int | None = None,
            speed: float | None = None) -> Plan | None:
    """The time plan of a run of ``cfg`` on this machine (None when there is no recorded run to
    scale, or it cannot be read): at ``speed`` (default: :data:`SPEED`), with the clients' and the
    methods' workers this process will use."""
    try:
        device = startup_device()
        on = device.type if device is not None else "cpu"
        workers = None  # as the recorded run, unless the app chose a number (app.app.main)
        if on != "cpu":
            workers = 1
        elif os.environ.get("FEDMITR_CLIENT_WORKERS", "").isdigit():
            workers = int(os.environ["FEDMITR_CLIENT_WORKERS"])
        return stage_plan(cfg, reference, num_train=num_train, device=on,
                          speed=SPEED.factor if speed is None else speed, client_workers=workers)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as err:  # an old or partial metrics.json
        log.warning("no time estimate (%s: %s)", type(err).__name__, err)
        return None


def running_text(view: RunView) -> str:
    """The line under Run while a run goes: the card above counts down."""
    if view.plan is None:
        return "Running: the card above shows how far it got."
    return (f"Running: the card above counts down the time left (about {format_estimate(view.plan.total)} "
            f"estimated before the run).")


def took_text(view: RunView) -> str:
    """The line under Run once a run finished: what it took, beside what was estimated."""
    took = f"This run took **{format_seconds(view.elapsed())}**"
    if view.plan is None:
        return took + "."
    return took + f" (estimated before it: about {format_estimate(view.plan.total)})."


def stop_job(view: RunView | None, request: gr.Request | None):
    """Stop this session's job, waiting or running (Gradio also cancels the run event, whose last
    update then never comes). Never waits. Returns the status card, the results of the methods that
    finished before the Stop, and the line under Run."""
    jobs.cancel_session(session_of(request))
    if view is not None and view.cancel():
        rows = views.results_rows(view.partial_metrics())
        return (view.status_html(), pd.DataFrame(rows, columns=views.RESULT_HEADERS),
                f"Stopped after {format_seconds(view.elapsed())}"
                + (": the methods that finished are in the results." if rows else "."))
    return gr.update(), gr.update(), gr.update()


def benchmark_pair_of(cfg: RunConfig) -> dict[str, Any] | None:
    """FedMITR beside dense inversion + KD in the bundled benchmark's cell for this setting, or None."""
    from fedmitr.bench import benchmark_pair, load_records, setting_name
    try:
        return benchmark_pair(load_records(ROOT / "assets" / "bench" / "bench.json"), setting_name(cfg), cfg.data.alpha)
    except ConfigError:
        return None


def bench_note(cfg: RunConfig) -> str:
    """How this run's setting did in the bundled benchmark, or why there is nothing to compare."""
    from fedmitr.bench import compare_with_benchmark, load_records, setting_name
    try:
        records = load_records(ROOT / "assets" / "bench" / "bench.json")
    except ConfigError:
        return "The bundled benchmark (`assets/bench/bench.json`) could not be read."
    line = compare_with_benchmark(records, setting_name(cfg), cfg.data.alpha)
    return line or (f"The benchmark has no {setting_name(cfg)} cells to compare this run with; it covers the cpu "
                    f"and cpu-49 presets on mnist5k (`assets/bench/bench.md`).")


def train_images(dataset: Any) -> tuple[Any, Any]:
    """The training split's pixels in [0, 1] and labels, for the privacy view."""
    return dataset.to_unit(dataset.train.images).numpy(), dataset.train.labels.numpy()


# --- how long a run will take ---------------------------------------------------------------------------

def estimate_seconds(cfg: RunConfig, reference: dict[str, Any] | None) -> float | None:
    """A rough wall-clock estimate of a run of ``cfg`` on this machine, from ``reference``: the
    ``metrics.json`` of a run recorded here (the example); the sum of
    :func:`app.timeline.stage_plan`. None when there is nothing to scale from."""
    plan = plan_of(cfg, reference)
    return None if plan is None else plan.total


def estimate_text(values: tuple, reference: dict[str, Any] | None) -> str:
    """The line under Run: about how long these settings take here (or nothing, for bad settings)."""
    try:
        cfg = form.FormValues.from_inputs(values).to_config()
    except ConfigError:
        return ""
    return estimate_line(cfg, plan_of(cfg, reference))


def estimate_line(cfg: RunConfig, plan: Plan | None) -> str:
    """About how long a run of ``cfg`` takes here, before it starts (nothing without a plan)."""
    if plan is None:
        return ""
    speed = ("" if SPEED.source == "not measured" else
             f" and this machine's speed, {SPEED.factor:.2g}× the recorded run's time from {SPEED.source}")
    return (f"About **{format_estimate(plan.total)}** on this machine (scaled from the recorded run{speed}; "
            f"{'the gpu preset needs a GPU, ' if cfg.preset == 'gpu' else ''}a rough estimate).")
