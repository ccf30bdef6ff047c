#!/usr/bin/env bash
# The benchmark's regime map: {cpu (16 tokens), cpu-49 (49 tokens)} x alpha {0.1, 0.3, 0.5, iid},
# 3 seeds at alpha 0.1 and 0.5, 2 elsewhere. Two lanes side by side, one torch thread each (a
# 2-core machine); about 3 h 15 min as measured (a 16-token cell ~15 min, a 49-token cell 21-28
# min); then one merge into assets/bench/. Parts land in bench/ and can be merged early:
# fedmitr bench --merge bench/*/bench.json --out bench/map
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
B=".venv/bin/fedmitr bench"
ALL="fedavg,ensemble,dense-kd,sparse-kd,dense-relabel,fedmitr"
HIGH="--preset cpu-49 --methods fedavg,ensemble,dense-kd,sparse-kd,fedmitr --equal-time fedmitr"  # no dense-relabel: time
(
  $B $HIGH --alphas 0.1,0.5 --seeds 0,1,2 --out bench/cpu49-a
  $B $HIGH --alphas 0.3 --seeds 0,1 --out bench/cpu49-b
) > bench-lane1.log 2>&1 &
(
  $B --preset cpu --methods $ALL --alphas 0.1,0.5 --seeds 0,1,2 --out bench/cpu-a
  $B --preset cpu --methods $ALL --alphas 0.3,iid --seeds 0,1 --out bench/cpu-b
  $B $HIGH --alphas iid --seeds 0,1 --out bench/cpu49-c
) > bench-lane2.log 2>&1 &
wait
$B --merge bench/cpu-a/bench.json bench/cpu-b/bench.json bench/cpu49-a/bench.json bench/cpu49-b/bench.json \
   bench/cpu49-c/bench.json --out assets/bench
