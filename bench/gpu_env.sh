# Sourced by every bench/gpu_*.sh at the repository root on the GPU machine (the `run` tool's carry: [".comfy",
# ".whl"]): the wheels into /tmp/site, the pack importable as klein_lora_studio, ComfyUI and the av stub on the path.
# (Session 9's first call left the av stub out by hand and its GPU tests failed to import ComfyUI: one copy now.)
python3 -m pip install -q -q --no-index --no-deps --target /tmp/site .whl/*.whl
mkdir -p /tmp/pk && ln -sfn "$PWD" /tmp/pk/klein_lora_studio
export PYTHONPATH=/tmp/site:/tmp/pk:$PWD/.comfy:$PWD/bench/avstub COMFYUI_PATH=$PWD/.comfy
