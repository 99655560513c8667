"""Data-parallel LoRA training of klein 4B/9B at 1024^2: 1 GPU against 2 GPUs, global batch 2 and 8.

Runs on the 2-GPU machine (see bench/README.md for the set-up; same PYTHONPATH as bench_step.py):

    python3 bench/bench_multigpu.py                 # all configs, < 6 min; JSON + markdown into $OUT
    python3 bench/bench_multigpu.py --report DIR    # merge DIR/multigpu.json into bench/RESULTS.md

Each (model, process count) is one launch (accelerate launch, or torchrun when accelerate is missing) of
this file with --worker: random weights at the real size (bench_step.random_patcher), random 1024^2
latents and 512-token contexts, trainer.training.loop.train_lora itself with the ranks of the launch (rank r of N
trains its slice of every global batch, LoRA gradients averaged in one all-reduce), rank 32, attention
targets of all blocks, bf16, gradient checkpointing on (global batch 8 on one card needs it at 9B),
compile_blocks off (compilation would take most of the time budget; the ratio is what is measured).
Per config: median s/step after warm-up, images/s, speed-up over 1 GPU, peak memory of each card.
A config that runs out of memory, fails or hangs (a rank that OOMs leaves the other in the all-reduce:
the launch's timeout ends it) is recorded as such; the others still run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Iterator

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
OUT = os.environ.get("OUT", "/tmp")
MODELS = ("klein4b", "klein9b")
BATCHES = (2, 8)
RES = 1024
BUDGET_S = 330  # the whole script: the lead's device command is capped; stop launching configs after this
LAUNCH_TIMEOUT_S = 170
MARK = "MULTIGPU_ROW "
RUNS_DIR = os.path.join(os.environ.get("TMPDIR", "/tmp"), "klein_bench_multigpu_runs")
CHILD_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "PYTHONUNBUFFERED": "1"}


# ---------------------------------------------------------------- worker (one per rank)

def _ranks(cpu: bool):
    """Ranks of this launch through accelerate (as the CLI does); plain torch.distributed when it is missing."""
    from klein_lora_studio.trainer.training import distributed

    try:
        return distributed.from_accelerate(cpu=cpu)
    except ImportError:
        import torch
        import torch.distributed as dist

        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world > 1:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            dist.init_process_group("nccl")
            return distributed.Ranks(dist.get_rank(), world)
        return distributed.Ranks()


def worker(model: str, batches: list[int], warm: int, steps: int, res: int, cpu: bool) -> None:
    ranks = _ranks(cpu)  # sets the CUDA device before ComfyUI reads it
    import torch
    import torch.distributed as dist

    sys.path.insert(0, HERE)
    import bench_step

    pcn = bench_step.setup_comfy()
    from pathlib import Path

    from klein_lora_studio.trainer.training import loop

    t0 = time.perf_counter()
    patcher = bench_step.random_patcher(pcn, model)
    load_s = time.perf_counter() - t0
    cuda = torch.cuda.is_available() and not cpu
    for gb in batches:
        row = dict(model=model, res=res, global_batch=gb, processes=ranks.world, gc=True, compile="off",
                   warm=warm, steps=steps, load_s=load_s)
        try:
            data, targets = bench_step.random_run(pcn, model, patcher, res, n=gb)
            cfg = loop.TrainConfig(rank=32, alpha=32.0, learning_rate=1e-4, steps=warm + steps, batch_size=gb,
                                   gradient_checkpointing=True, compile_blocks="off", save_dtype="bf16",
                                   output_name=f"mg_{model}_{gb}_{ranks.world}")
            stamps = []
            hooks = loop.TrainHooks(on_step=lambda step, total, loss, s=stamps: s.append(time.perf_counter()))
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            out = Path(RUNS_DIR)  # rank 0 writes the LoRA here (not under $OUT); the driver removes it
            with torch.inference_mode():
                result = loop.train_lora(patcher, data, targets, cfg, out, hooks, ranks)
            times = [b - a for a, b in zip(stamps[warm - 1:-1], stamps[warm:], strict=True)]
            row.update(step_s=statistics.median(times), step_min_s=min(times), images_per_s=gb / statistics.median(times),
                       final_loss=result.losses[-1], losses=result.losses,
                       allreduce_mb=4 * sum(t.numel() for k, t in result.lora.items() if not k.endswith(".alpha")) / 2**20)
        except torch.cuda.OutOfMemoryError as e:
            row["error"] = "OOM: " + str(e).splitlines()[0][:200]
        except Exception as e:  # noqa: BLE001 - one broken config must not hide the rest
            traceback.print_exc()
            row["error"] = repr(e)[:400]
        peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        peaks = [peak]
        if ranks.distributed:
            peaks = [None] * ranks.world
            dist.all_gather_object(peaks, peak)
        row["peak_gib_per_card"] = peaks
        if ranks.is_main:
            print(MARK + json.dumps(row), flush=True)
        bench_step.free_comfy_safe()
        if "error" in row and ranks.distributed:
            break  # the ranks may be out of step after a failure: end this launch
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- driver

def launch_cmd(procs: int, args: list[str], cpu: bool, script: str | None = None) -> list[str]:
    """`script args` as `procs` processes: plain python for one, torchrun on CPU, accelerate launch on GPUs."""
    script = script or os.path.abspath(__file__)
    if procs == 1:
        return [sys.executable, script, *args]
    if cpu:  # accelerate's launcher starts one CPU process only (without an MPI host file)
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), script, *args]
    try:
        import accelerate  # noqa: F401

        return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *args]
    except ImportError:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), script, *args]


def launch(model: str, procs: int, batches: list[int], warm: int, steps: int, timeout: float, res: int = RES,
           cpu: bool = False) -> list[dict]:
    visible = [d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    cards = visible or [str(i) for i in range(procs)]  # the first `procs` of the cards this bench was given
    env = {**os.environ, **CHILD_ENV, "CUDA_VISIBLE_DEVICES": "" if cpu else ",".join(cards[:procs])}
    cmd = launch_cmd(procs, ["--worker", "--models", model, "--batches", ",".join(map(str, batches)),
                              "--warm", str(warm), "--steps", str(steps), "--res", str(res)] + (["--cpu"] if cpu else []),
                      cpu)
    print(f"[bench_multigpu] {model} on {procs} GPU(s): {' '.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    rows, tail = [], []
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            start_new_session=True)
    deadline = t0 + timeout
    try:
        for line in output_lines(proc, deadline):
            if line.startswith(MARK):
                rows.append(json.loads(line[len(MARK):]))
                print(f"[bench_multigpu] {_short(rows[-1])}", flush=True)
            else:
                tail = (tail + [line.rstrip()])[-30:]
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        print("\n".join(tail[-10:]), flush=True)
    done = {r["global_batch"] for r in rows}
    for gb in batches:
        if gb not in done:
            why = (f"timed out after {timeout:.0f} s (a hang in the all-reduce after one rank failed, or too slow)"
                   if time.perf_counter() > deadline else f"launch exited {proc.returncode}: " + " | ".join(tail[-3:]))
            rows.append(dict(model=model, res=res, global_batch=gb, processes=procs, error=why[:400]))
            print(f"[bench_multigpu] {_short(rows[-1])}", flush=True)
    for r in rows:
        r["launch_s"] = time.perf_counter() - t0
    return rows


def output_lines(proc: subprocess.Popen, deadline: float) -> Iterator[str]:
    """The child's stdout lines as they come, until it exits; TimeoutError once time.perf_counter() passes
    `deadline` (a hung launch must not hold the machine)."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    while True:
        if time.perf_counter() > deadline:
            raise TimeoutError
        if not sel.select(timeout=1.0):
            if proc.poll() is not None:
                return
            continue
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                return
            continue
        yield line


