"""klein 9B where its frozen weights do not fit one card: the base sharded over 2 GPUs (shard_base, FSDP).

Runs the real command line (`accelerate launch -m klein_lora_studio.train CONFIG`, through bench/capped_train.py)
on a random-weight 9B written as a safetensors file and loaded by ComfyUI's loader, with an encoded random
dataset (1024^2 latents, 512-token contexts). A smaller card is emulated by capping each process's CUDA
memory (KLEIN_BENCH_CAP_GIB). Configs (rank 32, attention of all blocks, gradient checkpointing, eager):

  1 GPU  capped  shard off          the whole bf16 model on one small card (expected: out of memory)
  2 GPUs capped  shard auto         the trainer decides to shard (weights > half the card) and trains
  2 GPUs capped  fp8 + low_vram, shard on   (fp8 shards all-gathered over NCCL)
  2 GPUs full    shard off / on     what sharding costs in step time when both fit (same LoRA math)

    python3 bench/bench_fsdp.py                  # JSON + markdown into $OUT (2-GPU machine, ~8 min)
    python3 bench/bench_fsdp.py --report DIR     # merge DIR/fsdp.json into bench/RESULTS.md
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.environ.get("OUT", "/tmp")
WORK = os.path.join(os.environ.get("TMPDIR", "/tmp"), "klein_bench_fsdp")
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}
SECTION_START, SECTION_END = "<!-- fsdp:start -->", "<!-- fsdp:end -->"


def prepare(model: str, res: int, n: int) -> tuple[str, str]:
    """(model file, encoded dataset file): random weights at the real size, random latents and contexts."""
    import safetensors.torch
    import torch

    sys.path.insert(0, HERE)
    import bench_step

    pcn = bench_step.setup_comfy()
    from pathlib import Path

    from klein_lora_studio.trainer.data import dataset_file
    from klein_lora_studio.trainer.data.dataset import KleinDataset

    os.makedirs(os.path.join(WORK, "models", "diffusion_models"), exist_ok=True)
    path = os.path.join(WORK, "models", "diffusion_models", f"{model}_random.safetensors")
    if not os.path.exists(path):
        hidden, depth, single, ctx = pcn.SIZES[model]
        sd = {k: v.to("cpu", torch.bfloat16).contiguous() for k, v in pcn.random_sd(hidden, depth, single, ctx).items()}
        safetensors.torch.save_file(sd, path)
        del sd
    ctx_dim = pcn.SIZES[model][3]
    g = torch.Generator().manual_seed(0)
    h = res // 16
    data = KleinDataset([torch.randn(128, h, h, generator=g) for _ in range(n)],
                        [torch.randn(512, ctx_dim, generator=g) for _ in range(n)], ["bench"] * n,
                        [f"bench{i}.png" for i in range(n)], res, "bench", "random")
    encoded = os.path.join(WORK, "output", f"dataset_{model}_{res}_{n}.safetensors")
    dataset_file.save_dataset(data, Path(encoded))
    return path, encoded


def config(name: str, model_file: str, encoded: str, gb: int, steps: int, shard: str, fp8: bool) -> str:
    raw = {"version": 1, "model": {"file": model_file, "weight_dtype": "fp8_e4m3fn" if fp8 else "default"},
           "dataset": {"encoded": encoded},
           "targets": {"layers": "attention"},
           "train": {"rank": 32, "alpha": 32, "learning_rate": 1e-4, "steps": steps, "batch_size": gb, "seed": 0,
                     "gradient_checkpointing": True, "compile_blocks": "off", "save_every": 0, "low_vram": fp8,
                     "shard_base": shard, "output_name": name}}
    path = os.path.join(WORK, f"{name}.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(raw, f)
    return path


def launch(name: str, cfg: str, procs: int, cap_gib: float, warm: int, timeout: float, cpu: bool = False) -> dict:
    sys.path.insert(0, HERE)
    from bench_multigpu import launch_cmd, output_lines
    from klein_lora_studio.trainer.jobs.events import parse_event

    cmd = launch_cmd(procs, [cfg, "--base-directory", WORK] + (["--cpu"] if cpu else []), cpu,
                      os.path.join(HERE, "capped_train.py"))
    env = {**os.environ, **CHILD_ENV, "KLEIN_BENCH_CAP_GIB": str(cap_gib),
           "CUDA_VISIBLE_DEVICES": "" if cpu else ",".join(str(i) for i in range(procs))}
    print(f"[bench_fsdp] {name}: {' '.join(cmd)}", flush=True)
    row = dict(name=name, processes=procs, cap_gib=cap_gib or None)
    stamps, peaks, tail, events = [], {}, [], []
    t0 = time.perf_counter()
    log = open(os.path.join(OUT, f"fsdp_{name}.log"), "w", encoding="utf-8")  # the launch's own output
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    try:
        for line in output_lines(proc, t0 + timeout):
            if line.startswith("FSDP_PEAK "):
                p = json.loads(line[len("FSDP_PEAK "):])
                peaks[p["rank"]] = p["peak_gib"]
            elif (event := parse_event(line)) is not None:
                events.append(event)
                if event["klein_lora"] == "step":
                    stamps.append(time.perf_counter())
            else:
                tail = (tail + [line.rstrip()])[-40:]
                log.write(line)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        row["error"] = f"timed out after {timeout:.0f} s"
    proc.wait()
    log.close()
    row["wall_s"] = time.perf_counter() - t0
    row["peak_gib_per_card"] = [peaks.get(r) for r in range(procs)]
    done = next((e for e in events if e["klein_lora"] == "done"), None)
    if done:
        times = [b - a for a, b in zip(stamps[warm - 1:-1], stamps[warm:], strict=True)]
        row.update(step_s=statistics.median(times), losses=done["losses"], sharded=done.get("sharded_base"),
                   base_gib_per_process=done.get("base_bytes_per_process", 0) / 2**30)
    elif "error" not in row:
        err = next((e["message"] for e in events if e["klein_lora"] == "error"), None)
        oom = next((t for t in tail if "OutOfMemoryError" in t or "out of memory" in t.lower()), None)
        row["error"] = (err or oom or " | ".join(tail[-3:]) or f"exit {proc.returncode}")[:300]
        row["log_tail"] = [t for t in tail if "Warning" not in t][-25:]
        print("\n".join(row["log_tail"]), flush=True)
    print(f"[bench_fsdp] {_short(row)}", flush=True)
    return row


def _short(r: dict) -> str:
    peaks = ", ".join(f"{p:.1f}" for p in r["peak_gib_per_card"] if p is not None)
    if "step_s" not in r:
        return f"{r['name']}: ERROR {r.get('error', '?')[:200]} (peak [{peaks}] GiB)"
    return (f"{r['name']}: {r['step_s']:.3f} s/step, sharded {r['sharded']}, base {r['base_gib_per_process']:.2f} GiB "
            f"per process, peak [{peaks}] GiB")


def markdown(result: dict) -> str:
    rows = result["rows"]
    lines = [SECTION_START, "## Frozen base sharded over GPUs (shard_base, FSDP; issue 9)", "",
             f"{result.get('date', '?')}, {', '.join(result.get('gpus', [])) or '?'}, torch {result.get('torch', '?')}. "
             "`bench/bench_fsdp.py`: the command line itself (`accelerate launch -m klein_lora_studio.train`) on a "
             f"random-weight {result['model']} safetensors file loaded by ComfyUI's loader, {result['res']}^2, global "
             f"batch {result['global_batch']}, rank 32, attention of all blocks, gradient checkpointing, eager; median "
             f"s/step after {result['warm']} warm-up steps of {result['steps']}. A smaller card is emulated by capping "
             "each process's CUDA memory (torch.cuda.set_per_process_memory_fraction): an out-of-memory error on a "
             "capped row is that cap, whatever total the message states.", "",
             "| config | GPUs | memory cap per card | sharded | base weights per card | s/step | peak GiB per card | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        peaks = " / ".join(f"{p:.1f}" for p in r["peak_gib_per_card"] if p is not None) or "-"
        cap = f"{r['cap_gib']:.0f} GiB" if r.get("cap_gib") else "none (full card)"
        if "step_s" in r:
            lines.append(f"| {r['name']} | {r['processes']} | {cap} | {r['sharded']} | {r['base_gib_per_process']:.2f} "
                         f"GiB | {r['step_s']:.3f} | {peaks} | |")
        else:
            lines.append(f"| {r['name']} | {r['processes']} | {cap} | - | - | - | {peaks} | {r['error'][:140]} |")
    on = next((r for r in rows if r["name"] == "full_shard_on" and "step_s" in r), None)
    off = next((r for r in rows if r["name"] == "full_shard_off" and "step_s" in r), None)
    if on and off:
        diff = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(on["losses"], off["losses"], strict=True))
        lines += ["", f"Sharding costs {100 * (on['step_s'] / off['step_s'] - 1):+.0f}% step time on the full cards "
                  f"({on['step_s']:.3f} vs {off['step_s']:.3f} s: every block is all-gathered for forward and again for "
                  f"backward) and gives the same training: max relative loss difference {diff:.1e}."]
    lines.append(SECTION_END)
    return "\n".join(lines)


def write_report(result: dict, results_md: str) -> None:
    sys.path.insert(0, HERE)
    from bench_multigpu import merge_section

    merge_section(results_md, markdown(result), SECTION_START, SECTION_END)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="klein9b")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--global-batch", type=int, default=2)
    ap.add_argument("--cap-gib", type=float, default=16.0)
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--only", default="", help="comma-separated config names")
    ap.add_argument("--timeout", type=float, default=200)
    ap.add_argument("--report", default=None)
    ap.add_argument("--cpu", action="store_true", help="smoke run on CPU processes (--model tiny --res 64); no fp8")
    a = ap.parse_args()
    if a.report:
        with open(os.path.join(a.report, "fsdp.json"), encoding="utf-8") as f:
            write_report(json.load(f), os.path.join(HERE, "RESULTS.md"))
        return 0
    import datetime

    import torch

    t0 = time.perf_counter()
    model_file, encoded = prepare(a.model, a.res, a.global_batch)
    print(f"[bench_fsdp] wrote {model_file} and the dataset in {time.perf_counter() - t0:.0f} s", flush=True)
    plan = [("capped_1gpu_shard_off", 1, a.cap_gib, "off", False),
            ("capped_2gpu_shard_auto", 2, a.cap_gib, "auto", False),
            ("capped_2gpu_fp8_lowvram_shard_on", 2, a.cap_gib, "on", True),
            ("full_shard_off", 2, 0.0, "off", False),
            ("full_shard_on", 2, 0.0, "on", False)]
    only = set(filter(None, a.only.split(",")))
    result = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  torch=torch.__version__, gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  model=a.model, res=a.res, global_batch=a.global_batch, warm=a.warm, steps=a.warm + a.steps, rows=[])
    for name, procs, cap, shard, fp8 in plan:
        if (only and name not in only) or (a.cpu and fp8):
            continue
        cfg = config(name, model_file, encoded, a.global_batch, a.warm + a.steps, shard, fp8)
        result["rows"].append(launch(name, cfg, procs, cap, a.warm, a.timeout, a.cpu))
        with open(os.path.join(OUT, "fsdp.json"), "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    with open(os.path.join(OUT, "fsdp.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result) + "\n")
    print(f"[bench_fsdp] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
