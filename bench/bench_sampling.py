"""Checkpoint sampling speed (issue 5 item 4): one 50-step 1024² klein 4B sample with CFG 4, cond and
uncond in one batch (ComfyUI's sampler batches them), eager vs the compiled blocks the live sampler uses.

The same function the trainer's LiveSampler calls (trainer.evaluation.sampling.sample_latents, comfy.sample
underneath) on a ComfyUI model of random weights; 512-token contexts as klein's text encoder pads to.
A forward at 1024² with 512 text tokens is 34.6 TFLOP (KLEIN.md: linear 27.8 + attention 6.8), so
50 steps x 2 (CFG) is 3.46 PFLOP: 4.3 s at the H100's ~800 TFLOP/s dense bf16.

usage: bench_sampling.py [--steps 50] [--variants eager,compiled,fp8fast]   (writes $OUT/bench_sampling.json)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step as bs  # noqa: E402

FWD_TFLOP_4B_1024 = 34.6


def time_sample(model, positive, negative, settings, repeats: int) -> list[float]:
    import torch
    from klein_lora_studio.trainer.evaluation import sampling as sp

    out = []
    for _ in range(repeats):
        bs.cuda_sync()
        t = time.perf_counter()
        with torch.inference_mode():
            sp.sample_latents(model, [positive], negative, settings)
        bs.cuda_sync()
        out.append(time.perf_counter() - t)
    return out


def run(pcn, sd, name: str, variant: str, steps: int, res: int) -> dict:
    import torch
    from klein_lora_studio.trainer.evaluation import sampling as sp

    fast = variant == "fp8fast"  # ComfyUI's own fp8 matmul path (UNETLoader weight_dtype fp8_e4m3fn_fast)
    model = bs.load_patcher(sd, torch.float8_e4m3fn if fast else torch.bfloat16, fast)
    ctx = pcn.SIZES[name][3]
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 512, ctx, generator=g), {}]]
    negative = [[torch.randn(1, 512, ctx, generator=g), {}]]
    settings = sp.SampleSettings(steps=steps, cfg=4.0, seed=0, width=res, height=res)
    if variant != "eager":
        model = sp.CompiledBlocks().apply(model)
    bs.reset_peak()
    first = time_sample(model, positive, negative, settings, 1)[0]  # compilation / first-use kernels
    times = time_sample(model, positive, negative, settings, 3)
    best = min(times)
    row = dict(variant=variant, steps=steps, first_s=first, sample_s=best, samples_s=times, peak_gib=bs.peak_gib(),
               mfu=FWD_TFLOP_4B_1024 * 2 * steps / best / bs.PEAK_TFLOPS)
    del model
    bs.free_comfy()
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--variants", default="eager,compiled,fp8fast")
    ap.add_argument("--model", default="klein4b", help="klein4b, or tiny for a CPU smoke run")
    ap.add_argument("--res", type=int, default=1024)
    a = ap.parse_args()
    pcn = bs.setup_comfy()
    hidden, depth, single, ctx = pcn.SIZES[a.model]
    sd = {k: v.cpu() for k, v in pcn.random_sd(hidden, depth, single, ctx).items()}
    rows = [bs.guarded(run, dict(model=a.model, res=a.res, gc=False, variant=v), pcn, sd, a.model, v, a.steps, a.res)
            for v in a.variants.split(",")]
    with open(os.path.join(bs.OUT, "bench_sampling.json"), "w") as f:
        json.dump(dict(env=bs.env_info(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
