"""Low-VRAM mode (issue 5 item 3): klein 4B/9B at 1024² with fp8-stored base weights + low_vram
(gradient checkpointing, torchao 8-bit AdamW) against the bf16 run with checkpointing, same seed.

Issue 19: the same low-VRAM run with the frozen blocks streamed from CPU memory (`offload_blocks`), in a process
capped to a small card's size (torch.cuda.set_per_process_memory_fraction, as bench_fsdp's capped_train.py; the
trainer's 'auto' reads the cap), against the fully resident run (uncapped) and the resident run under the same cap
(expected: out of memory). Each row also samples the allocated memory after every `--sample-every` steps; with
`--steps 2000` that is the memory-flatness soak (`creep_gib`: the last sample minus the first after warm-up).

Both through trainer.training.loop.train_lora (the node's path) on ComfyUI models of random weights; the fp8
model is loaded the way UNETLoader's weight_dtype fp8_e4m3fn loads it (model_options dtype). Reports
s/step (median after warm-up), peak allocated and reserved GPU memory, and the largest relative
difference between the two loss curves (same seed: same data, noise and sigmas).

usage: bench_lowvram.py [--models klein4b,klein9b] [--modes bf16+ckpt,fp8+low_vram] [--steps 10] [--warm 4]
                        [--cap klein9b:8,klein4b:4] [--sample-every 50] [--tag NAME]
       (each config in its own process; writes $OUT/bench_lowvram[_NAME].json; the cap applies to the modes
       marked `capped`)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step as bs  # noqa: E402

MODES = {"bf16+ckpt": dict(dtype="bfloat16", low_vram=False), "fp8+low_vram": dict(dtype="float8_e4m3fn", low_vram=True),
         "fp8+low_vram:eager": dict(dtype="float8_e4m3fn", low_vram=True, compile_blocks="off"),
         # ComfyUI's fp8 matmuls (UNETLoader weight_dtype fp8_e4m3fn_fast): speed rather than memory
         "bf16": dict(dtype="bfloat16", low_vram=False, gc=False),
         "fp8fast": dict(dtype="float8_e4m3fn", fast=True, low_vram=False, gc=False),
         "fp8fast+low_vram": dict(dtype="float8_e4m3fn", fast=True, low_vram=True),
         # issue 19: under the card-size cap, resident (expected out of memory) and streamed ('auto', and eager)
         "fp8+low_vram:capped": dict(dtype="float8_e4m3fn", low_vram=True, capped=True),
         "fp8+low_vram+offload": dict(dtype="float8_e4m3fn", low_vram=True, capped=True, offload="auto"),
         "fp8+low_vram+offload:eager": dict(dtype="float8_e4m3fn", low_vram=True, capped=True, offload="auto",
                                            compile_blocks="off")}
STREAMED_VS = {"fp8+low_vram+offload": "fp8+low_vram", "fp8+low_vram+offload:eager": "fp8+low_vram:eager"}


def _watch_streamer(found: list) -> None:
    """Keep the run's BlockStreamer (its blocks streamed, copies made) for the row."""
    from klein_lora_studio.trainer.model import block_stream

    place = block_stream.BlockStreamer.place

    def spy(self, dm):
        found.append(self)
        return place(self, dm)
    block_stream.BlockStreamer.place = spy


def _cap(gib: float) -> None:
    import torch

    if gib and torch.cuda.is_available():
        torch.cuda.set_per_process_memory_fraction(min(1.0, gib * 2**30 / torch.cuda.get_device_properties(0).total_memory))


