"""The main job, headless: boot ComfyUI with this pack, train the example style LoRA, print the files.

    python -m klein_lora_studio.devtools.demo [--base DIR] [--steps N]

With real klein weights in DIR/models (flux-2-klein-base-4b.safetensors, qwen_3_4b.safetensors,
flux2-vae.safetensors) and images in DIR/input/klein_style_dataset, it runs the workflow as shipped.
Otherwise it runs the shipped character graph on the micro klein models pretrained on the micro world
(microworld/): a character dataset of that world (the "kwyx" figure, a fixed two-colour composite), a short
schedule, then a before/after grid on held-out prompts with and without the trigger, every cell graded by the
reader; it prints the grid's path and the counts. (The character, not the style: on this base the pastel style
does not bind to its trigger at CPU sizes, the character does; docs/quality.md.) The micro run uses a ComfyUI base
directory of its own, DIR/micro-world, so models left in DIR/models by an earlier run (the tiny random taef2 pair, or a
real taef2 of yours) never clash with the micro taef2. Without the micro weights it falls back to the
tiny random models (every step of the real path runs, but they learn nothing visible).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from .. import run as runner
from .package_root import package_parent
from .server import ComfyServer, prepare_base
from .workflows import api_path, to_tiny

REAL_FILES = ("diffusion_models/flux-2-klein-base-4b.safetensors", "text_encoders/qwen_3_4b.safetensors",
              "vae/flux2-vae.safetensors")


MICRO_CONCEPT, MICRO_WORKFLOW = "character", "klein_character_lora"
MICRO_DATASET, MICRO_IMAGES, MICRO_LORA = "klein_micro_character", 24, "klein_micro_character_demo"
GRID_FILE = "klein_demo_before_after.png"
GRID_CELLS = "klein_demo_before_after.json"  # the grid's prompts and the reader's verdict on every cell
MICRO_BASE = "micro-world"  # the micro run's ComfyUI base directory, inside --base
# 300 steps at 5x the character recipe's rate: on 16 held-out prompts the quality bench measured the character on
# 50% of triggered prompts and 6% of untriggered ones there (bench/results/quality_cpu9_char5x.json); ~2 min at
# 0.37 s/step on one thread of this CPU
MICRO_STEPS, MICRO_LR = 300, 1e-3
MICRO_GRID_PROMPTS = 8  # held-out prompts in the grid, each with and without the trigger
_BOOT = ("import sys, pathlib; comfyui, base = sys.argv[1], sys.argv[2];"
         "from klein_lora_studio.trainer.jobs import comfy_library; comfy_library.boot(comfyui, base, cpu=True);"
         "import folder_paths;")


def _in_comfy(base: Path, comfyui: Path, code: str) -> None:
    """Run `code` in a child process that imports ComfyUI as a library on `base`."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(package_parent()), os.environ.get("PYTHONPATH", "")]))
    subprocess.run([sys.executable, "-c", _BOOT + code, str(comfyui), str(base)], check=True, env=env)


def _tiny_assets(base: Path, comfyui: Path) -> None:
    """Tiny random models and a synthetic concept dataset."""
    _in_comfy(base, comfyui,
              "from klein_lora_studio.devtools.tiny_models import write_tiny_models; write_tiny_models(folder_paths.models_dir);"
              "from klein_lora_studio.devtools.datasets import write_concept_dataset;"
              "write_concept_dataset(pathlib.Path(base) / 'input' / 'klein_style_dataset', n=6, size=64)")


def micro_available() -> bool:
    from ..microworld import models

    return models.MANIFEST.is_file()


def _micro_assets(base: Path, comfyui: Path) -> None:
    """The micro models (checked against their manifest) and a dataset of the micro world's concept."""
    _in_comfy(base, comfyui,
              "from klein_lora_studio.microworld import models, world; models.write_micro_models(folder_paths.models_dir);"
              f"world.write_dataset(pathlib.Path(base) / 'input' / {MICRO_DATASET!r}, {MICRO_CONCEPT!r}, {MICRO_IMAGES}, "
              "seed=0)")


def _micro_grid(base: Path, comfyui: Path) -> Path:
    """The before/after grid of the trained LoRA (microworld.showcase), written to output/ and summarised."""
    _in_comfy(base, comfyui,
              "from klein_lora_studio.microworld import models, showcase;"
              "from klein_lora_studio.trainer.paths import atomic_save_image;"
              "m, clip, vae = models.load_micro_models(folder_paths.models_dir);"
              f"sc = showcase.before_after(m, {MICRO_LORA + '.safetensors'!r}, clip, vae, {MICRO_CONCEPT!r}, "
              f"n={MICRO_GRID_PROMPTS});"
              f"out = pathlib.Path(base) / 'output'; atomic_save_image(sc.grid, out / {GRID_FILE!r});"
              f"showcase.save_cells(sc, out / {GRID_CELLS!r}); print(sc.summary())")
    return base / "output" / GRID_FILE


