#!/usr/bin/env bash
# Set up the environment (idempotent) and run the main job: the example style workflow, headless.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export COMFYUI_PATH="${COMFYUI_PATH:-$(cd "$here/.." && pwd)/shared/ComfyUI}"
bash "$here/scripts/setup_env.sh"
pkg="$(mktemp -d)"; ln -s "$here" "$pkg/klein_lora_studio"
cd "$pkg" && exec "${KLEIN_VENV:-/opt/klein-venv}/bin/python" -m klein_lora_studio.devtools.demo "$@"
