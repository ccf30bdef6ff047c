"""Installed as users install it: a built wheel carries the bundled data and runs from anywhere, and
the repository runs as a Space does (only requirements.txt installed, `python app/app.py`)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # setuptools builds in the source tree: build a copy, not the checkout
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "bench", "build", "tests",
                                                                "__pycache__", ".sweep", "*.egg-info"))
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
                            "-q", "-w", str(out)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-2000:]
    (path,) = out.glob("fedmitr-*.whl")
    return path


def test_the_wheel_carries_the_data_and_declares_plotly(wheel):
    with zipfile.ZipFile(wheel) as whl:
        names = whl.namelist()
        metadata = next(whl.read(n).decode() for n in names if n.endswith("METADATA"))
    assert "fedmitr/bundled/mnist5k.npz" in names
    assert "Requires-Dist: plotly" in metadata  # fedmitr bench needs it after a plain install


def test_the_installed_wheel_runs_the_tiny_preset_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=300)
    assert install.returncode == 0, install.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site), "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import fedmitr; print(fedmitr.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(site))  # the wheel's copy, not the repository's
    run = subprocess.run([sys.executable, "-m", "fedmitr", "run", "--preset", "tiny", "--methods", "fedavg,ensemble",
                          "--out", "out", "--quiet"], cwd=elsewhere, env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (elsewhere / "out" / "metrics.json").exists() and "ensemble" in run.stdout


def test_the_repository_serves_the_app_as_a_space_does(tmp_path):
    """A Space installs requirements.txt only and runs `python app/app.py` from the repository root:
    the app must find the library in the checkout itself. Here a copy of the checkout stands in for
    the Space (the test venv's own install points at the original)."""
    space = tmp_path / "space"
    shutil.copytree(ROOT, space, ignore=shutil.ignore_patterns(".venv", ".git", "runs", "bench", "tests",
                                                               "__pycache__", ".sweep"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1", "HF_HUB_OFFLINE": "1",
           "GRADIO_ANALYTICS_ENABLED": "False", "FEDMITR_APP_RUNS": str(tmp_path / "runs"), "PYTHONPATH": ""}
    probe = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, '.'); import fedmitr; "
                            "print(fedmitr.__file__)"], cwd=space, env=env, capture_output=True, text=True)
    assert probe.stdout.strip().startswith(str(space))
    server = subprocess.Popen([sys.executable, "app/app.py"], cwd=space, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as page:
                    assert page.status == 200 and "FedMITR" in page.read().decode()
                    break
            except OSError:
                assert server.poll() is None, server.stdout.read()[-3000:]
                time.sleep(0.5)
        else:
            pytest.fail("the app did not answer within 120 s")
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_readme_front_matter_is_a_gradio_space_config_with_login():
    import yaml

    text = (ROOT / "README.md").read_text()
    config = yaml.safe_load(text.split("---")[1])
    assert config["sdk"] == "gradio" and config["app_file"] == "app/app.py"
    assert (ROOT / config["app_file"]).exists()
    import gradio

    assert config["sdk_version"] == gradio.__version__
    # Least privilege: create repos and write to the ones this Space created, nothing else; the
    # Share panel says so.
    assert config["hf_oauth"] is True and config["hf_oauth_scopes"] == ["contribute-repos"]
    from app.share import SIGN_IN_SCOPES

    assert "contribute-repos" in SIGN_IN_SCOPES and "cannot read or change your other" in SIGN_IN_SCOPES
    assert config["datasets"] and config["models"] and config["license"]
