#!/usr/bin/env bash
# Create (or reuse) the Python environment the pack, its tests and the demo run in:
# torch + torchvision pinned as COMFYUI.md says, ComfyUI's requirements, the pack's requirements.
# KLEIN_VENV picks the folder (default /opt/klein-venv); COMFYUI_PATH the ComfyUI checkout.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${KLEIN_VENV:-/opt/klein-venv}"
comfy="${COMFYUI_PATH:-$here/../shared/ComfyUI}"
# Debian's chromium for tests/test_browser.py (Playwright drives it; Playwright's own browser download is
# never used). Only when it is missing and apt can install (root); otherwise the browser test skips, saying so.
if ! [ -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "setup_env: could not install chromium; tests/test_browser.py will skip" >&2
fi
stamp="$venv/.klein-deps-$(cat "$comfy/requirements.txt" "$here/requirements.txt" "$here/requirements-dev.txt" | sha1sum | cut -c1-12)"
if [ -f "$stamp" ]; then exit 0; fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip="$venv/bin/python -m pip install -q --disable-pip-version-check"
$pip torch==2.14.1 torchvision==0.29.1
$pip -r "$comfy/requirements.txt"
$pip -r "$here/requirements.txt" -r "$here/requirements-dev.txt"
touch "$stamp"
