"""The app's jobs: per-session run directories and their clean-up."""

from __future__ import annotations

import os
import time

from app import jobs


def test_run_dirs_are_per_session_and_cleaned(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMITR_APP_RUNS", str(tmp_path))
    first = jobs.new_run_dir("session-a")
    first.mkdir()
    other = jobs.new_run_dir("session-b")
    other.mkdir()
    second = jobs.new_run_dir("session-a")  # a new run replaces the session's previous one
    assert not first.exists() and other.exists() and second != first
    # Age and count limits.
    old = tmp_path / "zzz-old"
    old.mkdir()
    os.utime(old, (time.time() - 10_000, time.time() - 10_000))
    deleted = jobs.cleanup_runs(tmp_path, max_age_s=5_000, max_dirs=10)
    assert deleted == [old] and other.exists()
    for i in range(4):
        (tmp_path / f"n{i}").mkdir()
        os.utime(tmp_path / f"n{i}", (time.time() - 100 + i, time.time() - 100 + i))
    jobs.cleanup_runs(tmp_path, max_age_s=5_000, max_dirs=2)
    assert len([p for p in tmp_path.iterdir()]) == 2



def test_run_events_streams_the_pipeline_and_stops_when_closed(tmp_path, tiny_cfg):
    import threading

    from app import zerogpu
    from fedmitr.events import RunFinished, StageStarted

    events = list(zerogpu.run_events(tiny_cfg, tmp_path / "full"))
    assert isinstance(events[-1], RunFinished) and "methods" in events[-1].metrics
    assert isinstance(events[0], StageStarted) and events[0].stage == "data"

    before = threading.active_count()
    stream = zerogpu.run_events(tiny_cfg, tmp_path / "stopped")
    next(stream)
    stream.close()  # stops the pipeline at its next step and waits for it
    assert threading.active_count() == before
    assert not (tmp_path / "stopped" / "metrics.json").exists()


def test_on_gpu_wraps_only_where_spaces_is_installed(monkeypatch, tiny_cfg):
    import sys
    import types

    from app import zerogpu

    def fn():
        yield 1

    monkeypatch.setattr(zerogpu, "zerogpu_available", lambda: False)
    assert zerogpu.on_gpu(fn, tiny_cfg) is fn
    asked = {}
    fake = types.ModuleType("spaces")
    fake.GPU = lambda duration: (lambda f: asked.setdefault("duration", duration) and f)
    monkeypatch.setitem(sys.modules, "spaces", fake)
    monkeypatch.setattr(zerogpu, "zerogpu_available", lambda: True)
    assert zerogpu.on_gpu(fn, tiny_cfg) is fn and asked["duration"] == zerogpu.GPU_SECONDS["tiny"]
