"""GPU soak: 2,000 klein 4B steps (real size, random weights) through train_lora; GPU memory must stay flat.

usage (GPU machine, set-up as in bench/README.md): python3 bench/soak_gpu.py [--steps 2000] [--res 512]
Writes $OUT/soak_gpu.json: torch.cuda.memory_allocated every 100 steps, the peak, and the growth from
step 100 (after compilation and the first optimizer step) to the end. Checkpoints + training states
are written every 500 steps, as a real run would.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--res", type=int, default=512)
    a = ap.parse_args()
    pcn = bench_step.setup_comfy()
    import torch
    from klein_lora_studio.trainer.training import loop

    patcher = bench_step.random_patcher(pcn, "klein4b")
    data, targets = bench_step.random_run(pcn, "klein4b", patcher, a.res, n=4)
    samples = []
    t0 = time.perf_counter()

    def on_step(step, total, loss):
        if step % 100 == 0 or step == 1:
            samples.append(dict(step=step, allocated_gib=torch.cuda.memory_allocated() / 2**30,
                                reserved_gib=torch.cuda.memory_reserved() / 2**30, s=time.perf_counter() - t0))

    cfg = loop.TrainConfig(rank=32, alpha=32, learning_rate=1e-4, steps=a.steps, save_every=500, output_name="soak")
    torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out, torch.inference_mode():
        loop.train_lora(patcher, data, targets, cfg, Path(out), loop.TrainHooks(on_step=on_step))
    ref = next(s for s in samples if s["step"] == 100)
    end = samples[-1]
    result = dict(gpu=torch.cuda.get_device_name(), steps=a.steps, res=a.res, samples=samples,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30,
                  growth_gib=end["allocated_gib"] - ref["allocated_gib"],
                  growth_pct=100 * (end["allocated_gib"] - ref["allocated_gib"]) / ref["allocated_gib"])
    Path(os.environ.get("OUT", "/tmp"), "soak_gpu.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}))
    for s in samples[:: max(1, len(samples) // 10)]:
        print(s)


if __name__ == "__main__":
    main()
