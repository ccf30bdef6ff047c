#!/usr/bin/env bash
# The benchmark's map, cell by cell: {cpu (16 tokens), cpu-49 (49 tokens)} x clients {pretrained on
# fractals, from scratch} x alpha {0.1, 0.5} x seeds, at equal iterations. Two workers side by side
# with one torch thread each (a 2-core machine) take cells from one queue in two passes:
#   pass A (METHODS_A): the references, dense-kd, sparse-kd and fedmitr, every cell and seed first
#     (about 5 minutes a 16-token cell here, 13 a 49-token one), so the method's own comparison is
#     complete before the expensive baselines;
#   pass B (METHODS_B): the paper's generator baselines dense-gen (DENSE) and co-boosting
#     (Co-Boosting), with the ensemble and fedmitr again beside them. The clients are trained again
#     from the same seed: bit for bit on one thread on the same machine, but another CPU's float
#     kernels give other clients, so pass B runs its own fedmitr to pair with (the merge keeps both;
#     means take pass A's record of a seed, differences pair records on the same clients).
# Within a pass the queue goes seed by seed, 16-token cells before 49-token ones. Each cell is one
# `fedmitr bench` call with its own folder under bench/ (pass B's ends in "-b"), copied when it
# finishes into assets/bench/map-cells, where the repository keeps every finished cell. A map cut
# short still leaves whole cells; a rerun (or a fresh clone) skips the kept ones (and a pass-B cell
# whose pass-A cell already holds co-boosting), and the merge at the end takes every kept cell,
# pass A first (or run it by hand):
#   .venv/bin/fedmitr bench --merge assets/bench/map-cells/*[0-9]/bench.json assets/bench/map-cells/*-[bc]/bench.json --out assets/bench
# The 16-token from-scratch cells also run IID (alpha "iid").
# SEEDS (default 0,1,2), METHODS_A, METHODS_B and EQUAL_TIME (default none; e.g. "fedmitr" adds the
# @time rows) choose the size. CELLS replaces the queue's cells with your own, e.g.
# CELLS="cpu-49:fractal:0.1:1 cpu:scratch:0.5:2" (both passes).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
SEEDS="${SEEDS:-0,1,2}"
AFTER="${AFTER:-}"  # pids to wait for before each worker starts (a map resumed beside running cells)
METHODS_A="${METHODS_A:-fedavg,ensemble,dense-kd,sparse-kd,fedmitr}"
METHODS_B="${METHODS_B:-ensemble,fedmitr,dense-gen,co-boosting}"
time_flags=(--no-equal-time); [ -n "${EQUAL_TIME:-}" ] && time_flags=(--equal-time "$EQUAL_TIME")
mkdir -p bench && rm -rf bench/*.claim  # claims of a map that was stopped
kept=assets/bench/map-cells  # the finished cells the repository keeps: a fresh clone goes on from them
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
  for pass in A B; do
    for cell in "${cells[@]}"; do
      read -r preset init alpha seed <<<"$cell"
      base="bench/$preset-$init-a$alpha-s$seed" out="$base" methods="$METHODS_A"
      if [ "$pass" = B ]; then
        out="$base-b" methods="$METHODS_B"
        grep -qs '"co-boosting"' "$kept/${base#bench/}/bench.json" && continue  # run whole, before the passes
      fi
      [ -f "$kept/${out#bench/}/bench.json" ] && continue  # finished, here or in an earlier map
      mkdir "$out.claim" 2>/dev/null || continue  # the other worker has it
      .venv/bin/fedmitr bench --preset "$preset" --init "$init" --methods "$methods" --alphas "$alpha" \
        --seeds "$seed" "${time_flags[@]}" --out "$out" \
        && mkdir -p "$kept/${out#bench/}" && cp "$out/bench.json" "$out/bench.md" "$kept/${out#bench/}/" \
        || echo "cell $cell pass $pass failed"
      rmdir "$out.claim"
    done
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
.venv/bin/fedmitr bench --merge "$kept"/*[0-9]/bench.json "$kept"/*-[bc]/bench.json --out assets/bench
