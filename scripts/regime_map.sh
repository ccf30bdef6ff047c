#!/usr/bin/env bash
# The benchmark's map: {cpu (16 tokens), cpu-49 (49 tokens)} x clients {from scratch, pretrained on
# fractals} x alpha {0.1, 0.5} x seeds {0, 1, 2}, every method at equal iterations, the sparse ones
# also at equal time; then one merge into assets/bench/. Two lanes side by side, one torch thread
# each (a 2-core machine). Parts land in bench/ and can be merged early:
#   .venv/bin/fedmitr bench --merge bench/*/bench.json --out bench/map
# MORE=1 adds alpha 0.3 and IID with seeds 0 and 1.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1
B=".venv/bin/fedmitr bench"
ALL="fedavg,ensemble,dense-kd,sparse-kd,dense-relabel,fedmitr"
lane() {  # lane PRESET: both starts, alpha 0.1 and 0.5, three seeds
  for init in scratch fractal; do
    $B --preset "$1" --init $init --methods $ALL --alphas 0.1,0.5 --seeds 0,1,2 --out "bench/$1-$init"
  done
  if [ "${MORE:-0}" = 1 ]; then
    for init in scratch fractal; do
      $B --preset "$1" --init $init --methods $ALL --alphas 0.3,iid --seeds 0,1 --out "bench/$1-$init-more"
    done
  fi
}
lane cpu > bench-lane1.log 2>&1 &
lane cpu-49 > bench-lane2.log 2>&1 &
wait
$B --merge bench/*/bench.json --out assets/bench
