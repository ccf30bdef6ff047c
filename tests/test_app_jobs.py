"""The app's jobs: per-session run directories and their clean-up."""

from __future__ import annotations

import os
import time

import pytest

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


def test_zerogpu_follows_the_real_spaces_package(tiny_cfg):
    """Against the installed `spaces` (what a Space runs): the run function is decorated at import,
    and off ZeroGPU hardware (SPACES_ZERO_GPU unset) spaces.GPU hands the function back as it is."""
    import spaces
    from spaces.config import Config

    from app import zerogpu

    assert zerogpu.spaces is spaces and not Config.zero_gpu
    assert zerogpu.gpu_run_events is zerogpu.run_events  # the pass-through path


def test_zerogpu_decorates_once_at_import_with_a_duration_per_preset(monkeypatch):
    """What the real package cannot show without ZeroGPU hardware: the decoration itself. A stand-in
    GPU records how it is called while the module is imported again."""
    import importlib

    import spaces

    from app import zerogpu
    from fedmitr.config import preset_config

    calls = []

    def fake_gpu(task=None, *, duration=None, size=None):
        def wrap(fn):
            calls.append((fn.__name__, duration))
            return fn
        return wrap

    monkeypatch.setattr(spaces, "GPU", fake_gpu)
    try:
        importlib.reload(zerogpu)
        assert [name for name, _ in calls] == ["run_events"]  # once, at import: before any launch
        duration = calls[0][1]
        assert callable(duration)  # spaces calls it with the run's own arguments
        assert {p: duration(preset_config(p), None, None) for p in ("tiny", "cpu", "cpu-49", "gpu")} == \
            zerogpu.GPU_SECONDS
    finally:
        monkeypatch.undo()
        importlib.reload(zerogpu)


def test_the_app_imports_spaces_before_torch():
    """spaces refuses to load once CUDA is initialised, so the app imports it before torch."""
    import subprocess
    import sys

    code = ("import builtins, sys\norder = []\nreal = builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    top = name.split('.')[0]\n"
            "    if top in ('spaces', 'torch') and top not in order and top not in sys.modules:\n"
            "        order.append(top)\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\nimport app.app\nprint('ORDER', order)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "GRADIO_ANALYTICS_ENABLED": "False"})
    assert "ORDER ['spaces', 'torch']" in out.stdout, out.stdout + out.stderr


def test_every_event_of_a_run_pickles(tmp_path, tiny_cfg):
    """ZeroGPU streams a generator's values across processes: they must pickle."""
    import dataclasses
    import pickle

    from app import zerogpu

    cfg = dataclasses.replace(tiny_cfg, methods=("fedavg", "fedmitr"))
    for event in zerogpu.run_events(cfg, tmp_path / "run"):
        pickle.loads(pickle.dumps(event))


def test_on_two_cores_the_server_takes_one_thread_and_the_clients_both_cores(monkeypatch):
    from app.app import client_workers, training_threads

    monkeypatch.delenv("FEDMITR_THREADS", raising=False)
    monkeypatch.delenv("FEDMITR_CLIENT_WORKERS", raising=False)
    assert (training_threads(2), client_workers(2)) == (1, 2)
    assert (training_threads(8), client_workers(8)) == (7, 7)  # the web server keeps a core
    assert (training_threads(1), client_workers(1)) == (1, 1)
    monkeypatch.setenv("FEDMITR_THREADS", "2")
    monkeypatch.setenv("FEDMITR_CLIENT_WORKERS", "3")
    assert (training_threads(2), client_workers(2)) == (2, 3)
    monkeypatch.setenv("FEDMITR_CLIENT_WORKERS", "x")
    with pytest.raises(SystemExit, match="FEDMITR_CLIENT_WORKERS must be a whole number"):
        client_workers(2)
    monkeypatch.setenv("FEDMITR_THREADS", "0")
    with pytest.raises(SystemExit, match="FEDMITR_THREADS must be a whole number"):
        training_threads(2)
