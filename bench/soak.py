"""Soak: a long tiny-model CPU run through train_lora, checking that resident memory does not grow.

    COMFYUI_PATH=../shared/ComfyUI python bench/soak.py --steps 10000 [--save-every 500] [--out bench/results/soak.json]

Trains the tiny random klein model (devtools/tiny_models.py) on random 64x64 latents, with a checkpoint
and full training state every `--save-every` steps, and samples the process's RSS (psutil) every
`--every` steps. "start" is the RSS after a warm-up of `--warmup` steps (allocator pools, lazy imports
and the first checkpoint write settle there); the step-1 figure is reported too. Pass: growth <= 2%.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _comfy(base: Path) -> None:
    """ComfyUI as a library (CPU), and this repo importable as the package klein_lora_studio."""
    import runpy

    comfyui = Path(os.environ.get("COMFYUI_PATH", REPO.parent / "shared" / "ComfyUI")).resolve()
    runpy.run_path(str(REPO / "devtools" / "package_root.py"))["make_importable"](REPO)
    from klein_lora_studio.trainer.jobs import comfy_library

    comfy_library.boot(comfyui, base, cpu=True, extra_model_paths=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10000)
    ap.add_argument("--save-every", type=int, default=500)
    ap.add_argument("--every", type=int, default=250, help="RSS sample interval in steps")
    ap.add_argument("--warmup", type=int, default=500, help="steps before the 'start' RSS")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=None, help="write the samples as JSON here")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    import psutil
    import torch

    torch.set_num_threads(args.threads)
    base = Path(tempfile.mkdtemp(prefix="klein-soak-"))
    for sub in ("models", "input", "output", "user", "temp"):
        (base / sub).mkdir()
    _comfy(base)
    import comfy.sd
    import folder_paths
    from klein_lora_studio.devtools import tiny_models
    from klein_lora_studio.trainer.data import dataset as ds
    from klein_lora_studio.trainer.model import targets as tg
    from klein_lora_studio.trainer.training import loop

    files = tiny_models.write_tiny_models(folder_paths.models_dir)
    unet = comfy.sd.load_diffusion_model(str(files["unet"]))
    dm = unet.model.diffusion_model
    g = torch.Generator().manual_seed(0)
    n = 4
    data = ds.KleinDataset([torch.randn(dm.img_in.in_features, 4, 4, generator=g) for _ in range(n)],
                           [torch.randn(64, dm.txt_in.in_features, generator=g) for _ in range(n)],
                           ["c"] * n, [f"{i}.png" for i in range(n)], 64, "zxq", "soak")
    targets = tg.resolve_targets(tg.GROUPS, "attention", tg.BlockCounts.of_model(dm))
    cfg = loop.TrainConfig(rank=4, alpha=4, learning_rate=1e-4, steps=args.steps, save_every=args.save_every,
                           output_name="soak", save_dtype="bf16")
    proc = psutil.Process()
    samples: list[dict] = []
    t0 = time.perf_counter()

    def on_step(step: int, total: int, loss: float) -> None:
        if step == 1 or step % args.every == 0 or step == total:
            samples.append({"step": step, "rss_mib": proc.memory_info().rss / 2**20,
                            "seconds": time.perf_counter() - t0, "loss": loss})
            print(f"step {step:6d}  rss {samples[-1]['rss_mib']:8.1f} MiB  {samples[-1]['seconds']:7.1f}s  "
                  f"loss {loss:.4f}", flush=True)

    out_dir = Path(folder_paths.get_folder_paths("loras")[0])
    loop.train_lora(unet, data, targets, cfg, out_dir, loop.TrainHooks(on_step=on_step))
    warm = next((s for s in samples if s["step"] >= args.warmup), samples[0])
    end = samples[-1]
    growth = (end["rss_mib"] - warm["rss_mib"]) / warm["rss_mib"]
    summary = {"steps": args.steps, "save_every": args.save_every, "threads": args.threads,
               "rss_step1_mib": samples[0]["rss_mib"], "rss_start_mib": warm["rss_mib"], "start_step": warm["step"],
               "rss_end_mib": end["rss_mib"], "growth": growth, "seconds": end["seconds"],
               "ms_per_step": 1000 * end["seconds"] / args.steps, "pass": growth <= 0.02, "samples": samples}
    print(json.dumps({k: v for k, v in summary.items() if k != "samples"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return 0 if summary["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
