"""FedMITR in the browser: run one-shot federated learning end to end and watch every stage land.

    python app/app.py                     # http://127.0.0.1:7860
    GRADIO_SERVER_NAME=0.0.0.0 GRADIO_SERVER_PORT=8080 python app/app.py

The app only calls the library. This file is the entry point: it builds the page
(:mod:`app.layout`), wires its events, and launches. A run is streamed by :mod:`app.stream`,
in a worker thread of :mod:`app.jobs`, into a :class:`~app.runview.RunView` drawn by
:mod:`app.views`. Nothing here touches the network at startup.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python app/app.py`: make the repository root importable, ahead of app/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from app import zerogpu  # noqa: E402, F401 - first: it imports `spaces` (ZeroGPU) before anything imports torch

import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402
from typing import Any  # noqa: E402

import gradio as gr  # noqa: E402

from fedmitr.errors import USER_ERRORS, ConfigError, excerpt, redact  # noqa: E402
from fedmitr.catalog import BUNDLED, is_hub_dataset  # noqa: E402

from app import form, jobs, replay, stream  # noqa: E402
from app.layout import CSS, JS, Page, build_page, gallery_hint  # noqa: E402
from app.runview import RunView  # noqa: E402

__all__ = ["Page", "available_cores", "build_demo", "client_workers", "create_app", "launch_kwargs", "main", "training_threads"]

log = logging.getLogger("fedmitr.app")

PRESET_KNOBS = ("epochs", "iterations", "images", "keep", "relabel", "rounds", "seed", "init")  # follow the preset


def build_demo() -> gr.Blocks:
    with gr.Blocks(title="FedMITR: one-shot federated learning", analytics_enabled=False,
                   delete_cache=(1800, 3600)) as demo:
        page, controls = build_page(stream.startup_device_label())
        example = replay.example_view()  # the recorded run every visitor sees first

        def show_example():
            """On arrival: every panel shows the recorded example. It is drawn from the one example
            (whose gallery thumbnails are then made once for everyone); the session keeps a copy,
            which a visitor's clicks change."""
            if example is None:
                return {}
            return {**replay.page_update(page, example), page.view_state: copy.deepcopy(example)}

        demo.load(show_example, None, page.outputs(), api_visibility="private", show_progress="hidden")

        reference = example.metrics if example is not None else None  # a run recorded on this kind of machine

        def estimate(*values):
            return stream.estimate_text(values, reference)

        for component in controls.form_inputs():
            component.change(estimate, controls.form_inputs(), [controls.estimate], queue=False,
                             api_visibility="private", show_progress="hidden")
        demo.load(estimate, controls.form_inputs(), [controls.estimate], queue=False, api_visibility="private",
                  show_progress="hidden")

        def replay_shared(ref: str):
            """A recorded run's whole page (the example, or a shared checkpoint's run), on the Run tab."""
            try:
                view = replay.replay_ref(ref)
            except USER_ERRORS as err:
                raise stream.refuse(str(err), title="Cannot replay") from None
            return {**replay.page_update(page, view), controls.tabs: gr.Tabs(selected="run")}

        controls.try_tab.replay.click(replay_shared, [controls.try_tab.replay_ref], [*page.outputs(), controls.tabs],
                                      api_visibility="private", show_progress="minimal")

        @form.with_form_parameters
        async def run(request: gr.Request, *values):
            started: list = []  # this run's job, once made: a cancel stops it at once
            updates = stream.run_job(page, values, request, reference=reference, started=started)
            async for update in stream.cancellable(updates, lambda: [job.cancel() for job in started]):
                yield update

        # Run is not queued behind training: it checks the settings at once (a refusal takes well
        # under a second, whatever else runs), then waits for the device in the app's own line,
        # showing its place. preprocess=False hands the raw values to the form, so a bad value is
        # refused with its field's name rather than Gradio's "could not preprocess input N". The
        # status card is the one progress display: Gradio's own overlay (and the pulsing borders of
        # every output) would be drawn on top of it, by the browser, for the whole run.
        run_event = controls.run_btn.click(
            run, controls.form_inputs(), page.outputs(), api_name="run", concurrency_limit=None, preprocess=False,
            show_progress="hidden", trigger_mode="once",
            api_description="Run the one-shot pipeline with these settings and stream the page. `alpha` is a "
                            "number > 0 or 'iid' (null is refused). Invalid settings are refused at once.",
        )
        quiet: dict[str, Any] = dict(api_visibility="private", show_progress="hidden")
        controls.stop_btn.click(stream.stop_job, [page.view_state], [page.status, page.results, page.estimate],
                                cancels=[run_event],
                                concurrency_limit=None, **quiet)
        # The 49-token switch sets the preset and the methods (turned off: the 16-token defaults);
        # the preset, however chosen, sets its knobs and the switch.
        controls.high_token.input(high_token, [controls.high_token],
                                  [controls.inputs["preset"], controls.inputs["methods"]], **quiet)
        controls.inputs["preset"].change(preset_knobs, [controls.inputs["preset"]],
                                         [*(controls.inputs[name] for name in PRESET_KNOBS), controls.high_token],
                                         **quiet)
        controls.inputs["dataset"].input(dataset_note, [controls.inputs["dataset"]], None, **quiet)
        page.gallery_method.input(show_method, [page.view_state, page.gallery_method],
                                  [page.gallery, page.legend, page.relabel_plot, page.relabel_summary,
                                   page.gallery_index], **quiet)
        page.gallery.select(select_image, [page.view_state, page.gallery_index],
                            [page.relabel_plot, page.privacy_pair, page.privacy_text], **quiet)
        controls.tint.change(set_tint, [page.view_state, page.gallery_method, controls.tint],
                             [page.gallery, page.relabel_plot, page.gallery_index], **quiet)
        demo.unload(on_unload)
    return demo


