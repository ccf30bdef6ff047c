"""The app through its API, as gradio_client sees it: the app runs in-process on a free port.

A `tiny` run streams a partition figure, gallery images and final accuracies; a cancelled run
frees the device for the next one; bad input is a clear error and the app keeps serving.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import socket
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from app.form import FormValues
from app_server import serving_app

# A few seconds on 2 CPU cores.
TINY = FormValues(dataset="mnist5k", clients=3, alpha="0.5", methods=["fedavg", "ensemble", "fedmitr"],
                  preset="tiny", epochs=2, iterations=8, images=8, keep=0.7, relabel="token", rounds=2, seed=0)


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0"}
OUTBOUND: list[str] = []  # every non-local host the app looked up or connected to while starting


@contextlib.contextmanager
def recording_outbound():
    """Record (not block) any step outside this machine while the app is built and launched."""
    real_getaddrinfo, real_connect = socket.getaddrinfo, socket.socket.connect

    def getaddrinfo(host, *args, **kwargs):
        if host is not None and str(host) not in LOCAL_HOSTS:
            OUTBOUND.append(str(host))
        return real_getaddrinfo(host, *args, **kwargs)

    def connect(sock, address):
        if isinstance(address, tuple) and str(address[0]) not in LOCAL_HOSTS:
            OUTBOUND.append(str(address[0]))
        return real_connect(sock, address)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "getaddrinfo", getaddrinfo)
        mp.setattr(socket.socket, "connect", connect)
        yield


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serving_app(tmp_path_factory.mktemp("app-runs"), around_launch=recording_outbound) as url:
        yield url


def test_app_starts_without_touching_the_network(server):
    assert OUTBOUND == [], f"the app reached out while starting: {OUTBOUND}"


@pytest.fixture
def client(server):
    from gradio_client import Client

    return Client(server, verbose=False, download_files=True)


def submit(client, **changes):
    return client.submit(*dataclasses.replace(TINY, **changes).inputs(), api_name="/run")


def plot_json(value) -> dict | None:
    """A gr.Plot output as the client gets it: {"type": "plotly", "plot": "<json>"}."""
    if isinstance(value, dict) and value.get("type") == "plotly":
        return json.loads(value["plot"])
    return None


def array(value) -> np.ndarray:
    """A plotly JSON array: a plain list, or a typed array {"dtype", "bdata" (base64), "shape"}."""
    if isinstance(value, dict) and "bdata" in value:
        out = np.frombuffer(base64.b64decode(value["bdata"]), dtype=np.dtype(value["dtype"]))
        shape = value.get("shape")
        return out.reshape([int(n) for n in str(shape).split(",")]) if shape else out
    return np.asarray(value)


def heatmap(value) -> dict | None:
    """The heatmap trace of a streamed partition figure (placeholders have no traces)."""
    fig = plot_json(value)
    if fig and fig["data"] and fig["data"][0]["type"] == "heatmap":
        return fig["data"][0]
    return None


def wait_until_idle(timeout: float = 20.0) -> None:
    from app import jobs

    assert jobs.wait_idle(timeout), f"the app still holds a job {timeout} s after it should have stopped"


def test_tiny_run_streams_partition_gallery_and_accuracy(client):
    job = submit(client)
    updates = list(job)
    assert job.status().success, job.exception()
    # Output order: status, partition, clients, gallery, gallery method, legend, relabel, curves, results, files, log.
    partitions = [i for i, u in enumerate(updates) if heatmap(u[1])]
    assert partitions, "no partition heatmap was streamed"
    counts = array(heatmap(updates[partitions[-1]][1])["z"])
    assert counts.shape == (3, 10)  # 3 clients x 10 digit classes
    assert counts.sum() > 0 and (counts >= 0).all()
    assert partitions[0] < len(updates) - 1  # live: the partition arrives before the run is over

    galleries = [u[3] for u in updates if isinstance(u[3], list) and u[3]]
    assert galleries, "no gallery images were streamed"
    image = Path(galleries[-1][0]["image"])
    assert image.exists() and image.stat().st_size > 0
    with Image.open(image) as im:
        assert im.size[0] >= 100  # upscaled for display
    curves = plot_json(updates[-1][7])
    assert any(t.get("name") == "FedMITR" and len(array(t["x"])) == TINY.rounds for t in curves["data"])

    final = updates[-1]
    assert "Finished" in final[0]
    table = final[8]
    rows = {row[0]: row for row in table["data"]}
    assert {"FedAvg", "ensemble (teacher)"} <= set(rows)
    for row in rows.values():
        assert 0.0 <= float(row[1].rstrip("%")) <= 100.0
    files = {Path(f).name: Path(f) for f in final[9]}
    assert "metrics.json" in files and "fedavg.safetensors" in files
    metrics = json.loads(files["metrics.json"].read_text())
    assert set(TINY.methods) == set(metrics["methods"])
    assert metrics["config"]["data"]["num_clients"] == 3 and metrics["config"]["preset"] == "tiny"
    wait_until_idle()


def test_stop_cancels_a_running_job_and_the_next_run_works(client):
    from app import jobs

    # The cpu preset's local training alone takes far longer than this test waits.
    job = submit(client, preset="cpu", epochs=40, methods=["fedavg"], clients=5)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any("Running: clients" in (u[0] or "") for u in job.outputs()):
            break
        time.sleep(0.2)
    else:
        pytest.fail("the long run never reached local training")
    assert jobs.DEVICE_LOCK.locked()
    t0 = time.monotonic()
    job.cancel()
    wait_until_idle(timeout=10)  # "Stop cancels within a few seconds"
    assert time.monotonic() - t0 < 10

    updates = list(submit(client, methods=["fedavg"]))
    assert "Finished" in updates[-1][0]
    assert any(row[0] == "FedAvg" for row in updates[-1][8]["data"])


@pytest.mark.parametrize("changes, message", [
    ({"alpha": "-1"}, "alpha must be a number > 0"),
    ({"clients": 25}, "maximum value 20|2 to 20"),  # Gradio checks the slider bounds itself
    ({"dataset": "cifar10"}, "offline"),
    ({"methods": []}, "at least one method"),
    # Valid on its own, impossible together: 20 clients, extreme skew, 600 images.
    ({"clients": 20, "alpha": "0.001"}, "could not give each of 20 clients"),
])
def test_bad_input_is_a_clear_error_and_the_app_still_answers(client, changes, message):
    from gradio_client.exceptions import AppError

    with pytest.raises(AppError, match=message):
        client.predict(*dataclasses.replace(TINY, **changes).inputs(), api_name="/run")
    wait_until_idle()


def test_app_still_serves_after_errors(client):
    # Runs after the bad-input cases: the same server still runs a job to the end.
    updates = list(submit(client, methods=["ensemble"], clients=2))
    assert "Finished" in updates[-1][0]


def test_bad_input_from_one_session_does_not_disturb_another(server):
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    good, bad = Client(server, verbose=False), Client(server, verbose=False)
    running = submit(good, methods=["fedavg"])
    with pytest.raises(AppError, match="alpha"):
        bad.predict(*dataclasses.replace(TINY, alpha="0").inputs(), api_name="/run")
    updates = list(running)
    assert "Finished" in updates[-1][0]
