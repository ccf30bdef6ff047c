"""The app and the command line run the same settings to the same clients and the same metrics,
whatever thread count each process uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The app's path, as app.app.main sets it up: FEDMITR_THREADS torch threads for the job's process,
# the form's cpu preset, the dataset loaded by the form's check, the run streamed by app.zerogpu.
APP_PATH = """
import os, sys
from pathlib import Path
import torch
from app import app as A
torch.set_num_threads(A.training_threads())
os.environ["FEDMITR_CLIENT_WORKERS"] = str(A.client_workers())
from app import zerogpu
from app.form import FormValues
from app.stream import checked_data
from fedmitr.config import apply_overrides
cfg = apply_overrides(FormValues.for_preset("cpu").to_config(), {"clients": {"epochs": 1}, "methods": "fedavg,ensemble"})
for event in zerogpu.run_events(cfg, Path(sys.argv[1]), checked_data(cfg)):
    pass
"""


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "FEDMITR_THREADS": str(threads), "HF_HUB_OFFLINE": "1",
            "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}


def test_the_app_and_the_command_line_train_the_same_clients_and_give_the_same_metrics(tmp_path):
    """The cpu preset's clients (one epoch, to keep it short), trained through ``fedmitr run`` on two
    torch threads and through the app's job on one: the same weights, bit for bit, and the same
    metrics. (The dataset's statistics were once reduced on the process's threads, and their last
    bits made every client differ.)"""
    cli, app = tmp_path / "cli", tmp_path / "app"
    subprocess.run([sys.executable, "-m", "fedmitr", "run", "--dataset", "mnist5k", "--clients", "5", "--alpha", "0.5",
                    "--epochs", "1", "--methods", "fedavg,ensemble", "--out", str(cli), "--quiet"],
                   check=True, env=_env(2), cwd=tmp_path, capture_output=True)
    subprocess.run([sys.executable, "-c", APP_PATH, str(app)], check=True, env=_env(1), cwd=tmp_path,
                   capture_output=True)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (cli, app))
    assert a["device"].startswith("cpu (2 threads") and b["device"].startswith("cpu (1 thread,")
    assert a["processes"]["digests"]["clients"] == b["processes"]["digests"]["clients"]
    for path in sorted((cli / "clients").iterdir()):
        assert path.read_bytes() == (app / "clients" / path.name).read_bytes()
    timeless = [{k: v for k, v in c.items() if k != "seconds"} for c in a["clients"]]
    assert timeless == [{k: v for k, v in c.items() if k != "seconds"} for c in b["clients"]]
    assert {m: r["accuracy"] for m, r in a["methods"].items()} == {m: r["accuracy"] for m, r in b["methods"].items()}
