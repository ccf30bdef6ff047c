"""How fast Stop answers while a run trains: ``POST /cancel`` timed over repeated tries.

    python scripts/stop_latency.py --tries 10 --out stop.json

Starts the app (``python app/app.py``, its default torch threads) on a free port, and ``--tries``
times: submits the default run through the API, waits until it has trained for ``--after``
seconds, and times the cancel request (what the page's Stop sends). Prints each figure and
writes them to ``--out``. Measure on an idle machine: another busy process changes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tries", type=int, default=10)
    parser.add_argument("--after", type=float, default=8.0, help="seconds of training before Stop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    from gradio_client import Client

    sys.path.insert(0, str(ROOT))
    from app.form import FormValues

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
        client = Client(url, verbose=False)
        values = FormValues.for_preset("cpu")
        cancels = []
        for i in range(args.tries):
            job = client.submit(*values.inputs(), api_name="/run")
            start = time.monotonic()
            while time.monotonic() - start < 60:
                outs = job.outputs()
                if outs and "Running" in (outs[-1][0] or ""):
                    break
                time.sleep(0.1)
            time.sleep(args.after)
            t0 = time.monotonic()
            job.cancel()
            cancels.append(time.monotonic() - t0)
            print(f"try {i + 1}: cancel answered in {cancels[-1]:.3f} s", flush=True)
            time.sleep(3)  # the worker stops within a step and lets go of the device
        record = {"tries": len(cancels), "cancel_s": cancels, "median_s": statistics.median(cancels),
                  "max_s": max(cancels), "threads": os.environ.get("FEDMITR_THREADS", "default"),
                  "cpus": os.cpu_count()}
        print(json.dumps(record))
        if args.out:
            Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