def run(pcn, sd, name: str, mode: str, warm: int, steps: int, res: int, sample_every: int = 50) -> dict:
    import torch
    from klein_lora_studio.trainer.training import loop

    spec = MODES[mode]
    patcher = bs.load_patcher(sd, getattr(torch, spec["dtype"]), spec.get("fast", False))
    data, targets = bs.random_run(pcn, name, patcher, res)
    cfg = loop.TrainConfig(rank=32, alpha=32.0, learning_rate=1e-4, steps=warm + steps, seed=0,
                           gradient_checkpointing=spec.get("gc", True), low_vram=spec["low_vram"], output_name="bench",
                           compile_blocks=spec.get("compile_blocks", "auto"), offload_blocks=spec.get("offload", "off"))
    stamps: list[float] = []
    mem: dict[str, float] = {}
    trace: list[list[float]] = []  # [step, allocated GiB, reserved GiB] every sample_every steps
    streamers: list = []
    _watch_streamer(streamers)

    def on_step(step, total, loss):
        stamps.append(time.perf_counter())
        if torch.cuda.is_available() and (step % sample_every == 0 or step == warm):
            trace.append([step, torch.cuda.memory_allocated() / 2**30, torch.cuda.memory_reserved() / 2**30])
        if torch.cuda.is_available() and step in (1, warm):
            # resident after the step (weights, LoRA, optimizer) and the peak so far; from `warm` on, the
            # steady-state peak alone (loading and first-step compilation excluded)
            mem[f"allocated_after_step{step}_gib"] = torch.cuda.memory_allocated() / 2**30
            mem[f"peak_to_step{step}_gib"] = torch.cuda.max_memory_allocated() / 2**30
            if step == warm:
                torch.cuda.reset_peak_memory_stats()
    hooks = loop.TrainHooks(on_step=on_step)
    bs.reset_peak()
    mem["weights_gib"] = sum(t.numel() * t.element_size() for t in patcher.model.diffusion_model.state_dict().values()) / 2**30
    with tempfile.TemporaryDirectory() as out, torch.inference_mode():
        try:
            result = loop.train_lora(patcher, data, targets, cfg, Path(out), hooks)
        except torch.cuda.OutOfMemoryError as e:  # where it ran out, and the memory trace up to there (the soak)
            return dict(error="OOM", oom_at_step=len(stamps), oom_message=_torch_part(str(e)), mem_trace=trace,
                        oom_stats=_allocator_stats(), streamed_blocks=_streamed(streamers), **mem)
    times = [b - a for a, b in zip(stamps[warm - 1:-1], stamps[warm:], strict=True)]
    steady = bs.peak_gib()
    row = dict(model=name, res=res, mode=mode, step_s=statistics.median(times),
               peak_gib=max(steady or 0.0, mem.get(f"peak_to_step{warm}_gib", 0.0)),
               reserved_gib=torch.cuda.max_memory_reserved() / 2**30 if torch.cuda.is_available() else None,
               losses=result.losses, optimizer=cfg.optimizer_used, weight_dtype=spec["dtype"],
               steady_peak_gib=steady, mem_trace=trace, **mem)
    if streamers:
        row.update(streamed_blocks=len(streamers[-1].streamed), blocks=len(streamers[-1].blocks),
                   block_copies=streamers[-1].fetches, most_blocks_in_flight=streamers[-1].max_live)
    after = [t for t in trace if t[0] >= warm]
    if len(after) >= 2:
        row["creep_gib"] = after[-1][1] - after[0][1]
    del patcher
    bs.free_comfy()
    return row


def _torch_part(message: str) -> str:
    """The allocator's own words (what it tried to allocate, what was free, reserved but unallocated), which the
    trainer's advice before them would push out of a cut message."""
    at = message.find("(torch:")
    return (message[at:] if at >= 0 else message)[:700]


def _allocator_stats() -> dict:
    """The caching allocator's state when it gave up (GiB; fragmentation = reserved - allocated)."""
    import torch

    stats = torch.cuda.memory_stats() if torch.cuda.is_available() else {}
    gib = {k: stats.get(k, 0) / 2**30 for k in ("allocated_bytes.all.current", "reserved_bytes.all.current",
                                                "allocated_bytes.all.peak", "inactive_split_bytes.all.current")}
    return dict(gib, num_alloc_retries=stats.get("num_alloc_retries"), num_ooms=stats.get("num_ooms"))


def _streamed(streamers: list) -> list | None:
    return [len(streamers[-1].streamed), len(streamers[-1].blocks)] if streamers else None


