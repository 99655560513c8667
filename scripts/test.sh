#!/usr/bin/env bash
# Set up the environment (idempotent) and run the test suite against a real ComfyUI.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COMFYUI_PATH="${COMFYUI_PATH:-$(cd "$here/.." && pwd)/shared/ComfyUI}"
bash "$here/scripts/setup_env.sh"
cd "$here"
"${KLEIN_VENV:-/opt/klein-venv}/bin/python" -m ruff check .
exec "${KLEIN_VENV:-/opt/klein-venv}/bin/python" -m pytest -q -m "not slow" "$@" tests