def _short(r: dict) -> str:
    if "error" in r:
        return f"{r['model']} gb{r['global_batch']} x{r['processes']}: ERROR {r['error'][:160]}"
    peaks = ", ".join(f"{p:.1f}" for p in r["peak_gib_per_card"] if p is not None)
    return (f"{r['model']} gb{r['global_batch']} x{r['processes']}: {r['step_s']:.3f} s/step, "
            f"{r['images_per_s']:.2f} img/s, peak [{peaks}] GiB")


def env_info() -> dict:
    import torch

    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), torch=torch.__version__,
                gpus=[torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
    try:
        import accelerate

        info["accelerate"] = accelerate.__version__
    except ImportError:
        info["accelerate"] = "missing (torchrun used)"
    return info


def speedups(rows: list[dict]) -> list[dict]:
    """Throughput of N GPUs over 1 GPU, per (model, global batch)."""
    out = []
    for r in rows:
        if r.get("processes", 1) == 1 or "step_s" not in r:
            continue
        base = next((b for b in rows if b.get("processes") == 1 and "step_s" in b
                     and (b["model"], b["global_batch"]) == (r["model"], r["global_batch"])), None)
        if base:
            out.append(dict(model=r["model"], global_batch=r["global_batch"], processes=r["processes"],
                            speedup=base["step_s"] / r["step_s"], efficiency=base["step_s"] / r["step_s"] / r["processes"],
                            loss_diff=max(abs(a - b) / max(abs(b), 1e-6)
                                          for a, b in zip(r["losses"], base["losses"], strict=True))))
    return out


SECTION_START, SECTION_END = "<!-- multigpu:start -->", "<!-- multigpu:end -->"


def markdown(result: dict) -> str:
    rows, ups, info = result["rows"], result["speedups"], result["env"]
    lines = [SECTION_START, "## Several GPUs: data parallel (issue 9)", "",
             f"{info.get('date', '?')}, {', '.join(info.get('gpus', [])) or '?'}, torch {info.get('torch', '?')}, "
             f"accelerate {info.get('accelerate', '?')}. `bench/bench_multigpu.py`: trainer.training.loop.train_lora itself, "
             f"random weights at the real sizes, {rows[0].get('res', RES) if rows else RES}^2, rank 32, attention "
             "targets of all blocks, bf16, gradient "
             f"checkpointing on, compile off; median of {rows[0].get('steps', '?') if rows else '?'} steps after "
             f"{rows[0].get('warm', '?') if rows else '?'} warm-up. Global batch = images per optimizer step, split over "
             "the GPUs (2 GPUs x 1 image = 1 GPU x 2 images: the same update).", "",
             "| model | global batch | GPUs | s/step | images/s | speed-up vs 1 GPU | peak GiB per card | note |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        up = next((u for u in ups if (u["model"], u["global_batch"], u["processes"]) ==
                   (r["model"], r["global_batch"], r["processes"])), None)
        peaks = " / ".join(f"{p:.1f}" for p in r.get("peak_gib_per_card") or [] if p is not None) or "-"
        if "step_s" in r:
            speed = f"{up['speedup']:.2f}x" if up else "-"
            lines.append(f"| {r['model']} | {r['global_batch']} | {r['processes']} | {r['step_s']:.3f} | "
                         f"{r['images_per_s']:.2f} | {speed} | {peaks} | |")
        else:
            lines.append(f"| {r['model']} | {r['global_batch']} | {r['processes']} | - | - | - | {peaks} | "
                         f"{r['error'][:120]} |")
    lines.append("")
    for u in ups:
        target = " (target >= 1.85x: " + ("MET" if u["speedup"] >= 1.85 else "not met") + ")" \
            if u["model"] == "klein4b" and u["processes"] == 2 else ""
        lines.append(f"- {u['model']} global batch {u['global_batch']}: {u['speedup']:.2f}x on {u['processes']} GPUs, "
                     f"scaling efficiency {100 * u['efficiency']:.0f}%{target}; max relative loss difference to the "
                     f"1-GPU run {u['loss_diff']:.1e} (same samples, noise and init)")
    sizes = sorted({(r["model"], round(r["allreduce_mb"])) for r in rows if "allreduce_mb" in r})
    mb = ", ".join(f"{m} {s} MB" for m, s in sizes) or "?"
    lines += ["", f"What limits scaling: each step all-reduces only the LoRA gradients, once, after backward, in fp32 "
              f"({mb} at rank 32 on the attention of all blocks); the frozen weights never move. The rest of the step "
              "is the same per-image work, so what efficiency is lost goes to that all-reduce, to waiting for the "
              "slower card, and at global batch 2 to the smaller per-card batch.", SECTION_END]
    return "\n".join(lines)


