#!/usr/bin/env bash
# A Flower federation on this machine (insecure, loopback), one step per terminal:
#
#   bash examples/flower/federation.sh superlink          # terminal 1: the SuperLink
#   bash examples/flower/federation.sh supernode 0 3      # terminals 2-4: client 0, 1, 2 of 3
#   bash examples/flower/federation.sh connect            # once: the flwr CLI's connection "fedmitr"
#   bash examples/flower/federation.sh run "preset='tiny'"  # submit the app, stream its log until it ends
#
# Flower starts helper programs (flower-superexec) by name, so they must be on PATH: this script
# puts the repository's .venv/bin first (set FEDMITR_VENV for another environment), so nothing has
# to be activated by hand. Environment: FEDMITR_FLOWER_PORT (SuperLink port, default 8000),
# FLWR_HOME (Flower's config and installed apps, default ~/.flwr).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="${FEDMITR_VENV:-$ROOT/.venv}"
export PATH="$VENV/bin:$PATH"
PORT="${FEDMITR_FLOWER_PORT:-8000}"
CONNECTION="fedmitr"

usage() { sed -n '2,12p' "$0" >&2; exit 2; }
[ -x "$VENV/bin/flower-superlink" ] || { echo "no Flower in $VENV: run 'bash scripts/setup.sh' first" >&2; exit 1; }

case "${1:-}" in
  superlink)
    exec flower-superlink --insecure --host 127.0.0.1 --port "$PORT" --disable-runtime-dependency-installation ;;
  supernode)
    [ $# -eq 3 ] || usage
    k="$2"; n="$3"
    exec flower-supernode --insecure --superlink "127.0.0.1:$PORT" --host 127.0.0.1 --port "$((9094 + k))" \
      --node-config "partition-id=$k num-partitions=$n" ;;
  connect)
    # Adds (or updates) [superlink.fedmitr] in Flower's config and makes it the default connection.
    exec "$VENV/bin/python" - "${FLWR_HOME:-$HOME/.flwr}" "$CONNECTION" "127.0.0.1:$PORT" <<'PY'
import sys, tomllib
from pathlib import Path
import tomli_w
home, name, address = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
home.mkdir(parents=True, exist_ok=True)
path = home / "config.toml"
config = tomllib.loads(path.read_text()) if path.is_file() else {}
links = config.setdefault("superlink", {})
links[name] = {"address": address, "insecure": True}
links.setdefault("default", name)
path.write_text(tomli_w.dumps(config))
print(f"flwr connection '{name}' -> {address} (insecure) in {path}")
PY
    ;;
  run)
    extra=()
    [ $# -ge 2 ] && extra=(--run-config "$2")
    cd "$ROOT"
    exec flwr run examples/flower "$CONNECTION" --stream "${extra[@]}" ;;
  *) usage ;;
esac
