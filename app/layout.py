"""The page: every component of the app, laid out, and the texts that explain each part.

:func:`build_page` is called inside a ``gr.Blocks`` context and returns the components in two
groups: :class:`Page`, what a run updates (the outputs of the run event, in this order), and
:class:`Controls`, what the visitor uses (the form's inputs, the buttons, the gallery's controls).
The wiring of events is in :mod:`app.app`, the streaming of a run in :mod:`app.stream`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import gradio as gr
import pandas as pd

from fedmitr.config import PRESETS, RELABEL_MODES
from fedmitr.methods import METHODS, headline

from app import form, share, views
from app.runview import idle_status_html

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
               "stays out. A stopped patch is then filled with the data's background (black for digits), so "
               "the global model learns from whole images laid out as real test images are: a background around "
               "the patches that carry the class (they still do not look like digits to a person). One row per "
               "round. "
               "**Click an image** to see its relabel map.",
    "relabel": "**Information density** is each patch's share of the ensemble's attention (class token to patch, "
               "last block), measured on the patches sparse inversion kept (a stopped patch, ×, has none). The "
               "densest patches (outlined, H) are trained on the class the image was made for; the other kept "
               "patches get the ensemble's own soft label instead, so no patch is taught a class it does not "
               "show. Stopped patches (hatched) were filled with the background: they teach the ensemble's label "
               "of the background, or nothing. **The summary under the map says what this run actually taught**, "
               "including when it relabelled nothing (H as large as the kept set). Hover a patch to see what it "
               "was taught and why.",
    "curves": "After every round the global model is tested on real images it never trained on. Above FedAvg "
              "(dashed) means one model learned from the clients without any data; the ensemble (dotted) is "
              "the teacher and usually the ceiling.",
    "results": "Final test accuracy and server-side time of every method. Download the global model "
               "(safetensors) with the run's config and all its metrics.",
}
ROLE_WORDS = {"method": ("the method", "the method"), "baseline": ("a baseline", "baselines"),
              "ablation": ("an ablation", "ablations"), "reference": ("the reference", "references")}

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
.fm-todo {color: #4b5563;}
.fm-meta {font-size: 13px; color: var(--body-text-color-subdued);}
.fm-legend {display: flex; flex-wrap: wrap; gap: 6px 16px; font-size: 13px; margin: 2px 0 6px 0;}
.fm-chip {display: inline-flex; align-items: center; gap: 6px;}
.fm-swatch {display: inline-block; width: 14px; height: 14px; border-radius: 3px;}
#run-btn, #stop-btn {min-height: 44px; font-size: 16px;}
/* Captions are drawn under each thumbnail; Gradio's own caption strip would cover a patch. */
#gallery .caption-label, #try-gallery .caption-label {display: none;}
/* The gallery grows with its rounds (one row each) instead of a fixed, scrolling box. */
#gallery .grid-wrap {min-height: 120px !important; max-height: none !important; overflow-y: visible !important;}
"""

# Gradio gives gallery thumbnails an empty alt and the caption as their title: copy it over.
JS = """
() => {
  const label = () => document.querySelectorAll('.thumbnail-item img[title], .thumbnail-item img').forEach(img => {
    const title = img.getAttribute('title') || img.closest('[title]')?.getAttribute('title');
    if (title && img.alt !== title) img.alt = title;
  });
  new MutationObserver(label).observe(document.body, {subtree: true, childList: true, attributes: true});
}
"""

RELABEL_PLACEHOLDER = "The relabel map appears with the first synthetic round."
BENCH_HINT = ("After a run, this says how FedMITR did against dense inversion + KD in the benchmark's matching "
              "setting (`assets/bench/bench.md`).")


