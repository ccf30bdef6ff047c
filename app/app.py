"""FedMITR in the browser: run one-shot federated learning end to end and watch every stage land.

    python app/app.py                     # http://127.0.0.1:7860
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app/app.py

The app only calls the library: it builds a RunConfig from the form, runs ``fedmitr.pipeline.run``
in a worker thread (:mod:`app.jobs`) and redraws the page from the pipeline's events
(:mod:`app.runview`, :mod:`app.views`). Nothing here touches the network at startup.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python app/app.py`: make the repository root importable, ahead of app/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import logging  # noqa: E402
import queue  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, fields  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402

from fedmitr.config import PRESETS, RELABEL_MODES  # noqa: E402
from fedmitr.data import BUNDLED  # noqa: E402
from fedmitr.data import ImageDataset  # noqa: E402
from fedmitr.errors import USER_ERRORS, ConfigError, excerpt, redact  # noqa: E402
from fedmitr.methods import METHODS  # noqa: E402
from fedmitr.runtime import DeviceInfo  # noqa: E402

from app import form, jobs, share, views  # noqa: E402
from app.runview import RunView, idle_status_html  # noqa: E402

log = logging.getLogger("fedmitr.app")
ROOT = Path(__file__).resolve().parent.parent  # the repository (the Space's files)

YIELD_EVERY_S = 0.5  # the most often the page is redrawn while a run streams events

INTRO = """
# FedMITR: one-shot federated learning with Vision Transformers
Several **clients** (think hospitals or phones) each train a small Vision Transformer on their own private images
and send the model, never the images, to a **server**, once. From those models alone the server *invents* images
(model inversion), optimises only the patches that matter (sparse inversion), gives every patch its own label
(token relabel), and teaches one **global model**, starting from the average of the clients, on them (distillation).
"""

TEXT = {
    "partition": "Each row is one client, each column a class: how many training images of that class the client "
                 "holds. A small skew α gives each client only a few classes. That is what makes federated "
                 "learning hard: no client has seen everything (non-IID data).",
    "clients": "Each bar is one client's own model, tested on every class. A client that saw few classes scores "
               "low. The lines combine the clients without seeing their data: **FedAvg** averages their weights, "
               "the **ensemble** averages their predictions (it needs all K models at test time; it is "
               "FedMITR's teacher).",
    "gallery": "The server never sees real images, so it optimises random noise until the clients' ensemble "
               "recognises a class in it. **Sparse inversion** stops optimising the patches the ensemble ignores "
               "(tinted: the colour says when) and spends the work on the rest: cheaper, and background noise "
               "stays out. One row per round. **Click an image** to see its relabel map.",
    "relabel": "**Information density** is each patch's share of the ensemble's attention (class token to patch, "
               "last block). The densest patches (outlined) are trained on the class the image was made for; the "
               "others get the ensemble's own soft label instead, so no patch is taught a class it does not show.",
    "curves": "After every round the global model is tested on real images it never trained on. Above FedAvg "
              "(dashed) means one model learned from the clients without any data; the ensemble (dotted) is "
              "the teacher and usually the ceiling.",
    "results": "Final test accuracy and server-side time of every method. Download the global model "
               "(safetensors) with the run's config and all its metrics.",
}

CSS = """
.gradio-container {max-width: 1500px !important; margin: auto;}
#intro p {font-size: 15px; line-height: 1.5; margin-top: 0.2em;}
#intro h1 {margin-bottom: 0.2em;}
.fm-explain p {font-size: 14px; color: var(--body-text-color-subdued); margin: 0 0 4px 0; line-height: 1.45;}
.fm-section h3 {margin: 6px 0 2px 0;}
.fm-status {border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px 14px;
  background: var(--background-fill-secondary);}
