"""Two measurements of the app as a visitor meets it, on this machine (measure on an idle one).

    python scripts/app_probe.py stop --tries 10 --out stop.json   # how fast Stop answers under load
    python scripts/app_probe.py run --tries 3 --out app-run.json   # the default run, from a browser
    python scripts/app_probe.py run --tries 1 --preset tiny        # the probe itself, in seconds
    python scripts/app_probe.py api --tries 3 --out app-api.json   # the default run through the API, no browser

Both start the app as a Space does (``python app/app.py``, its default torch threads) on a free
port. ``stop``: ``--tries`` times, submits the default run through the API, lets it train for
``--after`` seconds and times the cancel request (what the page's Stop sends). ``run``: opens the
page in Debian's Chromium (headless, a laptop-sized window, so the page draws every update as a
visitor's would), presses Run with the default settings (or ``--preset``'s) and times until the
status says Finished. ``api``: submits the default run through Gradio's API (no browser) and times
it to its end; it also reads the status card's "about X left" as the run goes and reports the
estimate's error at 25, 50 and 75% of the run (against the time that was really left). Meanwhile ``run`` samples the CPU time of Chromium's renderer processes (psutil)
and reports their mean over the run in % of one core: what drawing the page costs a machine that
also trains. Each figure is printed and written to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
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


_LEFT = re.compile(r"about ((?:\d+ h )?(?:\d+ min )?(?:\d+ s)?) left")


def parse_duration(text: str) -> float:
    """``"1 min 05 s"`` -> 65.0 (what app.timeline.format_seconds writes)."""
    units = {"h": 3600, "min": 60, "s": 1}
    return float(sum(int(n) * units[u] for n, u in re.findall(r"(\d+) (h|min|s)\b", text)))


def estimate_errors(samples: list[tuple[float, float]], total: float,
                    at: tuple[float, ...] = (0.25, 0.5, 0.75)) -> dict[str, float]:
    """The time-left estimate's relative error at each share of the run: the first sample at or
    after it, (estimated - actual) / actual, where actual = ``total`` - the sample's time."""
    errors = {}
    for share in at:
        later = [(t, left) for t, left in samples if t >= share * total and total - t > 0]
        if later:
            t, left = later[0]
            errors[f"{round(share * 100)}%"] = (left - (total - t)) / (total - t)
    return errors


def measure_api(url: str, tries: int) -> dict:
    from gradio_client import Client

    sys.path.insert(0, str(ROOT))
    from app.form import FormValues

    client = Client(url, verbose=False)
    values = FormValues.for_preset("cpu")
    seconds, errors = [], []
    for i in range(tries):
        t0 = time.monotonic()
        job = client.submit(*values.inputs(), api_name="/run")
        samples: list[tuple[float, float]] = []
        seen = 0
        while not job.done():
            outs = job.outputs()
            for out in outs[seen:]:
                match = _LEFT.search(str(out[0] or ""))
                if match:
                    samples.append((time.monotonic() - t0, parse_duration(match.group(1))))
            seen = len(outs)
            time.sleep(0.2)
        seconds.append(time.monotonic() - t0)
        last = str(job.outputs()[-1][0] or "")
        if "Finished" not in last:
            raise SystemExit(f"try {i + 1}: the run did not finish: {last[:300]}")
        errors.append(estimate_errors(samples, seconds[-1]))
        print(f"try {i + 1}: the default run took {seconds[-1]:.1f} s through the API; time-left error "
              + ", ".join(f"{k}: {v:+.0%}" for k, v in errors[-1].items()), flush=True)
    return {"tries": len(seconds), "seconds": seconds, "median_s": statistics.median(seconds),
            "estimate_error": errors}