@dataclass(kw_only=True)
class Page:
    """The components a run updates (the outputs of the run event, in this order)."""

    status: Any
    partition_plot: Any
    clients_plot: Any
    gallery: Any
    gallery_method: Any
    legend: Any
    relabel_plot: Any
    relabel_summary: Any
    curves_plot: Any
    bench_note: Any
    results: Any
    results_note: Any
    files: Any
    privacy_pair: Any
    privacy_text: Any
    share_method: Any
    try_method: Any
    log_box: Any
    view_state: Any
    gallery_index: Any
    estimate: Any  # the line under Run: the estimate before a run, what it took after

    def outputs(self) -> list:
        return [getattr(self, f.name) for f in fields(self)]


@dataclass(kw_only=True)
class Controls:
    """What the visitor uses: the form's inputs by field name, and the buttons and switches."""

    inputs: dict[str, Any]
    run_btn: Any
    stop_btn: Any
    high_token: Any
    tint: Any
    estimate: Any = None  # how long a run with the form's settings takes here
    try_tab: Any = None  # app.share.TryTab
    tabs: Any = None  # the page's tabs ("run", "try")

    def form_inputs(self) -> list:
        """The inputs in :class:`app.form.FormValues` order (what the run event takes)."""
        return [self.inputs[name] for name in form.FormValues.names()]


def methods_info(listed: list[str] | None = None) -> str:
    """What each method of ``listed`` (default: all) is, by role: "fedmitr is the method; fedavg and
    dense-kd are baselines; ..."."""
    parts = []
    for role in ("method", "baseline", "ablation", "reference"):
        names = [n for n, m in METHODS.items() if m.role == role and (listed is None or n in listed)]
        if names:
            said = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
            parts.append(f"{said} {'is' if len(names) == 1 else 'are'} {ROLE_WORDS[role][len(names) > 1]}")
    return "; ".join(parts) + "."


def more_methods_info() -> str:
    """The Advanced list's help: which are the paper's baselines, what they cost, and the ablations."""
    baselines = [n for n in form.more_methods() if METHODS[n].role == "baseline"]
    named = " and ".join(f"{n} is {METHODS[n].label}" for n in baselines)
    return (f"{named}: the baselines FedMITR's paper compares against, opt-in because each takes several times "
            f"FedMITR's server time. " + methods_info([n for n in form.more_methods() if n not in baselines]))


def gallery_hint() -> str:
    return (f'<div class="fm-legend">Synthetic images appear here when an inversion method (e.g. {headline().name}) '
            f'runs.</div>')


