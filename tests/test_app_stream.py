"""What a run streams to the page, counted: a tiny run through the run handler's generator.

Every update crosses to the browser, which redraws what it carries; a figure re-sent whole is
drawn again whole. So a run streams at most one update every YIELD_EVERY_S seconds, and in it only
what changed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter

import gradio as gr
import pytest

from app import replay, stream, views
from app.form import FormValues
from app.layout import Page, build_page

# Two inversion methods, so the gallery follows one and then the other.
TINY = FormValues.for_preset("tiny", methods=["fedavg", "ensemble", "fedmitr", "dense-kd"])


class Request:
    session_hash = "stream-test"


def payload(component, value) -> int:
    """Bytes of one component's value as Gradio sends it (after its postprocess)."""
    if isinstance(value, dict) and "__type__" in value:  # gr.update(...)
        return len(json.dumps(value, default=str))
    out = component.postprocess(value)
    return len(out.model_dump_json() if hasattr(out, "model_dump_json") else json.dumps(out, default=str))


@pytest.fixture(scope="module")
def streamed(tmp_path_factory):
    """(page, updates with the seconds each arrived at, wall seconds of the run)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDMITR_APP_RUNS", str(tmp_path_factory.mktemp("runs")))
        with gr.Blocks():
            page, _ = build_page("cpu")
        example = replay.example_view()
        start = time.monotonic()
        updates = [(time.monotonic() - start, u) for u in
                   stream.run_job(page, tuple(TINY.inputs()), Request(), reference=example.metrics)]
        return page, updates, time.monotonic() - start


def names(page: Page) -> dict[int, str]:
    return {id(getattr(page, f.name)): f.name for f in dataclasses.fields(Page)}


def test_a_run_streams_at_most_one_update_every_two_seconds(streamed):
    page, updates, wall = streamed
    assert stream.YIELD_EVERY_S >= 2.0  # each redraw costs the browser (docs/results.md)
    assert "Finished" in updates[-1][1][page.status]
    assert len(updates) <= wall / stream.YIELD_EVERY_S + 3  # the first, one every YIELD_EVERY_S, the last
    gaps = [b - a for (a, _), (b, _) in zip(updates[1:-1], updates[2:-1])]
    assert all(gap >= stream.YIELD_EVERY_S * 0.9 for gap in gaps), gaps


def test_each_update_carries_only_what_changed(streamed):
    page, updates, _ = streamed
    label = names(page)
    sent = Counter(label[id(c)] for _, u in updates for c in u)
    rounds = TINY.rounds * 2  # two inversion methods
    # When a round arrives, and in the last update (which carries the whole page, for API callers).
    assert sent["gallery"] <= rounds + 2 and sent["relabel_plot"] <= rounds + 2
    assert sent["partition_plot"] == 3  # the placeholder, the partition once, and the last update
    assert sent["view_state"] == 2  # the session's view: set once, and once more at the end
    statuses = [u[page.status] for _, u in updates if page.status in u]
    assert all(a != b for a, b in zip(statuses, statuses[1:]))  # the card is sent only when its text changed
    logs = [u[page.log_box] for _, u in updates[:-1] if page.log_box in u]  # the last one carries everything
    assert all(a != b for a, b in zip(logs, logs[1:]))


def test_the_bytes_a_run_streams_are_bounded(streamed):
    page, updates, _ = streamed
    label = names(page)
    size = Counter()
    for _, update in updates:
        for component, value in update.items():
            if label[id(component)] not in ("view_state", "gallery_index"):  # kept on the server
                size[label[id(component)]] += payload(component, value)
    relabel_figures = sum(1 for _, u in updates if page.relabel_plot in u)
    # The relabel map's image is a PNG, not a JSON array of pixels (over 100 kB a figure before).
    assert size["relabel_plot"] / relabel_figures < 40_000, size
    assert sum(size.values()) < 400_000, size


def test_gallery_thumbnails_are_files(streamed):
    page, updates, _ = streamed
    galleries = [u[page.gallery] for _, u in updates if u.get(page.gallery)]
    assert galleries and all(isinstance(item[0], str) and item[0].endswith(".png") for g in galleries for item in g)


def test_a_thumbnail_is_drawn_once_however_often_the_gallery_is_sent(tmp_path, monkeypatch):
    from app.runview import RunView
    from app_events import make_round
    from fedmitr.config import preset_config

    drawn = []
    real = views.mask_overlay
    monkeypatch.setattr(views, "mask_overlay", lambda event, **kw: drawn.append(event.round) or real(event, **kw))
    view = RunView(preset_config("tiny"), thumbnails=tmp_path)
    view.apply(make_round(round_=1))
    first, _ = view.gallery_items("fedmitr")
    view.apply(make_round(round_=2, seed=1))
    second, _ = view.gallery_items("fedmitr")
    assert drawn == [1, 2]  # round 1 was not drawn again for the grown gallery
    assert [item[0] for item in first] == [item[0] for item in second[:len(first)]]  # the same files
    view.set_tint(False)
    untinted, _ = view.gallery_items("fedmitr")
    assert drawn == [1, 2, 1, 2] and untinted[0][0] != first[0][0]


def test_a_new_run_clears_every_panel_of_the_last_one(streamed):
    """The recorded example's privacy picture, results and models do not stay beside a new run."""
    page, updates, _ = streamed
    first = updates[0][1]
    assert first[page.privacy_pair] is None and first[page.privacy_text] == views.PRIVACY_HINT
    assert first[page.share_method]["choices"] == [] and first[page.try_method]["choices"] == []
    assert first[page.files] is None and first[page.gallery] == [] and first[page.relabel_summary] == ""
    assert "benchmark" in first[page.bench_note]
    assert "counts down" in first[page.estimate]


