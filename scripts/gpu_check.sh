#!/usr/bin/env bash
# The GPU check: the gpu preset's architecture (224 px DeiT-Tiny, 196 tokens, pretrained=false: no
# Hub) on the bundled digits, within 8 minutes on one GPU. It measures the inversion speed-up at 196
# tokens (dense over sparse seconds, equal iterations and images) and runs the pipeline end to end
# through accelerate (bf16 autocast where the GPU has it), then prints one JSON summary.
#
#   bash scripts/gpu_check.sh            # on a GPU machine
#   bash scripts/gpu_check.sh tiny       # the same steps on the tiny preset: a CPU test of this script
#
# Writes gpu-check/ (or $OUT): speed/speed.json, run/metrics.json and summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET="${1:-gpu}"
OUT="${OUT:-gpu-check}"
PY="${PY:-.venv/bin/python}"
command -v "$PY" >/dev/null || { bash scripts/setup.sh; PY=.venv/bin/python; }
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
rm -rf "$OUT" && mkdir -p "$OUT"

if [ "$PRESET" = "gpu" ]; then
  # 196 tokens of 16 px; the bundled 28 px digits are resized to 224 px. Sized for about 5 minutes.
  cat > "$OUT/config.yaml" <<'YAML'
data: {dataset: mnist5k, num_clients: 3, max_train_samples: 2000, max_test_samples: 500}
model: {pretrained: false}
clients: {epochs: 3, batch_size: 64, lr: 0.0005, shift_px: 8}
inversion: {images_per_round: 64, iterations: 200, jitter_px: 28}
distill: {rounds: 2, steps_per_round: 60, batch_size: 64}
YAML
else
  echo "data: {num_clients: 3}" > "$OUT/config.yaml"
fi

start=$(date +%s)
"$PY" -m fedmitr bench --preset "$PRESET" --config "$OUT/config.yaml" --speed-only --repeats 2 \
  --out "$OUT/speed" | tee "$OUT/speed.txt"
"$PY" -m fedmitr run --preset "$PRESET" --config "$OUT/config.yaml" --methods fedavg,ensemble,dense-kd,fedmitr \
  --out "$OUT/run" --quiet | tee "$OUT/run.txt"
seconds=$(( $(date +%s) - start ))

"$PY" - "$OUT" "$seconds" <<'PY'
import json, sys
from pathlib import Path
out, seconds = Path(sys.argv[1]), int(sys.argv[2])
speed = json.loads((out / "speed" / "speed.json").read_text())
metrics = json.loads((out / "run" / "metrics.json").read_text())
summary = {
    "device": metrics["device"],
    "tokens": speed["patches"],
    "inversion_speedup": round(speed["inversion_speedup"], 2),
    "dense_inversion_s": round(speed["dense_mean"], 2), "sparse_inversion_s": round(speed["sparse_mean"], 2),
    "active_patches_at_end": speed["active_patches_at_end"],
    "accuracy": {m: round(v["accuracy"], 4) for m, v in metrics["methods"].items()},
    "method_seconds": {m: round(v["seconds"], 1) for m, v in metrics["methods"].items()},
    "wall_seconds": seconds,
}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