def to_micro(api: dict, steps: int) -> dict:
    """The shipped graph on the micro models: the micro text encoder through its dev loader, the recipe's rank and
    targets at a learning rate and step count for a 6M-parameter model, the concept's trigger, no sampling."""
    from ..microworld import models, world

    wf = to_tiny(api, MICRO_DATASET, steps=steps, resolution=128, save_every=0, output_name=MICRO_LORA)
    for node in wf.values():
        t, inp = node["class_type"], node["inputs"]
        if t == "UNETLoader":
            inp["unet_name"] = models.UNET_FILE
        elif t == "KleinTinyCLIPLoader":
            node["class_type"], node["inputs"] = "KleinMicroCLIPLoader", {"clip_name": models.TE_FILE}
        elif t == "KleinDatasetLoader":
            inp["trigger"] = world.CONCEPTS[MICRO_CONCEPT].trigger
        elif t == "KleinLoRATrainer":
            inp["recipe.learning_rate"] = MICRO_LR
    return wf


def _serve(api: dict, comfyui: Path, base: Path, dev_nodes: bool) -> int:
    """Post `api` to a headless ComfyUI on `base` and follow it; the run's exit code."""
    with ComfyServer(comfyui, base, dev_nodes=dev_nodes) as url:
        print(f"ComfyUI at {url} (log: {base / 'comfyui.log'})")
        return asyncio.run(runner.run(api, url))


def micro_demo(comfyui: Path, base: Path, steps: int) -> int:
    """Set up the micro world in `base`, train the concept's shipped graph (MICRO_WORKFLOW), grade the before/after
    grid; prints each phase's wall time."""
    api = json.loads(api_path(MICRO_WORKFLOW).read_text(encoding="utf-8"))
    base = prepare_base(base)
    print(f"training a {MICRO_CONCEPT} LoRA on the micro klein models, ComfyUI base {base}")
    t0 = time.monotonic()
    _micro_assets(base, comfyui)
    t1 = time.monotonic()
    code = _serve(to_micro(api, steps), comfyui, base, dev_nodes=True)
    t2 = time.monotonic()
    if code != 0:
        return code
    grid = _micro_grid(base, comfyui)
    t3 = time.monotonic()
    print(f"before/after grid: {grid}\n  (the reader's verdict per cell: {grid.with_name(GRID_CELLS)})")
    print(f"wall time: set-up {t1 - t0:.0f} s, boot + training {steps} steps {t2 - t1:.0f} s, grid {t3 - t2:.0f} s; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Train the example style LoRA headless in a real ComfyUI.")
    ap.add_argument("--base", type=Path, default=Path(os.environ.get("KLEIN_DEMO_DIR", Path.home() / ".cache" / "klein-demo")),
                    help="ComfyUI --base-directory (models/, input/, output/) for the demo; the micro-world run "
                         f"uses DIR/{MICRO_BASE}")
    ap.add_argument("--steps", type=int, default=0,
                    help=f"training steps on the micro models (default {MICRO_STEPS}) or the tiny ones (default 30)")
    args = ap.parse_args(argv)
    comfyui = Path(os.environ.get("COMFYUI_PATH", Path(__file__).resolve().parents[1] / ".." / "shared" / "ComfyUI"))
    base = prepare_base(args.base.resolve())
    api = json.loads(api_path("klein_style_lora").read_text(encoding="utf-8"))
    real = all((base / "models" / f).exists() for f in REAL_FILES) and (base / "input" / "klein_style_dataset").is_dir()
    try:
        if real:
            return _serve(api, comfyui, base, dev_nodes=False)
        if micro_available():
            print(f"no klein weights in {base / 'models'}")
            return micro_demo(comfyui, base / MICRO_BASE, args.steps or MICRO_STEPS)
        print(f"no klein weights in {base / 'models'}: running the workflow on tiny random klein models")
        _tiny_assets(base, comfyui)
        api = to_tiny(api, "klein_style_dataset", steps=args.steps or 30, save_every=10, output_name="klein_style_demo")
        return _serve(api, comfyui, base, dev_nodes=True)
    except subprocess.CalledProcessError as e:
        print(f"demo: a set-up step failed (exit {e.returncode}); its error is printed above", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
