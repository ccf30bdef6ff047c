#!/usr/bin/env bash
# The main job: sets up .venv if needed, then serves the web app on http://localhost:7860 (offline,
# bundled MNIST by default). GRADIO_SERVER_NAME / GRADIO_SERVER_PORT change the address.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export GRADIO_ANALYTICS_ENABLED=False
exec .venv/bin/python app/app.py "$@"
