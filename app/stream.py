"""One session's run, streamed to the page: check the settings, wait for the device, fold the
pipeline's events into the session's :class:`~app.runview.RunView`, and redraw what changed.

The pipeline runs in a worker thread (:class:`app.jobs.Job`); :func:`run_job` is the Gradio
generator that drains its events. It never blocks Gradio's event loop: it waits on the job's
queue with a short timeout, and on the way out (finished, Stop, tab closed, error) it only
signals the worker.
"""

from __future__ import annotations

import logging
import queue
import time
from pathlib import Path
from typing import Any

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
from app.layout import RELABEL_PLACEHOLDER, Page, gallery_hint
from app.runview import RunView

log = logging.getLogger("fedmitr.app")
ROOT = Path(__file__).resolve().parent.parent  # the repository (the Space's files)

YIELD_EVERY_S = 0.5  # the most often the page is redrawn while a run streams events
_DEVICE: list[DeviceInfo | None] = []


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


def run_job(page: Page, values: tuple, request: gr.Request | None, progress):
    """Run the whole pipeline for this session and stream the page as its events arrive."""
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
    view = RunView(cfg)
    index: list = []
    try:
        job.start()
        progress(0.0, desc="waiting for the device")
        yield {
            page.status: view.status_html(),
            page.partition_plot: views.placeholder_figure("Splitting the data…"),
            page.clients_plot: views.placeholder_figure("Client accuracies appear after local training."),
            page.gallery: [], page.gallery_method: gr.update(choices=[], value=None), page.legend: gallery_hint(),
            page.relabel_plot: views.placeholder_figure(RELABEL_PLACEHOLDER, height=420), page.relabel_summary: "",
            page.curves_plot: view.curves_chart(), page.results: pd.DataFrame(columns=views.RESULT_HEADERS),
            page.files: None, page.log_box: "", page.view_state: view, page.gallery_index: index,
        }
        dirty: set[str] = set()
        logged = 0  # log lines already on the page
        last_yield = time.monotonic()
        finished = False
        while not finished:
            try:
                event = job.events.get(timeout=0.2)
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
            now = time.monotonic()
            urgent = bool(dirty & {"partition", "gallery"})
            if finished or not (urgent or now - last_yield >= YIELD_EVERY_S):
                continue
            view.waiting(0 if job.started_on_device.is_set() else job.queue_position())
            if len(view.log) != logged:
                dirty.add("log")
                logged = len(view.log)
            progress(view.fraction(), desc=f"{view.stage or 'waiting for the device'}")
            update, index = render(page, view, dirty | {"status"}, index)
            yield update
            dirty, last_yield = set(), now

        if job.error is not None:
            view.fail(str(job.error))
            yield {page.status: view.status_html(), page.log_box: "\n".join(view.log)}
            if not isinstance(job.error, USER_ERRORS):
                log.error("run failed", exc_info=job.error)
            raise refuse(_friendly(job.error), title="Run failed")
        if job.cancelled:
            view.cancel()
            yield {page.status: view.status_html(), page.log_box: "\n".join(view.log)}
            return
        run_dir = RunDir(job.out_dir)
        first = headline().name  # the method's own model is offered first
        view.finish(job.metrics, out_dir=str(job.out_dir), files=[str(p) for p in run_dir.downloads()],
                    models=sorted(run_dir.global_models(), key=lambda m: m != first))
        if job.dataset is not None:  # bundled data, loaded by the check: the privacy view shows real images
            view.attach_training_images(*train_images(job.dataset))
        update, index = render(page, view, dirty | {"status", "partition", "clients", "curves", "gallery", "final"},
                               index)
        yield update
    finally:
        # On Stop or a closed tab Gradio runs this on its event loop: signal the worker and return.
        # The worker stops within one step, releases the device and unregisters itself.
        job.cancel()