def one(model: str, mode: str, warm: int, steps: int, res: int, cap_gib: float = 0.0, sample_every: int = 50) -> None:
    """One config in this process: a model loaded before it would still count towards the peak here."""
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")  # the trainer's plan
    pcn = bs.setup_comfy()
    hidden, depth, single, ctx = pcn.SIZES[model]
    sd = {k: v.cpu() for k, v in pcn.random_sd(hidden, depth, single, ctx).items()}  # made on the card, in bf16
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    if MODES[mode].get("capped"):  # after the random weights: a user's file is read into CPU memory, not the card
        _cap(cap_gib)
    gc = MODES[mode].get("gc", True) or MODES[mode]["low_vram"]
    key = dict(model=model, res=res, gc=gc, mode=mode, cap_gib=cap_gib if MODES[mode].get("capped") else None)
    row = bs.guarded(run, key, pcn, sd, model, mode, warm, steps, res, sample_every)
    print("ROW " + json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="klein4b,klein9b")
    ap.add_argument("--modes", default="bf16+ckpt,fp8+low_vram")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warm", type=int, default=4)
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--cap", default="klein9b:8,klein4b:4", help="card size per model (GiB) for the capped modes")
    ap.add_argument("--sample-every", type=int, default=50)
    ap.add_argument("--tag", default="")
    ap.add_argument("--one", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--cap-gib", type=float, default=0.0, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        return one(*a.one, a.warm, a.steps, a.res, a.cap_gib, a.sample_every)
    caps = {k: float(v) for k, v in (item.split(":") for item in a.cap.split(",") if item)}
    rows = []
    for name in a.models.split(","):
        for mode in a.modes.split(","):
            cmd = [sys.executable, __file__, "--one", name, mode, "--steps", str(a.steps), "--warm", str(a.warm),
                   "--res", str(a.res), "--cap-gib", str(caps.get(name, 0.0)), "--sample-every", str(a.sample_every)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            found = [ln[4:] for ln in proc.stdout.splitlines() if ln.startswith("ROW ")]
            row = json.loads(found[-1]) if found else dict(model=name, mode=mode, error=proc.stderr[-600:])
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("losses", "mem_trace")}), flush=True)
        base = next((r for r in rows if r.get("model") == name and r.get("mode") == "bf16+ckpt"), None)
        low = next((r for r in rows if r.get("model") == name and r.get("mode") == "fp8+low_vram"), None)
        if base and low and "losses" in base and "losses" in low:
            low["max_rel_loss_diff"] = max(abs(x - y) / abs(y) for x, y in zip(low["losses"], base["losses"],
                                                                                 strict=True))
            low["step_ratio"] = low["step_s"] / base["step_s"]
            print(json.dumps({k: low[k] for k in ("model", "max_rel_loss_diff", "step_ratio", "peak_gib")}), flush=True)
        _compare_streamed(rows, name)
    out = dict(env=bs.env_info(), rows=rows)
    with open(os.path.join(bs.OUT, f"bench_lowvram{'_' + a.tag if a.tag else ''}.json"), "w") as f:
        json.dump(out, f, indent=1)


def _compare_streamed(rows: list[dict], name: str) -> None:
    """Each streamed row against the resident run of the same settings: step-time ratio (issue 19: at most 1.5x)
    and the loss curves on the same seed."""
    for streamed_mode, resident_mode in STREAMED_VS.items():
        low = next((r for r in rows if r.get("model") == name and r.get("mode") == streamed_mode), None)
        base = next((r for r in rows if r.get("model") == name and r.get("mode") == resident_mode), None)
        if low and base and "losses" in low and "losses" in base:
            low["vs_resident"] = resident_mode
            low["step_ratio_vs_resident"] = low["step_s"] / base["step_s"]
            low["max_rel_loss_diff_vs_resident"] = max(abs(x - y) / abs(y) for x, y in
                                                        zip(low["losses"], base["losses"], strict=True))
            print(json.dumps({k: low.get(k) for k in ("model", "mode", "cap_gib", "streamed_blocks", "blocks",
                                                      "step_ratio_vs_resident", "max_rel_loss_diff_vs_resident",
                                                      "peak_gib", "reserved_gib", "creep_gib")}), flush=True)


if __name__ == "__main__":
    main()
