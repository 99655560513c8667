#!/usr/bin/env bash
# Create (or reuse) the Python environment the pack, its tests and the demo run in:
# torch + torchvision pinned as COMFYUI.md says, ComfyUI's requirements, the pack's requirements.
# KLEIN_VENV picks the folder (default /opt/klein-venv); COMFYUI_PATH the ComfyUI checkout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KLEIN_VENV:-/opt/klein-venv}"
comfy="${COMFYUI_PATH:-$here/../shared/ComfyUI}"
stamp="$venv/.klein-deps-$(cat "$comfy/requirements.txt" "$here/requirements.txt" "$here/requirements-dev.txt" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip install -q --disable-pip-version-check"
$pip torch==2.14.1 torchvision==0.29.1
$pip -r "$comfy/requirements.txt"
$pip -r "$here/requirements.txt" -r "$here/requirements-dev.txt"
touch "$stamp"
