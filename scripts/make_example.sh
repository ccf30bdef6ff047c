#!/usr/bin/env bash
# The recorded example the web app shows on arrival: the default run, recorded into assets/example/.
#   bash scripts/make_example.sh     # about two minutes on 2 cores
# It keeps what a replay needs: the config, the metrics, the event stream and the global models (for
# the downloads, Share and Try); the clients' checkpoints and the synthetic sets are left out (the
# event stream holds every synthetic image). recorded.json says how, where and when it was made.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
OUT=assets/example
ARGS="--dataset mnist5k --clients 5 --alpha 0.5"
rm -rf "$OUT/run"
mkdir -p "$OUT"
start=$(date +%s)
.venv/bin/fedmitr run $ARGS --out "$OUT/run" --quiet
seconds=$(( $(date +%s) - start ))
rm -rf "$OUT/run/clients" "$OUT/run/synthetic"
.venv/bin/python - "$OUT" "fedmitr run $ARGS" "$seconds" <<'PY'
import json, os, sys, time
from pathlib import Path
out, command, seconds = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "a CPU")
threads = json.loads((out / "run" / "metrics.json").read_text())["device"]
from fedmitr.clients import step_seconds
from fedmitr.config import preset_config
# The speed probe the app runs at start-up, here, right after the run: the app scales the plan by the ratio.
info = {"command": command, "machine": f"{os.cpu_count()} cores ({cpu}), {threads}",
        "date": time.strftime("%Y-%m-%d"), "seconds": seconds,
        "step_seconds": round(step_seconds(preset_config("cpu").model), 6)}
(out / "recorded.json").write_text(json.dumps(info, indent=2) + "\n")
size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) / 1e6
print(f"recorded {command} in {seconds} s into {out} ({size:.1f} MB)")
PY
