#!/usr/bin/env bash
# Create .venv and install the pinned requirements plus this package, if not done yet.
# The first time takes 2-3 minutes (torch is a large download); pip shows its progress.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/fedmitr ] || [ ! -f .venv/.installed ] || [ requirements.txt -nt .venv/.installed ] \
   || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setup: creating .venv with python3.11 and installing requirements.txt (first time: 2-3 minutes)" >&2
  rm -f .venv/.installed
  python3.11 -m venv .venv
  if ! .venv/bin/pip install --progress-bar off -r requirements.txt -e ".[flower]"; then
    echo "setup: pip install failed (see above); .venv is not marked as installed, run this again after fixing it" >&2
    exit 1
  fi
  touch .venv/.installed
  echo "setup: done" >&2
fi