def _controls_column(knobs: form.FormValues) -> Controls:
    dataset = gr.Dropdown(label="Dataset", choices=form.dataset_choices(), value=knobs.dataset,
                          allow_custom_value=True, elem_id="dataset")
    clients = gr.Slider(label="Number of clients", minimum=form.MIN_CLIENTS, maximum=form.MAX_CLIENTS, step=1,
                        value=knobs.clients, elem_id="clients")
    alpha = gr.Dropdown(label="Label skew (Dirichlet α)", choices=form.SKEW_CHOICES, value=knobs.alpha,
                        allow_custom_value=True, elem_id="alpha",
                        info="Smaller α: fewer classes per client. Any number > 0, or iid.")
    # Run right under the settings a visitor reads first, above the fold of a laptop screen
    # (1280x800) however long the list of methods grows.
    with gr.Row():
        run_btn = gr.Button("Run", variant="primary", elem_id="run-btn", scale=2, min_width=80)
        stop_btn = gr.Button("Stop", variant="stop", elem_id="stop-btn", scale=1, min_width=80)
    estimate = gr.Markdown("", elem_id="estimate", elem_classes="fm-explain")
    methods = gr.CheckboxGroup(label="Methods", choices=form.main_methods(), value=list(knobs.methods),
                               elem_id="methods", info=methods_info(form.main_methods()) + " More under Advanced.")
    high_token = gr.Checkbox(label="49 tokens per image (where FedMITR's premise holds)", value=False,
                             elem_id="high-token", info=high_token_info())
    with gr.Accordion("What the methods are", open=False):
        gr.Markdown("\n".join(f"- **{n}** ({m.role}): {m.summary}" for n, m in METHODS.items()))
    with gr.Accordion("Advanced", open=False, elem_id="advanced"):
        more_methods = gr.CheckboxGroup(label="More methods: the paper's baselines and the ablations",
                                        choices=form.more_methods(), value=list(knobs.more_methods),
                                        elem_id="more-methods", info=more_methods_info())
        preset = gr.Radio(label="Preset", choices=list(PRESETS), value=knobs.preset, elem_id="preset",
                          info=preset_info())
        with gr.Row():
            epochs = gr.Number(label="Local epochs", value=knobs.epochs, step=1, minimum=1, elem_id="epochs")
            rounds = gr.Number(label="Rounds", value=knobs.rounds, step=1, minimum=1, elem_id="rounds")
        with gr.Row():
            iterations = gr.Number(label="Inversion iterations", value=knobs.iterations, precision=0, minimum=1,
                                   elem_id="iterations")
            images = gr.Number(label="Synthetic images / round", value=knobs.images, precision=0, minimum=1,
                               elem_id="images")
        keep = gr.Slider(label="Keep ratio at each stop", minimum=0.05, maximum=1.0, step=0.05, value=knobs.keep,
                         elem_id="keep", info="Share of still-active patches kept each time sparse inversion stops "
                                              "patches.")
        relabel = gr.Radio(label="Relabel of low-density patches",
                           choices=[(form.RELABEL_HELP.get(m, m), m) for m in RELABEL_MODES], value=knobs.relabel,
                           elem_id="relabel")
        seed = gr.Number(label="Seed", value=knobs.seed, step=1, minimum=0, elem_id="seed")
        init = gr.Radio(label="Clients start", choices=form.INIT_CHOICES, value=knobs.init, elem_id="init",
                        info="Pretrained: a backbone trained on fractals a program draws (no download), so the "
                             "clients' patch tokens already mean something. Bundled for the cpu and cpu-49 models.")
    inputs = {"dataset": dataset, "clients": clients, "alpha": alpha, "methods": methods, "preset": preset,
              "epochs": epochs, "iterations": iterations, "images": images, "keep": keep, "relabel": relabel,
              "rounds": rounds, "seed": seed, "init": init, "more_methods": more_methods}
    return Controls(inputs=inputs, run_btn=run_btn, stop_btn=stop_btn, high_token=high_token, tint=None,
                    estimate=estimate)


# What each preset is for, in a few words (the preset's help names every preset there is).
PRESET_HELP = {"tiny": "seconds (a smoke test)", "cpu": "the demo, 16 patches of 7 px, a few minutes on 2 cores",
               "cpu-49": "49 patches of 4 px, where sparse inversion's premise holds better, longer",
               "gpu": "paper-like, needs a GPU and the Hub"}


def preset_info() -> str:
    return "; ".join(f"{name}: {PRESET_HELP.get(name, 'see fedmitr run --help')}" for name in PRESETS) + "."


def high_token_info() -> str:
    """The 49-token switch's help, from what it sets (app.form.high_token_settings)."""
    on_preset, on_methods = form.high_token_settings(True)
    off_preset, off_methods = form.high_token_settings(False)
    return (f"On: the {on_preset} preset and the methods {', '.join(on_methods)}. "
            f"Off: the {off_preset} preset and the methods {', '.join(off_methods)}.")