class RendererCPU:
    """CPU time of the Chromium renderer processes this process started (``--type=renderer``),
    sampled every ``every`` seconds from :meth:`start` to :meth:`stop`. A renderer that appears
    meanwhile counts from zero; one that ends counts up to its last sample."""

    def __init__(self, every: float = 0.5):
        self.every = every
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)
        self._started = 0.0

    @staticmethod
    def renderers() -> list:
        import psutil

        found = []
        for proc in psutil.Process(os.getpid()).children(recursive=True):
            try:
                if any(arg == "--type=renderer" for arg in proc.cmdline()):
                    found.append(proc)
            except psutil.Error:
                continue
        return found

    def _sample(self, initial: bool = False) -> None:
        import psutil

        for proc in self.renderers():
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            seconds = times.user + times.system
            self._first.setdefault(proc.pid, seconds if initial else 0.0)
            self._last[proc.pid] = seconds

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.every):
            self._sample()

    def start(self) -> None:
        self._sample(initial=True)
        self._started = time.monotonic()
        self._thread.start()

    def stop(self) -> dict:
        """{"mean_pct": mean over the run in % of one core, "seconds": CPU seconds, "processes": n}."""
        self._stop.set()
        self._thread.join()
        self._sample()
        wall = time.monotonic() - self._started
        cpu = sum(self._last[pid] - self._first.get(pid, 0.0) for pid in self._last)
        return {"mean_pct": 100 * cpu / max(wall, 1e-9), "seconds": cpu, "processes": len(self._last)}


def choose_preset(page, preset: str) -> None:
    """Pick ``preset`` in the Advanced section and wait for its knobs to follow."""
    advanced = page.get_by_role("button", name="Advanced")
    advanced.click()
    before = page.locator("#iterations input").input_value()
    page.locator("#preset").get_by_label(preset, exact=True).check()
    if preset != "cpu":
        page.wait_for_function(f"document.querySelector('#iterations input').value !== {before!r}", timeout=10_000)
    advanced.click()


def measure_run(url: str, tries: int, preset: str = "cpu") -> dict:
    from playwright.sync_api import sync_playwright

    seconds, renderer = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True,
                                    args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        for i in range(tries):
            page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
            page.goto(url)
            page.wait_for_selector("#run-btn", timeout=60_000)
            page.wait_for_function("document.querySelector('#status')?.innerText.includes('Example')",
                                   timeout=60_000)
            if preset != "cpu":
                choose_preset(page, preset)
            cpu = RendererCPU()
            cpu.start()
            t0 = time.monotonic()
            page.locator("#run-btn").click()
            page.wait_for_function("document.querySelector('#status')?.innerText.includes('Running')",
                                   timeout=60_000, polling=200)
            page.wait_for_function("document.querySelector('#status')?.innerText.includes('Finished')",
                                   timeout=1_800_000, polling=500)
            seconds.append(time.monotonic() - t0)
            renderer.append(cpu.stop())
            print(f"try {i + 1}: the {preset} run finished in the browser after {seconds[-1]:.1f} s; Chromium's "
                  f"renderer used {renderer[-1]['mean_pct']:.0f}% of a core meanwhile", flush=True)
            page.context.close()
        browser.close()
    return {"preset": preset, "tries": len(seconds), "seconds": seconds, "median_s": statistics.median(seconds),
            "renderer_cpu_pct": [r["mean_pct"] for r in renderer],
            "renderer_cpu_pct_median": statistics.median(r["mean_pct"] for r in renderer)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", choices=["stop", "run", "api"])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--after", type=float, default=8.0, help="stop: seconds of training before Stop")
    parser.add_argument("--preset", default="cpu", help="run: the preset to run (tiny: a seconds-long check)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    with running_app() as url:
        record = (measure_stop(url, args.tries, args.after) if args.what == "stop"
                  else measure_api(url, args.tries) if args.what == "api"
                  else measure_run(url, args.tries, args.preset))
    record |= {"threads": os.environ.get("FEDMITR_THREADS", "default"), "cpus": os.cpu_count()}
    print(json.dumps(record))
    if args.out:
        Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
