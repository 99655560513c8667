"""Checkpoint sampling speed (issues 5 and 17): one 50-step 1024² klein 4B sample with CFG 4, cond and uncond
in one batch (ComfyUI's sampler batches them), each variant in a process of its own.

The same function the trainer's LiveSampler calls (trainer.evaluation.sampling.sample_latents, comfy.sample
underneath) on a ComfyUI model of random weights; 512-token contexts as klein's text encoder pads to.
A forward at 1024² with 512 text tokens is 34.6 TFLOP (KLEIN.md: linear 27.8 + attention 6.8), so
50 steps x 2 (CFG) is 3.46 PFLOP: 4.3 s at ~800 TFLOP/s dense bf16.

  eager     ComfyUI as is                 compiled  the live sampler's compiled blocks, ComfyUI's attention order
  pinned    compiled, attention pinned to the card's fastest backend (trainer/model/attention.py: cuDNN on sm90+)
  fp8       pinned + fp8 products of the base (trainer/model/fp8_compute.py, weights quantised once)
  fp8fast   compiled + ComfyUI's own fp8 matmuls (UNETLoader weight_dtype fp8_e4m3fn_fast)

usage: bench_sampling.py [--steps 50] [--variants eager,compiled,pinned,fp8,fp8fast] [--repeats 3]
       (writes $OUT/bench_sampling.json; --model tiny --res 256 --cpu for a CPU smoke run)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step as bs  # noqa: E402

FWD_TFLOP_4B_1024 = 34.6
VARIANTS = ("eager", "compiled", "pinned", "fp8", "fp8fast")


def time_sample(model, positive, negative, settings, repeats: int, attention) -> list[float]:
    import torch
    from klein_lora_studio.trainer.evaluation import sampling as sp

    out = []
    for _ in range(repeats):
        bs.cuda_sync()
        t = time.perf_counter()
        with torch.inference_mode(), attention():
            sp.sample_latents(model, [positive], negative, settings)
        bs.cuda_sync()
        out.append(time.perf_counter() - t)
    return out


def prepared(sd, variant: str):
    """(patcher to sample, attention context factory, undo handle or None) for `variant`."""
    import comfy.model_management as mm
    import torch
    from klein_lora_studio.trainer.evaluation import sampling as sp
    from klein_lora_studio.trainer.model import attention, fp8_compute

    fast = variant == "fp8fast"  # ComfyUI's own fp8 matmul path (UNETLoader weight_dtype fp8_e4m3fn_fast)
    model = bs.load_patcher(sd, torch.float8_e4m3fn if fast else torch.bfloat16, fast)
    handle, context = None, nullcontext
    if variant in ("pinned", "fp8"):
        model = model.clone(disable_dynamic=True)  # plain weights on the card, as the trainer's model has them
        mm.load_models_gpu([model], force_full_load=True)
        dm, device = model.model.diffusion_model, model.load_device
        if variant == "fp8":
            handle = fp8_compute.apply_base_compute(dm, "fp8", device)
        context = lambda: attention.run_attention(dm, device, torch.bfloat16)  # noqa: E731
    if variant != "eager":
        model = sp.CompiledBlocks().apply(model)
    return model, context, handle


def run(pcn, name: str, variant: str, steps: int, res: int, repeats: int) -> dict:
    import torch
    from klein_lora_studio.trainer.evaluation import sampling as sp

    hidden, depth, single, ctx = pcn.SIZES[name]
    sd = {k: v.cpu() for k, v in pcn.random_sd(hidden, depth, single, ctx).items()}
    model, context, handle = prepared(sd, variant)
    g = torch.Generator().manual_seed(0)
    positive = [[torch.randn(1, 512, ctx, generator=g), {}]]
    negative = [[torch.randn(1, 512, ctx, generator=g), {}]]
    settings = sp.SampleSettings(steps=steps, cfg=4.0, seed=0, width=res, height=res)
    bs.reset_peak()
    first = time_sample(model, positive, negative, settings, 1, context)[0]  # compilation / first-use kernels
    times = time_sample(model, positive, negative, settings, repeats, context)
    best = min(times)
    row = dict(impl=f"sample:{variant}", variant=variant, steps=steps, first_s=first, sample_s=best, samples_s=times,
               peak_gib=bs.peak_gib(),
               mfu=FWD_TFLOP_4B_1024 * 2 * steps / best / bs.PEAK_TFLOPS if (name, res) == ("klein4b", 1024) else None)
    row["fp8_layers"] = len(handle.swapped) if handle is not None else 0  # 0 for fp8 means nothing was swapped
    if handle is not None:
        handle.undo()
    del model
    bs.free_comfy()
    return row


def run_row(spec: dict) -> dict:
    pcn = bs.setup_comfy()
    key = dict(impl=f"sample:{spec['variant']}", model=spec["model"], res=spec["res"], gc=False)
    return bs.guarded(run, key, pcn, spec["model"], spec["variant"], spec["steps"], spec["res"], spec.get("repeats", 3))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--model", default="klein4b", help="klein4b, or tiny for a CPU smoke run")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", action="store_true")
    ap.add_argument("--row", help="(internal) one variant as JSON, run in this process")
    ap.add_argument("--row-out", help="(internal) where --row writes its JSON")
    a = ap.parse_args()
    if a.row:
        return bs.write_row(a.row_out, run_row(json.loads(a.row)))
    specs = [dict(kind="sample", impl=f"sample:{v}", variant=v, model=a.model, res=a.res, gc=False, steps=a.steps,
                  repeats=a.repeats) for v in a.variants.split(",")]
    rows = bs.run_plan(specs, os.path.abspath(__file__), a.cpu, 3600, 600, os.path.join(bs.OUT, "rows_sampling"))
    bs.write_rows(os.path.join(bs.OUT, "bench_sampling.json"), rows)


if __name__ == "__main__":
    main()
