"""Train a LoRA from a run config, outside the ComfyUI server: `python -m klein_lora_studio.train CONFIG`.

The same training loop as the Klein LoRA Trainer node (trainer.training.loop.train_lora), on a model loaded
through ComfyUI's own loaders (ComfyUI used as a library). Data parallel on several GPUs:

    accelerate launch --num_processes 2 -m klein_lora_studio.train CONFIG
    torchrun --nproc_per_node 2 -m klein_lora_studio.train CONFIG --cpu      (CPU processes, gloo)

Progress is printed as JSON lines (see trainer/jobs/events.py); logs go to stderr.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klein_lora_studio.train", description=__doc__.splitlines()[0])
    parser.add_argument("config", nargs="?", help="run config (.json, .yaml): written by the trainer node's export_config")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default: COMFYUI_PATH, the config's "
                                                        "comfyui.path, or the ComfyUI this pack is installed in)")
    parser.add_argument("--base-directory", default=None,
                        help="ComfyUI's --base-directory (models/, input/, output/); default: the config's")
    parser.add_argument("--cpu", action="store_true", help="train on the CPU (tests; torchrun for several processes)")
    parser.add_argument("--resume-from", default=None, help="override train.resume_from ('latest' or a checkpoint)")
    parser.add_argument("--no-sampling", action="store_true", help="do not sample the config's prompt suite (the "
                                                                   "trainer node's job mode samples in ComfyUI)")
    parser.add_argument("--await-verdicts", action="store_true",
                        help="stopping at the peak, wait after each checkpoint for the parent's verdict on stdin (the "
                             "trainer node's job mode judges the checkpoints in ComfyUI)")
    parser.add_argument("--schema", action="store_true", help="print the run config's JSON Schema and exit")
    args = parser.parse_args(argv)
    if args.schema:
        from .trainer.jobs.config import json_schema

        sys.stdout.write(json.dumps(json_schema(), indent=2) + "\n")
        return 0
    if args.config is None:
        parser.error("give a run config (or --schema)")
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")

    import torch

    from .trainer.jobs import config as run_config
    from .trainer.jobs import runner
    from .trainer.jobs.events import emit_line
    from .trainer.training import distributed

    cpu = args.cpu or not torch.cuda.is_available()
    ranks = distributed.from_accelerate(cpu=cpu)  # before ComfyUI: it takes the current CUDA device as its own
    try:
        cfg = run_config.load(args.config)
        if args.resume_from is not None:
            cfg.train.resume_from = args.resume_from.strip()
        comfy_dir = runner.find_comfyui(args.comfyui, cfg)
        runner.boot_comfyui(comfy_dir, args.base_directory or cfg.comfyui.base_directory, cpu)
        _register_dev_models(run_config.DEV_CLIP_TYPE)
        runner.run(cfg, ranks, sample=not args.no_sampling, await_verdicts=args.await_verdicts)
    except (ValueError, OSError, torch.OutOfMemoryError) as e:  # ConfigError, the trainer's clear errors: one line
        if ranks.is_main:
            emit_line("error", message=str(e), kind=type(e).__name__)
        logging.error("Klein LoRA: %s", e)
        return 2
    finally:
        if ranks.distributed:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
    return 0


def _register_dev_models(clip_type: str) -> None:
    """The pack's tests name their tiny text encoder in configs; only their environment turns it on."""
    import os

    if os.environ.get("KLEIN_LORA_DEV_NODES") == "1":
        from .devtools.tiny_models import tiny_clip
        from .trainer.jobs.runner import register_clip_loader

        register_clip_loader(clip_type, lambda files: tiny_clip(files[0]))


if __name__ == "__main__":
    sys.exit(main())
