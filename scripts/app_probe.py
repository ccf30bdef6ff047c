"""Two measurements of the app as a visitor meets it, on this machine (measure on an idle one).

    python scripts/app_probe.py stop --tries 10 --out stop.json   # how fast Stop answers under load
    python scripts/app_probe.py run --tries 3 --out app-run.json   # the default run, from a browser

Both start the app as a Space does (``python app/app.py``, its default torch threads) on a free
port. ``stop``: ``--tries`` times, submits the default run through the API, lets it train for
``--after`` seconds and times the cancel request (what the page's Stop sends). ``run``: opens the
page in Debian's Chromium (headless, a laptop-sized window, so the page draws every update as a
visitor's would), presses Run with the default settings and times until the status says Finished.
Each figure is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Iterator

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app() -> Iterator[str]:
    """The app in its own process, as ``python app/app.py`` starts it; yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "app/app.py"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit(f"the app did not start: {server.stderr.read()[-2000:] if server.poll() else ''}")
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def measure_stop(url: str, tries: int, after: float) -> dict:
    from gradio_client import Client

    sys.path.insert(0, str(ROOT))
    from app.form import FormValues

    client = Client(url, verbose=False)
    values = FormValues.for_preset("cpu")
    cancels = []
    for i in range(tries):
        job = client.submit(*values.inputs(), api_name="/run")
        start = time.monotonic()
        while time.monotonic() - start < 60:
            outs = job.outputs()
            if outs and "Running" in (outs[-1][0] or ""):
                break
            time.sleep(0.1)
        time.sleep(after)
        t0 = time.monotonic()
        job.cancel()
        cancels.append(time.monotonic() - t0)
        print(f"try {i + 1}: cancel answered in {cancels[-1]:.3f} s", flush=True)
        time.sleep(3)  # the worker stops within a step and lets go of the device
    return {"tries": len(cancels), "cancel_s": cancels, "median_s": statistics.median(cancels), "max_s": max(cancels)}


def measure_run(url: str, tries: int) -> dict:
    from playwright.sync_api import sync_playwright

    seconds = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        for i in range(tries):
            page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
            page.goto(url)
            page.wait_for_selector("#run-btn", timeout=60_000)
            t0 = time.monotonic()
            page.locator("#run-btn").click()
            page.wait_for_function("document.querySelector('#status')?.innerText.includes('Finished')",
                                   timeout=1_800_000, polling=500)
            seconds.append(time.monotonic() - t0)
            print(f"try {i + 1}: the default run finished in the browser after {seconds[-1]:.1f} s", flush=True)
            page.context.close()
        browser.close()
    return {"tries": len(seconds), "seconds": seconds, "median_s": statistics.median(seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["stop", "run"])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--after", type=float, default=8.0, help="stop: seconds of training before Stop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with running_app() as url:
        record = measure_stop(url, args.tries, args.after) if args.what == "stop" else measure_run(url, args.tries)
    record |= {"threads": os.environ.get("FEDMITR_THREADS", "default"), "cpus": os.cpu_count()}
    print(json.dumps(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
