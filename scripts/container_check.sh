#!/usr/bin/env bash
# Build the Dockerfile into an image and check the web app inside it, on a machine without a Docker
# engine: buildah (chroot isolation, host network) on a Debian bookworm base made with debootstrap.
#
#   bash scripts/container_check.sh
#
# From a clean state it installs buildah, debootstrap and podman (as root, with apt-get) if they are
# missing, makes and imports the base image if it is missing, builds the image (cached layers are
# reused), starts `python app/app.py` in a working container, and checks from outside: the page
# answers 200, /config lists components, and a tiny run through the API finishes. It then reports
# which torch the image holds, stops the app, removes the working container (the images stay, for
# the next build's cache) and prints a summary. Any failure exits non-zero with the reason.
#
# Environment (all optional):
#   FEDMITR_CONTAINER_DIR  work folder: the base's root file system and the logs (/var/tmp/fedmitr-container)
#   FEDMITR_BASE_IMAGE     the imported Debian base (localhost/fedmitr-bookworm-py311)
#   FEDMITR_IMAGE          the image built (localhost/fedmitr-app)
#   FEDMITR_TORCH          cpu: the CPU-only wheels from download.pytorch.org (the Dockerfile's default);
#                          pypi: PyPI's default build (CUDA on x86_64); auto (default): cpu when
#                          download.pytorch.org answers, else pypi, with a warning
#   FEDMITR_NO_CACHE=1     rebuild every layer
#   FEDMITR_CLIENT_PYTHON  a Python with gradio_client, for the API check (the repository's .venv)
#   FEDMITR_PORT           the port the app serves on during the check (a free one)
#   FEDMITR_START_TIMEOUT / FEDMITR_RUN_TIMEOUT  seconds to wait for the page / the tiny run (600 / 900)
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
WORK="${FEDMITR_CONTAINER_DIR:-/var/tmp/fedmitr-container}"
BASE_IMAGE="${FEDMITR_BASE_IMAGE:-localhost/fedmitr-bookworm-py311}"
IMAGE="${FEDMITR_IMAGE:-localhost/fedmitr-app}"
TORCH_MODE="${FEDMITR_TORCH:-auto}"
CLIENT_PY="${FEDMITR_CLIENT_PYTHON:-$REPO/.venv/bin/python}"
START_TIMEOUT="${FEDMITR_START_TIMEOUT:-600}"
RUN_TIMEOUT="${FEDMITR_RUN_TIMEOUT:-900}"
LOGS="$WORK/logs"
ROOTFS="$WORK/rootfs"
PYPI_CPU_INDEX=https://download.pytorch.org/whl/cpu

CTR=""
APP_PID=""
declare -a PHASES=()

say() { printf '[container_check] %s\n' "$*"; }
fail() { printf '[container_check] FAILED: %s\n' "$*" >&2; exit 1; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }
phase_done() { PHASES+=("$(printf '%-22s %7s s' "$1" "$(since "$2")")"); }

stop_app() {
  if [[ -n "$APP_PID" ]] && kill -0 "$APP_PID" 2>/dev/null; then
    # The app was started with setsid: its process group holds buildah run and everything it started.
    kill -TERM -- "-$APP_PID" 2>/dev/null || true
    for _ in $(seq 1 20); do kill -0 "$APP_PID" 2>/dev/null || break; sleep 0.5; done
    kill -KILL -- "-$APP_PID" 2>/dev/null || true
    wait "$APP_PID" 2>/dev/null || true
  fi
  APP_PID=""
}