def merge_section(results_md: str, section: str, start: str = SECTION_START, end: str = SECTION_END) -> None:
    """Replace the part of RESULTS.md between `start` and `end` with `section` (which carries both), or append it."""
    text = open(results_md, encoding="utf-8").read() if os.path.exists(results_md) else "# Results\n"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    with open(results_md, "w", encoding="utf-8") as f:
        f.write(text)


def write_report(result: dict, results_md: str) -> None:
    merge_section(results_md, markdown(result))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--batches", default=",".join(map(str, BATCHES)))
    ap.add_argument("--gpus", default="1,2", help="process counts to compare")
    ap.add_argument("--warm", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--budget", type=float, default=BUDGET_S)
    ap.add_argument("--res", type=int, default=RES)
    ap.add_argument("--cpu", action="store_true", help="smoke test on CPU processes (tiny model): no timings")
    ap.add_argument("--report", default=None, help="merge DIR/multigpu.json into bench/RESULTS.md and exit")
    a = ap.parse_args()
    batches = [int(b) for b in a.batches.split(",")]
    if a.worker:
        worker(a.models, batches, a.warm, a.steps, a.res, a.cpu)
        return 0
    if a.report:
        with open(os.path.join(a.report, "multigpu.json"), encoding="utf-8") as f:
            write_report(json.load(f), os.path.join(HERE, "RESULTS.md"))
        return 0
    start = time.perf_counter()
    rows: list[dict] = []
    for model in a.models.split(","):
        for procs in (int(p) for p in a.gpus.split(",")):
            left = a.budget - (time.perf_counter() - start)
            if left < 30:
                rows += [dict(model=model, res=a.res, global_batch=gb, processes=procs, error="skipped: time budget")
                         for gb in batches]
                continue
            rows += launch(model, procs, batches, a.warm, a.steps, min(LAUNCH_TIMEOUT_S, left), a.res, a.cpu)
            result = dict(env=env_info(), rows=rows, speedups=speedups(rows), wall_s=time.perf_counter() - start)
            with open(os.path.join(OUT, "multigpu.json"), "w", encoding="utf-8") as f:  # after every launch
                json.dump(result, f, indent=1)
    import shutil

    shutil.rmtree(RUNS_DIR, ignore_errors=True)
    result = dict(env=env_info(), rows=rows, speedups=speedups(rows), wall_s=time.perf_counter() - start)
    with open(os.path.join(OUT, "multigpu.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(OUT, "multigpu.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result) + "\n")
    for u in result["speedups"]:
        print(f"[bench_multigpu] {u['model']} gb{u['global_batch']}: {u['speedup']:.2f}x on {u['processes']} GPUs",
              flush=True)
    print(f"[bench_multigpu] done in {result['wall_s']:.0f} s; {OUT}/multigpu.json and multigpu.md", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
