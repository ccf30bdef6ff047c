"""The recorded example as the page shows it: one time, the device once, a log that reads as the
run went, and a Replay (assets/example, made by scripts/make_example.sh)."""

from __future__ import annotations

import json
import re

from app import replay
from app.timeline import format_seconds


def test_the_example_card_gives_one_time_and_the_device_once():
    view = replay.example_view()
    assert view is not None
    status = view.status_html()
    recorded = json.loads((replay.EXAMPLE / "recorded.json").read_text())
    total = view.metrics["seconds"]["total"]
    assert f"took {format_seconds(total)}" in status  # the run's own total...
    assert f"{recorded['seconds']:.0f} s" not in status  # ...and not a second, different one
    assert status.count(view.metrics["device"]) == 1  # on the Device line only
    assert recorded["command"] in status and recorded["date"] in status


def test_the_example_log_has_the_times_the_run_had():
    view = replay.example_view()
    times = [float(re.match(r"\s*([\d.]+)s ", line).group(1)) for line in view.log]
    assert times == sorted(times) and len(set(times)) > len(times) // 2  # not 0.0 on every line
    assert times[-1] > 0.9 * view.metrics["seconds"]["total"]
    assert view.finished["clients"] == view.metrics["seconds"]["clients"]


def test_the_example_replays_from_its_reference():
    from app.share import RUN_DIR

    view = replay.replay_ref(f"{RUN_DIR}{replay.EXAMPLE / 'run'}")
    assert view.state == "done" and view.name == "the recorded example"
    assert "Example: a recorded run" in view.status_html() and view.rounds