# --- small handlers -------------------------------------------------------------------------------

def high_token(on: bool):
    """The 49-token switch: on, the setting where sparse inversion's premise holds, with the methods
    to compare there (:data:`app.form.HIGH_TOKEN_METHODS`); off, the 16-token defaults again."""
    try:
        return form.high_token_settings(bool(on))
    except ConfigError as err:
        raise stream.refuse(str(err), title="Cannot switch") from None


def preset_knobs(preset: str):
    """The knobs of the chosen preset, and the 49-token switch on exactly for its preset."""
    try:
        knobs = form.FormValues.for_preset(preset)
    except ConfigError as err:
        raise stream.refuse(str(err)) from None
    return (*(getattr(knobs, name) for name in PRESET_KNOBS), preset == form.HIGH_TOKEN_PRESET)


def dataset_note(dataset: str) -> None:
    if is_hub_dataset(dataset or ""):
        if form.hub_offline():
            gr.Warning(f"{excerpt(dataset)} comes from the Hugging Face Hub, and this app runs offline. "
                       f"Choose a bundled dataset ({', '.join(BUNDLED)}).")
        else:
            gr.Info(f"{excerpt(dataset)} comes from the Hugging Face Hub: the first run downloads it.")


def show_method(view: RunView | None, method: str | None):
    if view is None or method is None:
        return [], gallery_hint(), gr.update(), "", []
    items, index = view.gallery_items(method)
    return items, view.legend_html(method), view.relabel_figure(method), view.relabel_summary(method), index


def set_tint(view: RunView | None, method: str | None, tint: bool):
    """The "tint stopped patches" switch: redraw the gallery and the relabel map with or without it."""
    if view is None:
        return gr.update(), gr.update(), gr.update()
    view.set_tint(tint)
    items, index = view.gallery_items(method)
    return items, view.relabel_figure(method), index


def select_image(view: RunView | None, index: list, evt: gr.SelectData):
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
    session = stream.session_of(request)
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
    """Soft, with every text at WCAG AA contrast (4.5:1) on its background: the theme's subdued grey
    (explanations, field hints) and its rose labels on pale rose fall short of it."""
    return gr.themes.Soft(primary_hue="rose", neutral_hue="slate",
                          font=[gr.themes.Font("system-ui"), "Segoe UI", "Roboto", "sans-serif"],
                          font_mono=[gr.themes.Font("ui-monospace"), "monospace"]).set(
        body_text_color_subdued="*neutral_600", block_label_text_color="*primary_700",
        block_title_text_color="*primary_700")


def create_app() -> gr.Blocks:
    """The app with its queue configured: the object tests launch, and `main` serves."""
    demo = build_demo()
    demo.queue(max_size=64, default_concurrency_limit=1)
    return demo


def launch_kwargs() -> dict[str, Any]:
    """Arguments for ``demo.launch``. Host and port come from GRADIO_SERVER_NAME / GRADIO_SERVER_PORT
    (Gradio reads them itself; the default port is 7860)."""
    return dict(theme=theme(), css=CSS, js=JS, allowed_paths=[str(jobs.runs_root()), str(replay.EXAMPLE)],
                show_error=True)


def training_threads(cores: int | None = None) -> int:
    """Torch threads for a training job's own process (the server's work): ``$FEDMITR_THREADS``, else
    every core but one (the web server and the page keep one), at least one.

    On 2 cores (the free Space) a second torch thread made the server's work twice as slow in the
    app, not faster: whenever the web server encodes an update, one of torch's two threads waits for
    a core and the other spins. The clients still use both cores (:func:`client_workers`).
    """
    if (value := _count_from_env("FEDMITR_THREADS")) is not None:
        return value
    return max(1, (cores or available_cores()) - 1)


def client_workers(cores: int | None = None) -> int:
    """Clients trained side by side on a CPU, one thread each (``$FEDMITR_CLIENT_WORKERS``, else
    every core on 2 cores, every core but one above): worker processes that wait for a core do not
    slow each other as torch's threads do."""
    if (value := _count_from_env("FEDMITR_CLIENT_WORKERS")) is not None:
        return value
    cores = cores or available_cores()
    return cores - 1 if cores > 2 else cores


def available_cores() -> int:
    """The cores this process may run on: its CPU affinity (``taskset``, a container's cpuset), not
    every core of the machine as ``os.cpu_count`` says."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _count_from_env(name: str) -> int | None:
    """``$name`` as a whole number >= 1, None when unset; anything else stops the app, saying why."""
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise SystemExit(f"{name} must be a whole number >= 1 (got {excerpt(value)})")
    return int(value)


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
    os.environ["FEDMITR_CLIENT_WORKERS"] = str(client_workers())  # read by fedmitr.clients.client_workers
    log.info("training jobs use %d torch thread(s), clients %s at a time", torch.get_num_threads(),
             os.environ["FEDMITR_CLIENT_WORKERS"])
    jobs.cleanup_runs()
    try:  # this machine's speed, once (about a second), for the estimate under Run
        stream.calibrate(json.loads((replay.EXAMPLE / "recorded.json").read_text()))
    except (OSError, ValueError) as err:
        log.warning("no speed probe: %s", err)
    create_app().launch(**launch_kwargs())


if __name__ == "__main__":
    main()
