#!/usr/bin/env bash
# Create .venv and install the pinned requirements plus this package, if not done yet.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/fedmitr ] || [ requirements.txt -nt .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  python3.11 -m venv .venv
  .venv/bin/pip install -q -r requirements.txt -e . 2>&1 | grep -v "^WARNING: Location" || true
  touch .venv/.installed
fi
