"""Where a klein 4B 1024² LoRA step spends its GPU time (the node's path: trainer.training.loop.train_lora).

usage (GPU machine, set-up as in bench/README.md): python3 bench/profile_step.py [--gc] [--compile off|auto]
Writes $OUT/profile_<tag>.txt: torch.profiler's kernel table for two steps after warm-up, grouped into
matmul / attention / elementwise+norm / optimizer so the limit can be read at a glance.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step  # noqa: E402


def classify(name: str) -> str:
    n = name.lower()
    if any(k in n for k in ("flash", "attention", "fmha", "sdpa", "cudnn")):  # before matmul: flash names cutlass
        return "attention"
    if any(k in n for k in ("gemm", "matmul", "mm_", "cutlass", "sm90_xmma", "nvjet", "addmm", "::mm")):
        return "matmul"
    if "adam" in n or "multi_tensor" in n or "foreach" in n:
        return "optimizer"
    return "elementwise/norm/other"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gc", action="store_true")
    ap.add_argument("--compile", default="auto")
    ap.add_argument("--res", type=int, default=1024)
    a = ap.parse_args()
    pcn = bench_step.setup_comfy()
    import torch
    from klein_lora_studio.trainer.training import loop

    patcher = bench_step.random_patcher(pcn, "klein4b")
    data, targets = bench_step.random_run(pcn, "klein4b", patcher, a.res, n=1)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA],
                                  schedule=torch.profiler.schedule(wait=5, warmup=1, active=2, repeat=1))
    cfg = loop.TrainConfig(rank=32, alpha=32, learning_rate=1e-4, steps=9, gradient_checkpointing=a.gc,
                           compile_blocks=a.compile, output_name="profile")
    with prof, tempfile.TemporaryDirectory() as out, torch.inference_mode():
        loop.train_lora(patcher, data, targets, cfg, Path(out), loop.TrainHooks(on_step=lambda *_: prof.step()))
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.self_device_time_total for e in events) / 2  # two active steps
    groups: dict[str, float] = {}
    for e in events:
        groups[classify(e.key)] = groups.get(classify(e.key), 0) + e.self_device_time_total / 2
    tag = f"4b_{a.res}_{'ckpt' if a.gc else 'nockpt'}_{a.compile}"
    lines = [f"# klein 4B {a.res}² gc={a.gc} compile={a.compile}: {total / 1e3:.1f} ms of GPU kernels per step", ""]
    lines += [f"- {k}: {v / 1e3:.1f} ms ({v / total:.0%})" for k, v in sorted(groups.items(), key=lambda kv: -kv[1])]
    lines += ["", prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)]
    text = "\n".join(lines)
    Path(os.environ.get("OUT", "/tmp"), f"profile_{tag}.txt").write_text(text)
    print("\n".join(lines[:8]))


if __name__ == "__main__":
    main()