def test_the_line_under_run_says_what_the_run_took(streamed):
    page, updates, _ = streamed
    last = updates[-1][1]
    assert "This run took" in last[page.estimate] and "estimated before it" in last[page.estimate]
    assert "took" in last[page.status] and "left" not in last[page.status]
    running = [u[page.status] for _, u in updates[1:-1] if page.status in u and "Running" in u[page.status]]
    assert running and all("so far" in s for s in running)


def test_a_cancel_ends_the_stream_at_once_and_the_generator_is_closed_after():
    """Gradio could not cancel a plain generator's step: Stop waited for the next update (up to a
    second). The run is streamed from abandonable thread hops: a cancel ends the event while the
    step is still busy, stops the job at once, and the generator's clean-up runs when the step ends."""
    import asyncio
    import threading

    busy, release, closed, stopped = threading.Event(), threading.Event(), threading.Event(), []

    def updates():
        try:
            yield "first"
            busy.set()
            release.wait(30)  # a step of the run that takes its time
            yield "second"
        finally:
            closed.set()

    async def consume(got):
        async for update in stream.cancellable(updates(), lambda: stopped.append(True)):
            got.append(update)

    async def main():
        got: list = []
        task = asyncio.create_task(consume(got))
        while not busy.is_set():
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # returns although the step is still busy
        return got

    got = asyncio.run(main())
    assert got == ["first"] and stopped == [True] and not closed.is_set() and not release.is_set()
    release.set()
    assert closed.wait(10)  # the clean-up ran once the step let go


def test_a_failing_run_is_not_taken_for_a_cancel():
    """A refusal (say "a run is already going in this tab") must not stop the job already running."""
    import asyncio

    stopped = []

    def updates():
        raise gr.Error("Busy")
        yield  # noqa: unreachable - a generator

    async def consume():
        async for _ in stream.cancellable(updates(), lambda: stopped.append(True)):
            pass

    with pytest.raises(gr.Error, match="Busy"):
        asyncio.run(consume())
    assert stopped == []
