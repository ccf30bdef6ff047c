"""The server's methods side by side on a CPU: the same numbers as one after another, and a Stop
that ends the workers at once."""

from __future__ import annotations

import dataclasses
import time

import psutil
import pytest

from fedmitr.events import Progress
from fedmitr.pipeline import run


def _digests(metrics):
    return {k: v for k, v in metrics["processes"]["digests"].items() if k != "clients"}


def test_methods_in_workers_give_what_they_give_one_after_another(tiny_cfg, tiny_data, monkeypatch):
    cfg = dataclasses.replace(tiny_cfg, methods=("fedavg", "ensemble", "dense-kd", "fedmitr"))
    monkeypatch.setenv("FEDMITR_SERVER_WORKERS", "2")
    side = run(cfg, dataset=tiny_data).metrics
    monkeypatch.setenv("FEDMITR_SERVER_WORKERS", "1")
    alone = run(cfg, dataset=tiny_data).metrics
    assert side["method_workers"] == 2 and alone["method_workers"] == 0
    assert _digests(side) == _digests(alone) and set(_digests(side)) >= {"model:dense-kd", "pool:fedmitr"}
    assert {m: r["accuracy"] for m, r in side["methods"].items()} == {m: r["accuracy"] for m, r in alone["methods"].items()}
    assert list(side["methods"]) == list(cfg.methods)  # the run's order, whatever finished first


class Stop(BaseException):
    pass


def test_a_stop_during_the_methods_ends_their_workers_at_once(tiny_cfg, tiny_data, monkeypatch):
    monkeypatch.setenv("FEDMITR_SERVER_WORKERS", "2")
    cfg = dataclasses.replace(tiny_cfg, methods=("dense-kd", "fedmitr"),
                              inversion=dataclasses.replace(tiny_cfg.inversion, iterations=2000))
    me = psutil.Process()
    seen: dict[str, float] = {}

    def on_event(event):
        if isinstance(event, Progress) and event.stage in cfg.methods and event.step > 5:
            seen["workers"] = len([p for p in me.children() if "side_by_side" in " ".join(p.cmdline())])
            seen["stopped"] = time.perf_counter()
            raise Stop()

    with pytest.raises(Stop):
        run(cfg, dataset=tiny_data, on_event=on_event)
    took = time.perf_counter() - seen["stopped"]
    assert seen["workers"] == 2  # both methods were running, each in its worker
    assert not [p for p in me.children() if "side_by_side" in " ".join(p.cmdline())]
    assert took < 0.5


def test_a_folder_named_fedmitr_in_the_working_directory_does_not_break_the_workers(tmp_path):
    """A clone named fedmitr beside the user's script shadows the package as a namespace
    (``fedmitr.__file__`` is None); the client and method workers still start."""
    import os
    import subprocess
    import sys

    (tmp_path / "fedmitr" / "fedmitr").mkdir(parents=True)  # what a clone's folder looks like to Python
    code = ("import fedmitr; assert getattr(fedmitr, '__file__', None) is None, 'not shadowed'\n"
            "from fedmitr.config import apply_overrides, preset_config\nfrom fedmitr.pipeline import run\n"
            "cfg = apply_overrides(preset_config('tiny'), {'methods': 'fedavg,dense-kd,fedmitr'})\n"
            "m = run(cfg).metrics\nprint(m['client_workers'], m['method_workers'])\n")
    env = {**os.environ, "FEDMITR_CLIENT_WORKERS": "2", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["2", "2"]
