"""The main job, headless: boot ComfyUI with this pack, train the example style LoRA, print the files.

    python -m klein_lora_studio.devtools.demo [--base DIR] [--steps N]

With real klein weights in DIR/models (flux-2-klein-base-4b.safetensors, qwen_3_4b.safetensors,
flux2-vae.safetensors) and images in DIR/input/klein_style_dataset, it runs the workflow as shipped.
Otherwise it writes the tiny random klein models and a synthetic concept dataset, and runs the same
graph on them (the tiny text encoder through the dev loader node), so every step of the real path
runs on any machine.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from pathlib import Path

from .. import run as runner
from .package_root import package_parent
from .server import ComfyServer, prepare_base
from .workflows import api_path, to_tiny

REAL_FILES = ("diffusion_models/flux-2-klein-base-4b.safetensors", "text_encoders/qwen_3_4b.safetensors",
              "vae/flux2-vae.safetensors")


def _tiny_assets(base: Path, comfyui: Path) -> None:
    """Tiny models and a concept dataset, written in a child process that imports ComfyUI as a library."""
    import subprocess

    code = (
        "import sys, pathlib; comfyui, base = sys.argv[1], sys.argv[2];"
        "from klein_lora_studio.trainer.jobs import comfy_library; comfy_library.boot(comfyui, base, cpu=True);"
        "import folder_paths;"
        "from klein_lora_studio.devtools.tiny_models import write_tiny_models; write_tiny_models(folder_paths.models_dir);"
        "from klein_lora_studio.devtools.datasets import write_concept_dataset;"
        "write_concept_dataset(pathlib.Path(base) / 'input' / 'klein_style_dataset', n=6, size=64)"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_parent()), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", code, str(comfyui), str(base)], check=True, env=env)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the example style LoRA headless in a real ComfyUI.")
    ap.add_argument("--base", type=Path, default=Path(os.environ.get("KLEIN_DEMO_DIR", Path.home() / ".cache" / "klein-demo")),
                    help="ComfyUI --base-directory (models/, input/, output/) for the demo")
    ap.add_argument("--steps", type=int, default=30, help="training steps on the tiny models")
    args = ap.parse_args(argv)
    comfyui = Path(os.environ.get("COMFYUI_PATH", Path(__file__).resolve().parents[1] / ".." / "shared" / "ComfyUI"))
    base = prepare_base(args.base.resolve())
    api = json.loads(api_path("klein_style_lora").read_text(encoding="utf-8"))
    real = all((base / "models" / f).exists() for f in REAL_FILES) and (base / "input" / "klein_style_dataset").is_dir()
    if not real:
        print(f"no klein weights in {base / 'models'}: running the workflow on tiny random klein models")
        _tiny_assets(base, comfyui)
        api = to_tiny(api, "klein_style_dataset", steps=args.steps, save_every=10, output_name="klein_style_demo")
    with ComfyServer(comfyui, base, dev_nodes=not real) as url:
        print(f"ComfyUI at {url} (log: {base / 'comfyui.log'})")
        return asyncio.run(runner.run(api, url))


if __name__ == "__main__":
    sys.exit(main())
