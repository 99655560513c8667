"""`python -m klein_lora_studio.train` on a card capped to KLEIN_BENCH_CAP_GIB, for bench_fsdp.py.

The cap (torch.cuda.set_per_process_memory_fraction) stands in for a smaller card: allocations past it fail
as they would there, and the trainer's shard_base 'auto' sees the capped size. ComfyUI's smart memory is
turned off so it loads the model into CPU memory first, as it does on a card too small for the model
(it reads the card's real free memory, which the cap does not change). After the run each rank prints
its peak allocated memory as a line `FSDP_PEAK {...}`.
"""
from __future__ import annotations

import json
import os
import sys

import torch


def main() -> int:
    try:
        import av  # noqa: F401
    except ImportError:  # the GPU machine has no PyAV; ComfyUI's video types import it (as bench_step.setup_comfy)
        sys.path.append(os.path.join(os.path.dirname(os.path.abspath(__file__)), "avstub"))
    from klein_lora_studio import train
    from klein_lora_studio.trainer.jobs import runner

    cap = float(os.environ.get("KLEIN_BENCH_CAP_GIB", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if cap and torch.cuda.is_available():
        total = torch.cuda.get_device_properties(local).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap * 2**30 / total), local)
    boot = runner.boot_comfyui

    def boot_without_smart_memory(*args, **kwargs):
        boot(*args, **kwargs)
        import comfy.model_management as mm

        mm.DISABLE_SMART_MEMORY = True
    if cap:
        runner.boot_comfyui = boot_without_smart_memory
    code = 1
    try:
        code = train.main(sys.argv[1:])
    finally:
        peak = torch.cuda.max_memory_allocated(local) / 2**30 if torch.cuda.is_available() else None
        print("FSDP_PEAK " + json.dumps({"rank": int(os.environ.get("RANK", "0")), "peak_gib": peak, "code": code}),
              flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