.fm-status-head {display: flex; justify-content: space-between; gap: 12px; font-size: 15px;}
.fm-status-head span {color: var(--body-text-color-subdued); white-space: nowrap;}
.fm-bar {height: 10px; background: #e5e7eb; border-radius: 5px; margin: 8px 0; overflow: hidden;}
.fm-bar > div {height: 100%; background: #d1495b; border-radius: 5px; transition: width 0.4s;}
.fm-state-done .fm-bar > div {background: #2a9d8f;}
.fm-state-cancelled .fm-bar > div, .fm-state-failed .fm-bar > div {background: #9ca3af;}
.fm-stages {display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 6px;}
.fm-stage {font-size: 13px; padding: 2px 10px; border-radius: 999px; border: 1px solid #d1d5db;}
.fm-done {background: #e6f4f1; border-color: #2a9d8f; color: #1d6f65;}
.fm-active {background: #fde8eb; border-color: #d1495b; color: #a3283a; font-weight: 600;}
.fm-todo {color: #6b7280;}
.fm-meta {font-size: 13px; color: var(--body-text-color-subdued);}
.fm-legend {display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 13px; margin: 2px 0 6px 0;}
.fm-chip {display: inline-flex; align-items: center; gap: 6px;}
.fm-swatch {display: inline-block; width: 14px; height: 14px; border-radius: 3px;}
#run-btn, #stop-btn {min-height: 44px; font-size: 16px;}
/* The gallery grows with its rounds (one row each) instead of a fixed, scrolling box. */
#gallery .grid-wrap {min-height: 120px !important; max-height: none !important; overflow-y: visible !important;}
"""


@dataclass
class Page:
    """The components a run updates (the outputs of the run event, in this order)."""

    status: Any
    partition_plot: Any
    clients_plot: Any
    gallery: Any
    gallery_method: Any
    legend: Any
    relabel_plot: Any
    curves_plot: Any
    bench_note: Any
    results: Any
    files: Any
    privacy_pair: Any
    privacy_text: Any
    share_method: Any
    try_method: Any
    log_box: Any
    view_state: Any
    gallery_index: Any

    def outputs(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]


# --- helpers --------------------------------------------------------------------------------------

def startup_device() -> DeviceInfo | None:
    """The device a run will use, as the pipeline will describe it (no network, no training)."""
    try:
        from fedmitr.runtime import describe_device, make_accelerator

        return describe_device(make_accelerator())
    except Exception as err:  # noqa: BLE001 - only a label; the run itself reports the real device
        log.warning("could not describe the device: %s", err)
        return None


def refuse(message: str, title: str = "Invalid settings") -> gr.Error:
    """A refusal shown to the user: credentials masked, and no traceback in the server's log."""
    return gr.Error(redact(message), title=title, print_exception=False)


def _config(values: tuple):
    """Form values -> RunConfig, or a refusal the user can act on (also when the Hub is needed but
    out of reach)."""
    try:
        cfg = form.FormValues.from_inputs(values).to_config()
        form.check_hub(cfg)
        return cfg
    except ConfigError as err:
        raise refuse(str(err)) from None


def _friendly(err: BaseException) -> str:
    if isinstance(err, USER_ERRORS):
        return str(err)
    return f"the run failed ({type(err).__name__}). The app is still up; try again or change the settings."


def check_data(cfg) -> ImageDataset | None:
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


def _session(request: gr.Request | None) -> str:
    return getattr(request, "session_hash", None) or "anonymous"


def _empty_outputs(device: str) -> tuple:
    return (
        idle_status_html(device),
        views.placeholder_figure("The partition appears when a run starts."),
        views.placeholder_figure("Client accuracies appear after local training."),
    )


# --- the page -------------------------------------------------------------------------------------

def build_demo() -> gr.Blocks:
    device = startup_device_label()
    knobs = form.FormValues()  # the cpu preset's
    status0, partition0, clients0 = _empty_outputs(device)

    with gr.Blocks(title="FedMITR: one-shot federated learning", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as demo:
        view_state = gr.State(None)  # this session's RunView
        gallery_index = gr.State([])  # gallery position -> (method, round position, image)

        gr.Markdown(INTRO, elem_id="intro")
        with gr.Tabs():
            with gr.Tab("Run FedMITR", id="run"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1, min_width=320, elem_id="controls"):
                        dataset = gr.Dropdown(label="Dataset", choices=form.dataset_choices(), value=knobs.dataset,
                                              allow_custom_value=True, elem_id="dataset")
                        clients = gr.Slider(label="Number of clients", minimum=form.MIN_CLIENTS,
                                            maximum=form.MAX_CLIENTS, step=1, value=knobs.clients, elem_id="clients")
                        alpha = gr.Dropdown(label="Label skew (Dirichlet α)", choices=form.SKEW_CHOICES, value=knobs.alpha,
                                            allow_custom_value=True, elem_id="alpha",
                                            info="Smaller α: fewer classes per client. Any number > 0, or iid.")
                        methods = gr.CheckboxGroup(label="Methods", choices=list(METHODS),
                                                   value=list(knobs.methods), elem_id="methods",
                                                   info="fedmitr is the method, fedavg and ensemble are "
                                                        "references, the others are ablations.")
                        high_token = gr.Button("Where FedMITR's premise holds: 49 tokens per image", size="sm",
                                               elem_id="high-token-btn")
                        with gr.Row():
                            run_btn = gr.Button("Run", variant="primary", elem_id="run-btn", scale=2, min_width=80)
                            stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1, min_width=80)
                        with gr.Accordion("What the methods are", open=False):
                            gr.Markdown("\n".join(f"- **{n}**: {s.summary}" for n, s in METHODS.items()))
                        with gr.Accordion("Advanced", open=False, elem_id="advanced"):
                            preset = gr.Radio(label="Preset", choices=list(PRESETS), value=knobs.preset, elem_id="preset",
                                              info="tiny: seconds (a smoke test); cpu: the demo, a few minutes "
                                                   "on 2 cores; gpu: paper-like, needs a GPU and the Hub.")
                            with gr.Row():
                                epochs = gr.Number(label="Local epochs", value=knobs.epochs, step=1,
                                                   minimum=1, elem_id="epochs")
                                rounds = gr.Number(label="Rounds", value=knobs.rounds, step=1, minimum=1,
                                                   elem_id="rounds")
                            with gr.Row():
                                iterations = gr.Number(label="Inversion iterations", value=knobs.iterations,
                                                       precision=0, minimum=1, elem_id="iterations")
                                images = gr.Number(label="Synthetic images / round", value=knobs.images,
                                                   precision=0, minimum=1, elem_id="images")
                            keep = gr.Slider(label="Keep ratio at each stop", minimum=0.05, maximum=1.0, step=0.05,
                                             value=knobs.keep, elem_id="keep",
                                             info="Share of still-active patches kept each time sparse "
                                                  "inversion stops patches.")
                            relabel = gr.Radio(label="Relabel of low-density patches",
                                               choices=[(form.RELABEL_HELP.get(m, m), m) for m in RELABEL_MODES],
                                               value=knobs.relabel, elem_id="relabel")
                            seed = gr.Number(label="Seed", value=knobs.seed, step=1, minimum=0, elem_id="seed")

                    with gr.Column(scale=3, min_width=640):
                        status = gr.HTML(status0, elem_id="status")
                        with gr.Row(equal_height=False):
                            with gr.Column(elem_classes="fm-section"):
                                gr.Markdown("### 1 · Who holds which data")
                                gr.Markdown(TEXT["partition"], elem_classes="fm-explain")
                                partition_plot = gr.Plot(partition0, show_label=False, elem_id="partition-plot")
                            with gr.Column(elem_classes="fm-section"):
                                gr.Markdown("### 2 · Each client alone vs. combined")
                                gr.Markdown(TEXT["clients"], elem_classes="fm-explain")
                                clients_plot = gr.Plot(clients0, show_label=False, elem_id="clients-plot")

                        with gr.Column(elem_classes="fm-section"):
                            gr.Markdown("### 3 · Synthetic images, invented from the client models")
                            gr.Markdown(TEXT["gallery"], elem_classes="fm-explain")
                            with gr.Row():
                                gallery_method = gr.Dropdown(label="Method", choices=[], value=None,
                                                             interactive=True, scale=1, min_width=200,
                                                             elem_id="gallery-method")
                                tint = gr.Checkbox(label="Tint stopped patches", value=True, scale=0, min_width=180,
                                                   elem_id="tint", info="Off: see the synthetic digit itself.")
                                legend = gr.HTML(_gallery_hint(), elem_id="gallery-legend", padding=False)
                            gallery = gr.Gallery(show_label=False, columns=8, height="auto", object_fit="contain",
                                                 allow_preview=False, elem_id="gallery",
                                                 buttons=["download", "fullscreen"])

                            with gr.Row(equal_height=False):
                                privacy_pair = gr.Image(label="Privacy check: the nearest real training image",
                                                        type="pil", interactive=False, height=220, scale=1,
                                                        elem_id="privacy-pair", buttons=[])
                                privacy_text = gr.Markdown(views.PRIVACY_HINT, elem_id="privacy-text",
                                                           elem_classes="fm-explain")

                        with gr.Column(elem_classes="fm-section"):
                            gr.Markdown("### 4 · Relabel map: what each patch is taught")
                            gr.Markdown(TEXT["relabel"], elem_classes="fm-explain")
                            relabel_plot = gr.Plot(
                                views.placeholder_figure("The relabel map appears with the first synthetic round.",
                                                         height=420),
                                show_label=False, elem_id="relabel-plot")

                        with gr.Row(equal_height=False):
                            with gr.Column(scale=1, elem_classes="fm-section"):
                                gr.Markdown("### 5 · Accuracy per round")
                                gr.Markdown(TEXT["curves"], elem_classes="fm-explain")
                                curves_plot = gr.Plot(views.accuracy_curves({}, {}, rounds=knobs.rounds),
                                                      show_label=False, elem_id="curves-plot")
                                bench_note = gr.Markdown(BENCH_HINT, elem_id="bench-note", elem_classes="fm-explain")
                            with gr.Column(scale=1, elem_classes="fm-section"):
                                gr.Markdown("### 6 · Results")
                                gr.Markdown(TEXT["results"], elem_classes="fm-explain")
                                results = gr.Dataframe(value=pd.DataFrame(columns=views.RESULT_HEADERS),
                                                       headers=views.RESULT_HEADERS, interactive=False, wrap=True,
                                                       show_label=False, elem_id="results",
                                                       column_widths=["26%", "22%", "14%", "38%"])
                                files = gr.File(label="Downloads: global model, config and metrics",
                                                file_count="multiple", interactive=False, elem_id="downloads")
                                gr.Markdown("These files are deleted when you close this tab (and after 6 hours "
                                            "at most): download what you want to keep.", elem_classes="fm-explain")
                                share_method = share.build_share_panel(view_state)
                        with gr.Accordion("Event log", open=False):
                            log_box = gr.Textbox(show_label=False, lines=12, max_lines=12, interactive=False,
                                                 autoscroll=True, elem_id="log")

            try_method = share.build_try_tab(view_state)

        page = Page(status=status, partition_plot=partition_plot, clients_plot=clients_plot, gallery=gallery,
                    gallery_method=gallery_method, legend=legend, relabel_plot=relabel_plot,
                    curves_plot=curves_plot, bench_note=bench_note, results=results, files=files,
                    privacy_pair=privacy_pair, privacy_text=privacy_text, share_method=share_method,
                    try_method=try_method, log_box=log_box,
                    view_state=view_state, gallery_index=gallery_index)
        inputs = {"dataset": dataset, "clients": clients, "alpha": alpha, "methods": methods, "preset": preset,
                  "epochs": epochs, "iterations": iterations, "images": images, "keep": keep, "relabel": relabel,
                  "rounds": rounds, "seed": seed}
        form_inputs = [inputs[name] for name in form.FormValues.names()]

        @form.with_form_parameters
        def run(request: gr.Request, progress=gr.Progress(), *values):
            yield from run_job(page, values, request, progress)

        # Run is not queued behind training: it checks the settings at once (a refusal takes well
        # under a second, whatever else runs), then waits for the device in the app's own line,
        # showing its place. preprocess=False hands the raw values to the form, so a bad value is
        # refused with its field's name rather than Gradio's "could not preprocess input N".
        run_event = run_btn.click(
            run, form_inputs, page.outputs(), api_name="run", concurrency_limit=None, preprocess=False,
            show_progress="full", show_progress_on=[status], trigger_mode="once",
            api_description="Run the one-shot pipeline with these settings and stream the page. `alpha` is a "
                            "number > 0 or 'iid' (null is refused). Invalid settings are refused at once.",
        )

        stop_btn.click(stop_job, [view_state], [status], cancels=[run_event], concurrency_limit=None,
                       api_visibility="private", show_progress="hidden")
        high_token.click(_high_token, None, [preset, methods], api_visibility="private", show_progress="hidden")
        preset.change(_preset_knobs, [preset], [inputs[name] for name in PRESET_KNOBS],
                      api_visibility="private", show_progress="hidden")
        dataset.input(_dataset_note, [dataset], None, api_visibility="private", show_progress="hidden")
        gallery_method.input(_show_method, [view_state, gallery_method],
                             [gallery, legend, relabel_plot, gallery_index],
                             api_visibility="private", show_progress="hidden")
        gallery.select(_select_image, [view_state, gallery_index], [relabel_plot, privacy_pair, privacy_text],
                       api_visibility="private", show_progress="hidden")
        tint.change(_set_tint, [view_state, gallery_method, tint], [gallery, relabel_plot, gallery_index],
                    api_visibility="private", show_progress="hidden")
        demo.unload(on_unload)
    return demo


def _gallery_hint() -> str:
    return ('<div class="fm-legend">Synthetic images appear here when an inversion method (e.g. fedmitr, '
            'dense-kd) runs.</div>')


# --- event handlers -------------------------------------------------------------------------------

_DEVICE: list[DeviceInfo | None] = []


def startup_device_label() -> str:
    """The device's one-line description, or "unknown"."""
    device = _startup_device_once()
    return str(device) if device is not None else "unknown"


def _startup_device_once() -> DeviceInfo | None:
    """:func:`startup_device`, computed once: creating an Accelerator resets accelerate's process-wide
    state, which must not happen while a job trains."""
    if not _DEVICE:
        _DEVICE.append(startup_device())
    return _DEVICE[0]


def run_job(page: "Page", values: tuple, request: gr.Request | None, progress):
    """Run the whole pipeline for this session and stream the page as its events arrive.

    The pipeline runs in a worker thread (``jobs.Job``); this generator drains its event queue,
    yields only the parts of the page that changed, and always stops the worker on the way out
    (finished, Stop pressed, tab closed or error).
    """
    session = _session(request)
    cfg = _config(values)
    dataset = check_data(cfg)
    if jobs.active_job(session) is not None:
        raise refuse("A run is already going in this browser tab. Press Stop first, or wait for it to finish.",
                     title="Busy")
    if jobs.DEVICE.waiting() >= jobs.MAX_WAITING:
        raise refuse(f"The app is busy: {jobs.DEVICE.waiting()} runs are waiting for the device. "
                     f"Try again in a few minutes.", title="Busy")
    device = _startup_device_once()
    if cfg.preset == "gpu" and (device is None or device.type != "cuda"):
        gr.Warning("The gpu preset fine-tunes a 224 px DeiT and is sized for a GPU; on this CPU it takes hours. "
                   "Press Stop and pick the cpu preset for a demo.")
    job = jobs.Job(cfg, jobs.new_run_dir(session), session, dataset=dataset)
    view = RunView(cfg)
    index: list = []
    shown_method: str | None = None
    try:
        job.start()
        progress(0.0, desc="waiting for the device")
        p = page
        yield {
            p.status: view.status_html(),
            p.partition_plot: views.placeholder_figure("Splitting the data…"),
            p.clients_plot: views.placeholder_figure("Client accuracies appear after local training."),
            p.gallery: [], p.gallery_method: gr.update(choices=[], value=None), p.legend: _gallery_hint(),
            p.relabel_plot: views.placeholder_figure("The relabel map appears with the first synthetic round.",
                                                     height=420),
            p.curves_plot: view.curves_chart(), p.results: pd.DataFrame(columns=views.RESULT_HEADERS),
            p.files: None, p.log_box: "", p.view_state: view, p.gallery_index: index,
        }
        dirty: set[str] = set()
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
            if not job.started_on_device.is_set():
                view.queue_position = job.queue_position()
                dirty.add("status")
            else:
                view.queue_position = 0
            progress(view.fraction(), desc=f"{view.stage or 'waiting for the device'}")
            update, shown_method, index = _render(page, view, dirty | {"status"}, shown_method, index)
            yield update
            dirty, last_yield = set(), now

        if job.error is not None:
            view.state = "failed"
            view._log(f"failed: {job.error}")
            yield {page.status: view.status_html(), page.log_box: "\n".join(view.log)}
            if not isinstance(job.error, USER_ERRORS):
                log.error("run failed", exc_info=job.error)
            raise refuse(_friendly(job.error), title="Run failed")
        if job.cancelled:
            view.state = "cancelled"
            yield {page.status: view.status_html(), page.log_box: "\n".join(view.log)}
            return
        view.state = "done"
        view.metrics = job.metrics
        view.files = _run_files(job.out_dir)
        view.out_dir = str(job.out_dir)
        if job.dataset is not None:  # bundled data, loaded by the check: the privacy view needs its images
            view.load_privacy(*share.train_images(job.dataset))
        update, shown_method, index = _render(page, view, dirty | {"status", "partition", "clients", "curves",
                                                                  "gallery", "final"}, shown_method, index)
        yield update
    finally:
        # On Stop or a closed tab Gradio runs this on its event loop: signal the worker and return.
        # The worker stops within one step, releases the device and unregisters itself.
        job.cancel()


def _render(c: "Page", view: RunView, dirty: set[str], shown_method: str | None, index: list):
    """The page updates for the parts in ``dirty``; also returns the gallery's method and index."""
    update: dict[Any, Any] = {c.view_state: view}
    if "status" in dirty:
        update[c.status] = view.status_html()
        update[c.log_box] = "\n".join(view.log[-400:])
    if "partition" in dirty and view.class_counts is not None:
        update[c.partition_plot] = views.partition_heatmap(view.class_counts, view.class_names)
    if "clients" in dirty:
        update[c.clients_plot] = view.client_chart()
    if "curves" in dirty:
        update[c.curves_plot] = view.curves_chart()
    if "gallery" in dirty and view.rounds:
        # Follow the method that is running; at the end show the method itself. The dropdown picks any.
        shown_method = list(view.rounds)[-1]
        if "final" in dirty and "fedmitr" in view.rounds:
            shown_method = "fedmitr"
        items, index = view.gallery_items(shown_method)
        update[c.gallery] = items
        update[c.gallery_method] = gr.update(choices=view.gallery_methods(), value=shown_method)
        update[c.legend] = view.legend_html(shown_method)
        update[c.relabel_plot] = view.relabel_figure(shown_method)
        update[c.gallery_index] = index
    if "final" in dirty and view.metrics is not None:
        update[c.results] = pd.DataFrame(views.results_rows(view.metrics), columns=views.RESULT_HEADERS)
        models = view.global_models()
        first = "fedmitr" if "fedmitr" in models else (models[0] if models else None)
        update[c.share_method] = gr.update(choices=models, value=first)
        update[c.try_method] = gr.update(choices=models, value=first)
        update[c.privacy_pair], update[c.privacy_text] = view.privacy_view(shown_method)
        update[c.bench_note] = bench_note(view.cfg)
        update[c.files] = view.files or None
    return update, shown_method, index



def _run_files(out_dir: Path) -> list[str]:
    """The run's downloads: global model checkpoint(s) first, then config and metrics."""
    found = sorted((out_dir / "models").glob("*.safetensors")) if (out_dir / "models").is_dir() else []
    # The method's model first, then the other global models.
    found.sort(key=lambda p: (p.stem != "fedmitr", p.stem))
    found += [p for p in (out_dir / "config.json", out_dir / "metrics.json") if p.exists()]
    return [str(p) for p in found]


def stop_job(view: RunView | None, request: gr.Request):
    """Stop this session's job, waiting or running (Gradio also cancels the run event). Never waits."""
    jobs.cancel_session(_session(request))
    if view is not None and view.state == "running":
        view.state = "cancelled"
        return view.status_html()
    return gr.update()


PRESET_KNOBS = ("epochs", "iterations", "images", "keep", "relabel", "rounds", "seed")  # follow the preset
HIGH_TOKEN_PRESET = "cpu-49"
BENCH_HINT = ("After a run, this says how FedMITR did against dense inversion + KD in the benchmark's matching "
              "setting (`assets/bench/bench.md`).")


def _high_token():
    """One click to the setting where sparse inversion's premise holds, with the methods to compare."""
    return HIGH_TOKEN_PRESET, ["fedavg", "ensemble", "dense-kd", "fedmitr"]


def bench_note(cfg) -> str:
    """How this run's setting did in the bundled benchmark, or why there is nothing to compare."""
    from fedmitr.bench import compare_with_benchmark, load_records, setting_name
    try:
        records = load_records(ROOT / "assets" / "bench" / "bench.json")
    except ConfigError:
        return "The bundled benchmark (`assets/bench/bench.json`) could not be read."
    line = compare_with_benchmark(records, setting_name(cfg), cfg.data.alpha)
    return line or (f"The benchmark has no {setting_name(cfg)} cells to compare this run with; it covers the cpu "
                    f"and cpu-49 presets on mnist5k (`assets/bench/bench.md`).")


def _preset_knobs(preset: str):
    try:
        knobs = form.FormValues.for_preset(preset)
    except ConfigError as err:
        raise refuse(str(err)) from None
    return tuple(getattr(knobs, name) for name in PRESET_KNOBS)


def _dataset_note(dataset: str) -> None:
    if form.is_hub_dataset(dataset or ""):
        if form.hub_offline():
            gr.Warning(f"{excerpt(dataset)} comes from the Hugging Face Hub, and this app runs offline. "
                       f"Choose a bundled dataset ({', '.join(BUNDLED)}).")
        else:
            gr.Info(f"{excerpt(dataset)} comes from the Hugging Face Hub: the first run downloads it.")


def _show_method(view: RunView | None, method: str | None):
    if view is None or method is None:
        return [], _gallery_hint(), gr.update(), []
    items, index = view.gallery_items(method)
    return items, view.legend_html(method), view.relabel_figure(method), index


def _set_tint(view: RunView | None, method: str | None, tint: bool):
    """The "tint stopped patches" switch: redraw the gallery and the relabel map with or without it."""
    if view is None:
        return gr.update(), gr.update(), gr.update()
    view.tint = bool(tint)
    items, index = view.gallery_items(method)
    return items, view.relabel_figure(method), index


def _select_image(view: RunView | None, index: list, evt: gr.SelectData):
    if view is None or evt.index is None or not index:
        return gr.update(), gr.update(), gr.update()
    position = evt.index if isinstance(evt.index, int) else evt.index[0]
    if not 0 <= position < len(index):
        return gr.update(), gr.update(), gr.update()
    method, round_pos, image = index[position]
    picture, text = view.privacy_view(method, round_pos, image)
    return view.relabel_figure(method, round_pos, image), picture, text


def on_unload(request: gr.Request):
    """A tab closed: stop its job and delete its run directories once the worker has let go."""
    session = _session(request)
    job = jobs.active_job(session)
    if job is not None:
        job.cancel()

    def tidy() -> None:
        if job is not None:
            job.join(timeout=60)
        jobs.delete_session_runs(session)

    threading.Thread(target=tidy, name="fedmitr-unload", daemon=True).start()


# --- launch ---------------------------------------------------------------------------------------

def theme() -> gr.themes.Base:
    return gr.themes.Soft(primary_hue="rose", neutral_hue="slate",
                          font=[gr.themes.Font("system-ui"), "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=[gr.themes.Font("ui-monospace"), "monospace"])


def create_app() -> gr.Blocks:
    """The app with its queue configured: the object tests launch, and `main` serves."""
    demo = build_demo()
    demo.queue(max_size=64, default_concurrency_limit=1)
    return demo


def launch_kwargs() -> dict[str, Any]:
    """Arguments for ``demo.launch``. Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
    (Gradio reads them itself; the default port is 7860)."""
    return dict(theme=theme(), css=CSS, allowed_paths=[str(jobs.runs_root())], show_error=True)


def training_threads(cores: int | None = None) -> int:
    """Torch threads for training jobs: ``$FEDMITR_THREADS``, else every core but one when there are
    more than 2 (the web server keeps one), else every core.

    On 2 cores (the free Space) the server mostly idles between requests, and the tiny models train
    noticeably faster on 2 threads; the page still answers in well under a second (README).
    """
    value = os.environ.get("FEDMITR_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise SystemExit(f"FEDMITR_THREADS must be a whole number >= 1 (got {excerpt(value)})")
        return int(value)
    cores = cores or os.cpu_count() or 1
    return cores - 1 if cores > 2 else cores


class RedactingFormatter(logging.Formatter):
    """Log lines (tracebacks included) with anything that looks like a Hub token masked."""

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


def main() -> None:
    import torch

    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter("%(asctime)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    torch.set_num_threads(training_threads())
    log.info("training jobs use %d torch thread(s)", torch.get_num_threads())
    jobs.cleanup_runs()
    create_app().launch(**launch_kwargs())


if __name__ == "__main__":
    main()
