#!/usr/bin/env bash
# The benchmark's map, cell by cell: {cpu (16 tokens), cpu-49 (49 tokens)} x clients {pretrained on
# fractals, from scratch} x alpha {0.1, 0.5} x seeds, at equal iterations. Two workers side by side
# with one torch thread each (a 2-core machine) take cells from one queue, seed by seed: in each
# seed the 16-token cells first (about 17 minutes each here with both baselines), then the
# 49-token ones (about 50). Each cell is one `fedmitr bench` call with its own
# folder under bench/; a map cut short still leaves whole cells, a rerun skips the finished ones,
# and the merge at the end takes every finished cell (or run it by hand at any time):
#   .venv/bin/fedmitr bench --merge bench/*/bench.json --out assets/bench
# The 16-token from-scratch cells also run IID (alpha "iid").
# SEEDS (default 0,1,2), METHODS (default: the references, dense-kd, sparse-kd, fedmitr,
# fedmitr-unweighted (FedMITR taught by the plain ensemble: the bridge between sparse-kd and fedmitr)
# and the paper's generator baselines dense-gen (DENSE) and co-boosting (Co-Boosting); the other
# ablations are left out) and
# EQUAL_TIME (default none; e.g. "fedmitr" adds the @time rows) choose the size. CELLS replaces the
# queue's order with your own, e.g. CELLS="cpu-49:fractal:0.1:1 cpu:scratch:0.5:2".
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
SEEDS="${SEEDS:-0,1,2}"
AFTER="${AFTER:-}"  # pids to wait for before each worker starts (a map resumed beside running cells)
METHODS="${METHODS:-fedavg,ensemble,dense-kd,sparse-kd,fedmitr,fedmitr-unweighted,dense-gen,co-boosting}"
time_flags=(--no-equal-time); [ -n "${EQUAL_TIME:-}" ] && time_flags=(--equal-time "$EQUAL_TIME")
mkdir -p bench && rm -rf bench/*.claim  # claims of a map that was stopped
cells=()  # seed by seed, so a map cut short covers every setting: 16 tokens (fast cells), then 49; pretrained before scratch; then alpha
for seed in ${SEEDS//,/ }; do
  for preset in cpu cpu-49; do
    for init in fractal scratch; do
      alphas="0.1 0.5"; [ "$preset:$init" = cpu:scratch ] && alphas="0.1 0.5 iid"
      for alpha in $alphas; do cells+=("$preset $init $alpha $seed"); done
    done
  done
done
[ -n "${CELLS:-}" ] && { cells=(); for c in $CELLS; do cells+=("${c//:/ }"); done; }
worker() {
  for cell in "${cells[@]}"; do
    read -r preset init alpha seed <<<"$cell"
    out="bench/$preset-$init-a$alpha-s$seed"
    [ -f "$out/bench.json" ] && continue
    mkdir "$out.claim" 2>/dev/null || continue  # the other worker has it
    .venv/bin/fedmitr bench --preset "$preset" --init "$init" --methods "$METHODS" --alphas "$alpha" \
      --seeds "$seed" "${time_flags[@]}" --out "$out" || echo "cell $cell failed"
    rmdir "$out.claim"
  done
}
lane() {  # lane N [PID]: wait for PID (a cell still running), then work
  [ -n "${2:-}" ] && while kill -0 "$2" 2>/dev/null; do sleep 5; done
  worker >> "bench-lane$1.log" 2>&1
}
read -r -a after <<<"${AFTER//,/ }"
lane 1 "${after[0]:-}" &
lane 2 "${after[1]:-}" &
wait
.venv/bin/fedmitr bench --merge bench/*/bench.json --out assets/bench