def render(page: Page, view: RunView, dirty: set[str], index: list) -> tuple[dict[Any, Any], list]:
    """The page updates for the parts in ``dirty``; also returns the gallery's index."""
    update: dict[Any, Any] = {page.view_state: view}
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
        first = view.models[0] if view.models else None
        update[page.share_method] = gr.update(choices=view.models, value=first)
        update[page.try_method] = gr.update(choices=view.models, value=first)
        update[page.privacy_pair], update[page.privacy_text] = view.privacy_view(shown)
        update[page.bench_note] = bench_note(view.cfg)
        update[page.files] = view.files or None
    return update, index


def stop_job(view: RunView | None, request: gr.Request):
    """Stop this session's job, waiting or running (Gradio also cancels the run event). Never waits."""
    jobs.cancel_session(session_of(request))
    if view is not None and view.cancel():
        return view.status_html()
    return gr.update()


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
    ``metrics.json`` of a run recorded here (the example). Each stage's seconds per unit of work
    (client steps, inversion image-iterations, distillation steps) scale with the work ``cfg`` asks
    for and with the tokens per image; None when there is nothing to scale from."""
    from fedmitr.clients import client_steps
    from fedmitr.methods import METHODS

    if not reference or "seconds" not in reference:
        return None
    ref_cfg = reference["config"]
    ref_tokens = ref_cfg["model"]["patch_grid"] ** 2 + 1
    tokens = cfg.model.patch_grid ** 2 + 1 if cfg.model.arch == "scratch" else 197
    width = (cfg.model.embed_dim / ref_cfg["model"]["embed_dim"]) ** 2 * cfg.model.depth / ref_cfg["model"]["depth"]
    scale = width * tokens / ref_tokens
    n = reference["dataset"]["num_train"]
    ref_steps = sum(client_steps(c["num_samples"], _clients_cfg(ref_cfg)) for c in reference["clients"])
    steps = client_steps(n // cfg.data.num_clients, cfg.clients) * cfg.data.num_clients
    seconds = reference["seconds"]["clients"] * steps / max(1, ref_steps) * scale
    per_method = {name: m for name, m in reference["methods"].items() if "stage_seconds" in m}
    for name in cfg.methods:
        spec = METHODS.get(name)
        if spec is None or not spec.synthesises:  # an average or an evaluation: about what it took there
            seconds += reference["methods"].get(name, {}).get("seconds", 0.5)
            continue
        like = next((m for n_, m in per_method.items() if METHODS.get(n_) and METHODS[n_].sparse == spec.sparse), None)
        like = like or next(iter(per_method.values()), None)
        if like is None:
            return None
        ref_rounds = len(like["curve"])
        inv = ref_cfg["inversion"]
        work = cfg.distill.rounds * cfg.inversion.images_per_round * cfg.inversion.iterations
        ref_work = ref_rounds * inv["images_per_round"] * inv["iterations"]
        st = like["stage_seconds"]
        seconds += st["inversion"] * work / ref_work * scale
        seconds += st["distill"] * (cfg.distill.rounds * cfg.distill.steps_per_round) / max(
            1, ref_rounds * ref_cfg["distill"]["steps_per_round"]) * scale
        seconds += (st["relabel"] + st["evaluate"]) * cfg.distill.rounds / ref_rounds * scale
    return seconds


def _clients_cfg(recorded: dict[str, Any]):
    from fedmitr.config import ClientTrainConfig

    return ClientTrainConfig(**recorded["clients"])


def estimate_text(values: tuple, reference: dict[str, Any] | None) -> str:
    """The line under Run: about how long these settings take here (or nothing, for bad settings)."""
    try:
        cfg = form.FormValues.from_inputs(values).to_config()
    except ConfigError:
        return ""
    seconds = estimate_seconds(cfg, reference)
    if seconds is None:
        return ""
    minutes, rest = divmod(int(round(seconds / 10) * 10), 60)
    when = f"{minutes} min {rest:02d} s" if minutes else f"{rest} s"
    return (f"About **{when}** on this machine (scaled from the recorded run; "
            f"{'the gpu preset needs a GPU, ' if cfg.preset == 'gpu' else ''}a rough estimate).")