cleanup() {
  local rc=$?
  stop_app
  if [[ -n "$CTR" ]]; then buildah rm "$CTR" >/dev/null 2>&1 || true; CTR=""; fi
  if [[ $rc -ne 0 ]]; then say "logs: $LOGS"; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

mkdir -p "$LOGS"
cd "$REPO"
[[ -f Dockerfile ]] || fail "no Dockerfile in $REPO"

# --- 1. tools --------------------------------------------------------------------------------------
t=$(now)
missing=()
for tool in buildah podman debootstrap curl; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if ((${#missing[@]})); then
  [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null \
    || fail "missing ${missing[*]}; install them (Debian: apt-get install -y buildah podman debootstrap curl) or run as root"
  say "installing ${missing[*]} with apt-get"
  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah podman debootstrap curl; } \
    >"$LOGS/apt.log" 2>&1 || fail "apt-get install failed (see $LOGS/apt.log)"
fi
[[ -x "$CLIENT_PY" ]] || CLIENT_PY="$(command -v python3)"
"$CLIENT_PY" -c "import gradio_client" 2>/dev/null \
  || fail "$CLIENT_PY has no gradio_client (set FEDMITR_CLIENT_PYTHON, or pip install -r requirements.txt in .venv)"
phase_done "tools" "$t"

# --- 2. base image ---------------------------------------------------------------------------------
t=$(now)
if podman image exists "$BASE_IMAGE"; then
  say "base image $BASE_IMAGE present"
else
  if [[ ! -x "$ROOTFS/usr/bin/python3" ]]; then
    say "debootstrap: Debian bookworm with python3, python3-venv and python3-pip (a minute or two)"
    rm -rf "$ROOTFS.partial"
    nice -n 19 debootstrap --variant=minbase --include=python3,python3-venv,python3-pip bookworm \
      "$ROOTFS.partial" >"$LOGS/debootstrap.log" 2>&1 || fail "debootstrap failed (see $LOGS/debootstrap.log)"
    # Downloaded packages and indexes are not needed in the image.
    rm -rf "$ROOTFS.partial"/var/cache/apt/archives/*.deb "$ROOTFS.partial"/var/lib/apt/lists/*
    rm -rf "$ROOTFS" && mv "$ROOTFS.partial" "$ROOTFS"
  fi
  # Trust the CAs this machine adds to Debian's (a TLS-inspecting proxy's, say), so pip in the build
  # reaches PyPI as the host does; PIP_CERT makes pip use the system bundle rather than its own.
  shopt -s nullglob
  extra_cas=(/usr/local/share/ca-certificates/*.crt)
  shopt -u nullglob
  if ((${#extra_cas[@]})); then
    say "adding this machine's ${#extra_cas[@]} extra CA certificate(s) to the base"
    mkdir -p "$ROOTFS/usr/local/share/ca-certificates"
    cp "${extra_cas[@]}" "$ROOTFS/usr/local/share/ca-certificates/"
    chroot "$ROOTFS" update-ca-certificates >"$LOGS/ca.log" 2>&1 || fail "update-ca-certificates failed (see $LOGS/ca.log)"
  fi
  say "importing $ROOTFS as $BASE_IMAGE"
  tar -C "$ROOTFS" -c . | podman import --change "ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt" - "$BASE_IMAGE" \
    >"$LOGS/import.log" 2>&1 || fail "podman import failed (see $LOGS/import.log)"
fi
phase_done "base image" "$t"

# --- 3. build --------------------------------------------------------------------------------------
case "$TORCH_MODE" in
  auto)
    if curl -fsS -m 15 -o /dev/null "$PYPI_CPU_INDEX/torch/" 2>/dev/null; then
      TORCH_MODE=cpu
    else
      TORCH_MODE=pypi
      say "WARNING: $PYPI_CPU_INDEX cannot be reached from here: building with PyPI's torch (a CUDA build, ~5 GB)"
    fi ;;
  cpu | pypi) ;;
  *) fail "FEDMITR_TORCH must be auto, cpu or pypi (got $TORCH_MODE)" ;;
esac
build_args=(--build-arg "BASE=$BASE_IMAGE")
if [[ $TORCH_MODE == pypi ]]; then
  build_args+=(--build-arg TORCH_INDEX=https://pypi.org/simple --build-arg TORCH_LOCAL=)
fi
cache_args=(--layers)
[[ "${FEDMITR_NO_CACHE:-0}" == 1 ]] && cache_args+=(--no-cache)
say "building $IMAGE (torch: $TORCH_MODE; log: $LOGS/build.log)"
t=$(now)
nice -n 19 buildah bud --isolation chroot --force-rm "${cache_args[@]}" "${build_args[@]}" -t "$IMAGE" -f Dockerfile . \
  >"$LOGS/build.log" 2>&1 || { tail -n 30 "$LOGS/build.log" >&2; fail "buildah bud failed (see $LOGS/build.log)"; }
phase_done "build" "$t"
image_bytes=$(podman image inspect --format '{{.Size}}' "$IMAGE")
base_bytes=$(podman image inspect --format '{{.Size}}' "$BASE_IMAGE")
podman history --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" >"$LOGS/layers.txt" 2>&1 || true

# --- 4. start the app ------------------------------------------------------------------------------
port="${FEDMITR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
url="http://127.0.0.1:$port"
CTR=$(buildah from "$IMAGE")
run_env=(--env HF_HUB_OFFLINE=1 --env HF_DATASETS_OFFLINE=1 --env GRADIO_ANALYTICS_ENABLED=False
         --env "GRADIO_SERVER_PORT=$port")
say "starting the app in $CTR on port $port (log: $LOGS/app.log)"
t=$(now)
setsid buildah run --isolation chroot "${run_env[@]}" "$CTR" python app/app.py >"$LOGS/app.log" 2>&1 &
APP_PID=$!
deadline=$((SECONDS + START_TIMEOUT))
until curl -fsS -m 5 -o /dev/null "$url/" 2>/dev/null; do
  kill -0 "$APP_PID" 2>/dev/null || { tail -n 30 "$LOGS/app.log" >&2; fail "the app exited before serving (see $LOGS/app.log)"; }
  ((SECONDS < deadline)) || { tail -n 30 "$LOGS/app.log" >&2; fail "no page at $url/ after ${START_TIMEOUT}s"; }
  sleep 1
done
phase_done "first page" "$t"

# --- 5. page, config and a tiny run through the API -------------------------------------------------
code=$(curl -sS -m 30 -o /dev/null -w '%{http_code}' "$url/")
[[ $code == 200 ]] || fail "GET / answered $code"
components=$(curl -fsS -m 30 "$url/config" | python3 -c 'import json, sys; print(len(json.load(sys.stdin).get("components", [])))') \
  || fail "GET /config did not answer JSON"
((components > 0)) || fail "/config lists no components"
say "GET / -> 200; /config lists $components components"

say "tiny run through /run (log: $LOGS/api.log)"
t=$(now)
GRADIO_ANALYTICS_ENABLED=False timeout "$RUN_TIMEOUT" "$CLIENT_PY" - "$url/" >"$LOGS/api.log" 2>&1 <<'PY' || { cat "$LOGS/api.log" >&2; fail "the tiny run through the API failed"; }
import sys
import time

from gradio_client import Client

# The Run form's fields (app/form.py FormValues), by name.
TINY = dict(dataset="mnist5k", clients=3, alpha="0.5", methods=["fedavg", "ensemble"], preset="tiny", epochs=2,
            iterations=8, images=8, keep=0.8, relabel="neighbourhood", rounds=2, seed=0, init="scratch")

client = Client(sys.argv[1], verbose=False, download_files=False, analytics_enabled=False)
info = client.view_api(return_format="dict", print_info=False)
endpoint = info["named_endpoints"].get("/run")
if endpoint is None:
    sys.exit(f"the app has no /run endpoint: {sorted(info['named_endpoints'])}")
names = [p["parameter_name"] for p in endpoint["parameters"]]
if set(names) != set(TINY):
    print(f"note: /run takes {names}; sending only those (left at their defaults: {sorted(set(names) - set(TINY))}, "
          f"not sent: {sorted(set(TINY) - set(names))})")
start = time.monotonic()
job = client.submit(**{k: v for k, v in TINY.items() if k in names}, api_name="/run")
updates = list(job)
seconds = time.monotonic() - start
if not job.status().success:
    sys.exit(f"the run failed: {job.exception()!r}")
if not updates:
    sys.exit("the run streamed no updates")
status = str(updates[-1][0])
print(f"{len(updates)} updates in {seconds:.1f} s; last status: {status[:300]}")
if "Finished" not in status:
    sys.exit("the last update's status does not say Finished")
print(f"RUN_SECONDS={seconds:.1f}")
PY
run_seconds=$(sed -n 's/^RUN_SECONDS=//p' "$LOGS/api.log")
phase_done "tiny run (API)" "$t"
sed -n '1,3p' "$LOGS/api.log" | sed 's/^/  /'

# --- 6. the torch inside ---------------------------------------------------------------------------
stop_app
t=$(now)
buildah run --isolation chroot "$CTR" python - >"$LOGS/torch.txt" 2>&1 <<'PY' || { cat "$LOGS/torch.txt" >&2; fail "could not inspect torch in the image"; }
import os
import platform
import sys
import sysconfig

import torch


def size_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                total += os.path.getsize(full)
    return total / 2**20


site = sysconfig.get_paths()["purelib"]
print(f"python={platform.python_version()} uid={os.getuid()} home={os.environ.get('HOME')} cwd={os.getcwd()}")
print(f"torch={torch.__version__}")
print(f"cuda={torch.version.cuda}")
print(f"cuda_available={torch.cuda.is_available()}")
print(f"torch_mb={size_mb(os.path.join(site, 'torch')):.0f}")
print(f"nvidia_mb={size_mb(os.path.join(site, 'nvidia')):.0f}")
print(f"site_packages_mb={size_mb(site):.0f}")
print(f"home_writable={os.access(os.environ.get('HOME', '/nonexistent'), os.W_OK)}")
sys.exit(0)
PY
phase_done "torch check" "$t"
val() { sed -n "s/.*\b$1=\([^ ]*\).*/\1/p" "$LOGS/torch.txt" | head -n 1; }
[[ $(val cuda_available) == False ]] || fail "torch.cuda.is_available() is not False in the container ($(val cuda_available))"
[[ $(val home_writable) == True ]] || fail "\$HOME is not writable for the app's user in the container"
torch_build="CPU-only"
[[ $(val cuda) == None ]] || torch_build="CUDA $(val cuda) build (runs on the CPU here)"
if [[ "${FEDMITR_TORCH:-auto}" == cpu && $(val cuda) != None ]]; then fail "asked for CPU-only torch, got $(val torch)"; fi

# --- summary ---------------------------------------------------------------------------------------
mb() { awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1e6 }'; }
echo
echo "== container check passed ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores) =="
echo "image           $IMAGE: $(mb "$image_bytes") (base $BASE_IMAGE: $(mb "$base_bytes"))"
echo "torch           $(val torch), $torch_build; cuda available: $(val cuda_available)"
echo "site-packages   $(val site_packages_mb) MB, of which torch $(val torch_mb) MB and nvidia $(val nvidia_mb) MB"
echo "python          $(sed -n 's/^python=\([^ ]*\).*/\1/p' "$LOGS/torch.txt"), $(sed -n 's/^python=[^ ]* \(uid=[^ ]*\).*/\1/p' "$LOGS/torch.txt")"
echo "page            GET / 200, /config: $components components; tiny run (fedavg + ensemble) ${run_seconds} s"
echo "phases (s):"
printf '  %s\n' "${PHASES[@]}"
