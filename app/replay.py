"""A finished run, replayed: the recorded example on arrival, and any shared run's events.

A run directory keeps the run's own event stream (``events.jsonl``, :mod:`fedmitr.rundir`). A
replay folds those events into a :class:`~app.runview.RunView` through the same
:meth:`~app.runview.RunView.apply` a live run uses, then draws the page with the same
:func:`app.stream.render`: one rendering path, whatever the events' origin.

Why not Gradio's cached examples: they cache the outputs of one call of a function with given
inputs, made by running it when the Space starts (here three minutes of CPU at every restart).
This page is more than a function's outputs: a gallery whose images open their relabel map, a
privacy check per image, Share and Try panels that use the run's models. A recorded event stream
replays all of it, offline, in about a second, and a run anyone exported or pushed carries one.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path
from typing import Any

from fedmitr.catalog import BUNDLED
from fedmitr.errors import USER_ERRORS, ConfigError
from fedmitr.methods import headline
from fedmitr.rundir import RunDir

from app.layout import Page
from app.share import RUN_DIR
from app.runview import RunView

log = logging.getLogger("fedmitr.app")
ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "assets" / "example"  # the recorded run shown on arrival (scripts/make_example.sh)

_TRAINING_IMAGES: dict[str, tuple[Any, Any]] = {}


def training_images(dataset: str) -> tuple[Any, Any] | None:
    """A bundled dataset's training pixels and labels (for the privacy view), loaded once."""
    if dataset not in BUNDLED:
        return None
    if dataset not in _TRAINING_IMAGES:
        from fedmitr.data import open_dataset

        from app.stream import train_images

        _TRAINING_IMAGES[dataset] = train_images(open_dataset(dataset))
    return _TRAINING_IMAGES[dataset]


def replay(run_dir: RunDir, *, note: str = "", name: str = "the recorded run") -> RunView:
    """A finished view of the recorded run in ``run_dir`` (``note``: what the status says it is,
    ``name``: what the page calls it). Every event is applied at the time it was recorded, so the
    log and the stages read as they did live."""
    view = RunView(run_dir.config, thumbnails=thumbnail_dir())
    for t, event in run_dir.events():
        view.apply(event, at=t)
    first = headline().name  # the method's own model is offered first
    models = sorted(run_dir.global_models(), key=lambda m: m != first)
    view.finish(run_dir.metrics, out_dir=str(run_dir.path), files=[str(p) for p in run_dir.downloads()],
                models=models)
    view.mark_recorded(note, name)
    base = run_dir.metrics.get("config", {}).get("data", {}).get("dataset", "")
    found = training_images(base)
    if found is not None:
        view.attach_training_images(*found)
    return view


def example_note(folder: Path = EXAMPLE, device: str = "") -> str:
    """What the recorded example is: its command, machine and date (``recorded.json``). Its
    seconds are the status card's (the run's own total), and its device the card's "Device" line:
    each is said once."""
    info = json.loads((folder / "recorded.json").read_text())
    machine = html.escape(str(info["machine"]))
    if device:
        machine = machine.replace(f", {html.escape(device)}", "").replace(html.escape(device), "").strip(" ,")
    return (f"Example: a recorded run of the default settings, made with <code>{html.escape(info['command'])}"
            f"</code> on {machine} ({html.escape(str(info['date']))}). Press Run for your own.")


def example_view(folder: Path = EXAMPLE) -> RunView | None:
    """The recorded example, or None (with a log line) when it is missing or unreadable."""
    try:
        run_dir = RunDir.open(folder / "run")
        note = example_note(folder, str(run_dir.metrics.get("device", "")))
        return replay(run_dir, note=note, name="the recorded example")
    except (OSError, ValueError, KeyError, *USER_ERRORS) as err:
        log.warning("no recorded example to show (%s)", err)
        return None


def replay_ref(ref: str) -> RunView:
    """The run a replay reference names: a run directory on this machine (``run-dir:PATH``, e.g. the
    example, with its own note), or a shared checkpoint that carries its run (``hf-hub:ID``,
    ``local-dir:PATH``)."""
    from fedmitr import hub

    if ref.startswith(RUN_DIR):
        folder = Path(ref[len(RUN_DIR):])
        if folder.resolve() == (EXAMPLE / "run").resolve():
            view = example_view()
            if view is None:
                raise ConfigError("the recorded example cannot be read on this machine")
            return view
        return replay(RunDir.open(folder), note=f"Replay of the run in <code>{html.escape(folder.name)}</code>, "
                                               f"from its recorded events.")
    return replay(hub.load_run(ref), note=f"Replay of the run that made <code>{html.escape(ref)}</code>, from its "
                                          f"recorded events.", name="the replayed run")


def thumbnail_dir() -> Path:
    """Where the gallery's thumbnails are written (once each, named by their content)."""
    from app.jobs import thumbnails_root

    return thumbnails_root()


def page_update(page: Page, view: RunView) -> dict[Any, Any]:
    """Every panel of ``page`` drawn from a finished ``view``."""
    from app.stream import render

    update, _ = render(page, view, {"status", "partition", "clients", "curves", "gallery", "final"}, [])
    return {**update, page.view_state: view}