def build_page(device: str) -> tuple[Page, Controls]:
    """Every component, inside the caller's ``gr.Blocks``; ``device`` labels the idle status."""
    knobs = form.FormValues.for_preset(form.DEFAULT_PRESET)
    view_state = gr.State(None)  # this session's RunView
    gallery_index = gr.State([])  # gallery position -> (method, round position, image)

    gr.Markdown(INTRO, elem_id="intro")
    with gr.Tabs() as tabs:
        with gr.Tab("Run FedMITR", id="run"):
            with gr.Row(equal_height=False):
                with gr.Column(scale=1, min_width=320, elem_id="controls"):
                    controls = _controls_column(knobs)
                with gr.Column(scale=3, min_width=640):
                    status = gr.HTML(idle_status_html(device), elem_id="status")
                    with gr.Row(equal_height=False):
                        with gr.Column(elem_classes="fm-section"):
                            gr.Markdown("### 1 · Who holds which data")
                            gr.Markdown(TEXT["partition"], elem_classes="fm-explain")
                            partition_plot = gr.Plot(views.placeholder_figure("The partition appears when a run "
                                                                              "starts."),
                                                     show_label=False, elem_id="partition-plot")
                        with gr.Column(elem_classes="fm-section"):
                            gr.Markdown("### 2 · Each client alone vs. combined")
                            gr.Markdown(TEXT["clients"], elem_classes="fm-explain")
                            clients_plot = gr.Plot(views.placeholder_figure("Client accuracies appear after local "
                                                                            "training."),
                                                   show_label=False, elem_id="clients-plot")

                    with gr.Column(elem_classes="fm-section"):
                        gr.Markdown("### 3 · Synthetic images, invented from the client models")
                        gr.Markdown(TEXT["gallery"], elem_classes="fm-explain")
                        with gr.Row():
                            gallery_method = gr.Dropdown(label="Method", choices=[], value=None, interactive=True,
                                                         scale=1, min_width=200, elem_id="gallery-method")
                            controls.tint = gr.Checkbox(label="Tint stopped patches", value=True, scale=0,
                                                        min_width=180, elem_id="tint",
                                                        info="Off: see the synthetic digit itself.")
                            legend = gr.HTML(gallery_hint(), elem_id="gallery-legend", padding=False)
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
                        relabel_plot = gr.Plot(views.placeholder_figure(RELABEL_PLACEHOLDER, height=420),
                                               show_label=False, elem_id="relabel-plot")
                        relabel_summary = gr.Markdown("", elem_id="relabel-summary", elem_classes="fm-explain")

                    with gr.Row(equal_height=False):
                        with gr.Column(scale=1, elem_classes="fm-section"):
                            gr.Markdown("### 5 · Accuracy per round")
                            gr.Markdown(TEXT["curves"], elem_classes="fm-explain")
                            curves_plot = gr.Plot(views.accuracy_curves({}, {}, rounds=int(knobs.rounds)),
                                                  show_label=False, elem_id="curves-plot")
                            bench_note = gr.Markdown(BENCH_HINT, elem_id="bench-note", elem_classes="fm-explain")
                        with gr.Column(scale=1, elem_classes="fm-section"):
                            gr.Markdown("### 6 · Results")
                            gr.Markdown(TEXT["results"], elem_classes="fm-explain")
                            results = gr.Dataframe(value=pd.DataFrame(columns=views.RESULT_HEADERS),
                                                   headers=views.RESULT_HEADERS, interactive=False, wrap=True,
                                                   show_label=False, elem_id="results", max_height=2000,
                                                   column_widths=["26%", "22%", "14%", "38%"])
                            results_note = gr.Markdown("", elem_id="results-note", elem_classes="fm-explain")
                            files = gr.File(label="Downloads: global model, config and metrics",
                                            file_count="multiple", interactive=False, elem_id="downloads")
                            gr.Markdown("These files are deleted when you close this tab (and after 6 hours at "
                                        "most): download what you want to keep.", elem_classes="fm-explain")
                            share_method = share.build_share_panel(view_state)
                    with gr.Accordion("Event log", open=False):
                        log_box = gr.Textbox(show_label=False, lines=12, max_lines=12, interactive=False,
                                             autoscroll=True, elem_id="log")

        try_tab = share.build_try_tab(view_state)

    page = Page(status=status, partition_plot=partition_plot, clients_plot=clients_plot, gallery=gallery,
                gallery_method=gallery_method, legend=legend, relabel_plot=relabel_plot,
                relabel_summary=relabel_summary, curves_plot=curves_plot,
                bench_note=bench_note, results=results, results_note=results_note, files=files, privacy_pair=privacy_pair,
                privacy_text=privacy_text, share_method=share_method, try_method=try_tab.own, log_box=log_box,
                view_state=view_state, gallery_index=gallery_index, estimate=controls.estimate)
    controls.try_tab, controls.tabs = try_tab, tabs
    return page, controls
