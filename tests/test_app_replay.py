"""A recorded run replays into the same view, drawn by the same code, as the live run it was."""

from __future__ import annotations

import dataclasses
import json

import pytest

from app import replay
from app.runview import RunView
from fedmitr.pipeline import run
from fedmitr.rundir import RunDir


@pytest.fixture(scope="module")
def recorded(tiny_cfg, tmp_path_factory):
    folder = tmp_path_factory.mktemp("example")
    events = []
    cfg = dataclasses.replace(tiny_cfg, methods=("fedavg", "ensemble", "fedmitr"))
    run(cfg, out_dir=folder / "run", on_event=events.append)
    (folder / "recorded.json").write_text(json.dumps({"command": "fedmitr run --preset tiny", "machine": "a test",
                                                      "date": "2026-11-29", "seconds": 9}))
    return folder, cfg, events


def test_a_replay_is_the_live_view(recorded):
    folder, cfg, events = recorded
    live = RunView(cfg)
    for event in events:
        live.apply(event)
    again = replay.replay(RunDir.open(folder / "run"), note="recorded")
    assert again.state == "done" and again.recorded == "recorded"
    assert again.client_accuracy == live.client_accuracy and again.method_accuracy == live.method_accuracy
    assert again.curves == live.curves and set(again.privacy) == set(live.privacy) == {"fedmitr"}
    assert [r.round for r in again.rounds["fedmitr"]] == [r.round for r in live.rounds["fedmitr"]]
    assert (again.rounds["fedmitr"][0].images == live.rounds["fedmitr"][0].images).all()
    assert again.models == ["fedmitr", "fedavg"] and again.metrics["methods"].keys() == {"fedavg", "ensemble", "fedmitr"}
    picture, text = again.privacy_view("fedmitr", 0, 1)  # the training images come from the bundled data
    assert picture is not None and "pixel distance" in text
    assert "recorded" in again.status_html()


def test_the_example_note_says_what_it_is(recorded):
    folder, _, _ = recorded
    view = replay.example_view(folder)
    assert view is not None and view.state == "done"
    assert "Example: a recorded run" in view.status_html() and "fedmitr run --preset tiny" in view.status_html()
    assert "2026-11-29" in view.status_html()


def test_a_missing_example_is_no_error(tmp_path):
    assert replay.example_view(tmp_path) is None


def test_the_time_estimate_scales_the_recorded_run(recorded, monkeypatch):
    from app import stream
    from app.form import FormValues
    from app.stream import estimate_seconds, estimate_text
    from app.timeline import MachineSpeed

    monkeypatch.setattr(stream, "SPEED", MachineSpeed())  # not what an earlier run in this process taught it

    folder, cfg, _ = recorded
    metrics = RunDir.open(folder / "run").metrics
    own = estimate_seconds(cfg, metrics)
    measured = metrics["seconds"]["clients"] + sum(m["seconds"] for m in metrics["methods"].values())
    assert own == pytest.approx(measured, rel=0.35)  # its own settings: about its own time
    double = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill, rounds=2 * cfg.distill.rounds))
    assert estimate_seconds(double, metrics) > own  # more rounds, more time
    assert estimate_seconds(cfg, None) is None
    values = FormValues.for_preset("tiny").inputs()
    assert "on this machine" in estimate_text(values, metrics)
    assert estimate_text(FormValues.for_preset("tiny", clients=1).inputs(), metrics) == ""  # bad settings: nothing
