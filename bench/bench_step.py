"""One LoRA training step of klein 4B/9B: ours against diffusers+peft (eager and torch.compile'd) and ComfyUI's
TrainLoraNode, every implementation and configuration in a process of its own.

Runs on the GPU machine (see bench/README.md for the command). Random weights at the real klein sizes (no
checkpoints are reachable there), batch 1, rank 32, bf16 base, 512 text tokens. A peer run after another
training in the same process was measured 19% slower than in its own process (0.197 vs 0.166 s/step), so
the driver starts one process per row (`--row`) and only collects their JSON.

  ours                the node's code path: ComfyUI model from a BFL state dict (cached_patcher_init set) trained by
                      klein_lora_studio.trainer.training.loop.train_lora itself, compile_blocks "auto" (compiled
                      blocks on CUDA), attention targets of all groups; ours:<variant> changes TrainConfig (OURS).
  diffusers           bench/peer_diffusers_peft.py run(...) eager (Flux2Transformer2DModel + peft, attention
                      projections, AdamW); diffusers:compiled is run(..., compile_=True), the whole transformer
                      under torch.compile, the strongest set-up its users have.
  comfy               bench/peer_comfy_native.py (ComfyUI's TrainLoraNode, all linears, rank 32, bf16 LoRA).

Step time: median of timed steps after warm-up (comfy: (long run - short run) / extra steps, as the peer
script does). Peak memory: torch.cuda.max_memory_allocated, base weights included. MFU: KLEIN.md's FLOP
count per step over the measured time, at 800 TFLOP/s. Every ratio is against the eager and the compiled
diffusers peer of the same invocation.

usage: bench_step.py --models klein4b --res 1024 --gc 0,1 --impls ours,ours:fp8,diffusers,diffusers:compiled,comfy
       bench_step.py --models tiny --res 64 --cpu          (CPU smoke run of the same driver; timings mean nothing)
       bench_step.py --report DIR...                       (merge DIR/bench_*.json into bench/RESULTS.md)
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PEAK_TFLOPS = 800.0
# KLEIN.md "Compute per LoRA step": TFLOP per step, (model, res, gradient checkpointing)
TFLOP = {("klein4b", 512, False): 21.4, ("klein4b", 512, True): 31.6, ("klein4b", 1024, False): 79.4,
         ("klein4b", 1024, True): 114.0, ("klein9b", 512, False): 47.3, ("klein9b", 512, True): 70.0,
         ("klein9b", 1024, False): 168.0, ("klein9b", 1024, True): 243.0}
OUT = os.environ.get("OUT", "/tmp")
SECTION = ("<!-- step17:start -->", "<!-- step17:end -->")
# TrainConfig fields of each variant of ours (the node's defaults otherwise)
OURS = {
    "ours": {},                                                    # compiled blocks on CUDA, bf16 base products
    "ours:eager": {"compile_blocks": "off"},
    "ours:fp8": {"base_compute": "fp8"},                           # fp8 products of the frozen base
    "ours:fp8:eager": {"base_compute": "fp8", "compile_blocks": "off"},
}
PEERS = ("diffusers", "diffusers:compiled", "comfy")
WARM, STEPS = 4, 10


def setup_comfy():
    """ComfyUI as a library (what peer_comfy_native does), PyAV stubbed."""
    sys.path.insert(0, HERE)  # peer scripts
    try:
        import av  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.join(HERE, "avstub"))
    comfy_dir = os.environ.get("COMFYUI_PATH") or os.path.join(REPO, ".comfy")
    if comfy_dir not in sys.path:
        sys.path.insert(0, comfy_dir)
    os.environ["COMFYUI_PATH"] = comfy_dir
    import peer_comfy_native  # noqa: F401  (parses ComfyUI's args, imports comfy)
    return peer_comfy_native


def cuda_sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gib():
    import torch
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def reset_peak():
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def load_patcher(sd, dtype=None, fast: bool = False):
    """A ComfyUI patcher from a BFL state dict, as UNETLoader makes it (weight dtype bf16 unless given; `fast`:
    weight_dtype fp8_e4m3fn_fast's fp8 matmuls), with cached_patcher_init set as the loader sets it."""
    import comfy.sd
    import torch

    options = {"dtype": dtype or torch.bfloat16, "fp8_optimizations": fast}

    def load(disable_dynamic=False):
        return comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options=options,
                                                        disable_dynamic=disable_dynamic)
    p = load()
    p.cached_patcher_init = (load, ())
    return p


def free_comfy():
    import comfy.model_management as mm
    import torch
    mm.unload_all_models()
    mm.soft_empty_cache()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def random_patcher(pcn, name: str):
    """A ComfyUI patcher of random weights at one of the real klein sizes (pcn.SIZES)."""
    hidden, depth, single, ctx = pcn.SIZES[name]
    return load_patcher({k: v.cpu() for k, v in pcn.random_sd(hidden, depth, single, ctx).items()})


def random_run(pcn, name: str, patcher, res: int, n: int = 1):
    """(dataset, attention targets of all groups) for `patcher`: n random latents and 512-token contexts."""
    import torch
    from klein_lora_studio.trainer.data.dataset import KleinDataset
    from klein_lora_studio.trainer.model.targets import GROUPS, BlockCounts, linear_layer_names, resolve_targets

    ctx_dim = pcn.SIZES[name][3]
    h = res // 16
    g = torch.Generator().manual_seed(0)
    data = KleinDataset([torch.randn(128, h, h, generator=g) for _ in range(n)],
                        [torch.randn(512, ctx_dim, generator=g) for _ in range(n)], ["bench"] * n,
                        [f"bench{i}.png" for i in range(n)], res, "bench", "random")
    dm = patcher.model.diffusion_model
    return data, resolve_targets(GROUPS, "attention", BlockCounts.of_model(dm), linear_names=linear_layer_names(dm))



def run_comfy_native(pcn, sd, name, res, gc, short=3, long=13):
    """peer_comfy_native.run with the state dict built once per model size."""
    import torch
    _, _, _, ctx = pcn.SIZES[name]
    model = load_patcher(sd)
    h = w = res // 16
    lat = {"samples": torch.randn(4, 128, h, w)}
    pos = [[torch.randn(1, 512, ctx), {}]]
    with torch.inference_mode(False):
        pcn.train(model, lat, pos, 2, gc)  # warm-up (first-use kernels, autotuning) outside both timed runs
    reset_peak()
    with torch.inference_mode(False):
        t0 = time.perf_counter()
        pcn.train(model, lat, pos, short, gc)
        t1 = time.perf_counter()
        pcn.train(model, lat, pos, long, gc)
        t2 = time.perf_counter()
    row = dict(impl="comfy", model=name, res=res, gc=gc, step_s=((t2 - t1) - (t1 - t0)) / (long - short),
               peak_gib=peak_gib(), short_run_s=t1 - t0, long_run_s=t2 - t1)
    del model
    free_comfy()
    return row


def env_info():
    import torch
    info = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                torch=torch.__version__, python=sys.version.split()[0],
                gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    for mod in ("diffusers", "peft", "transformers", "accelerate"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as e:  # report, the bench still runs what it can
            info[mod] = f"missing ({e!r:.80})"
    try:
        sys.path.insert(0, os.environ["COMFYUI_PATH"])
        import comfyui_version
        info["comfyui"] = comfyui_version.__version__
    except Exception:
        info["comfyui"] = "?"
    return info


def guarded(fn, key, *a, **kw):
    import torch
    t = time.perf_counter()
    try:
        row = fn(*a, **kw)
    except torch.cuda.OutOfMemoryError as e:
        row = dict(error="OOM", oom_message=str(e)[:400])
    except Exception as e:  # one broken config must not hide the rest
        traceback.print_exc()
        row = dict(error=repr(e)[:400])
    row.update({k: v for k, v in key.items() if k not in row})
    row["wall_s"] = time.perf_counter() - t
    tf = TFLOP.get((row["model"], row["res"], row["gc"]))
    if tf and row.get("step_s"):
        row["mfu"] = tf / row["step_s"] / PEAK_TFLOPS
        row["tflop_step_klein_md"] = tf
    if "error" in row:
        free_comfy_safe()
    print(json.dumps(row), flush=True)
    return row


def free_comfy_safe():
    try:
        free_comfy()
    except Exception:
        pass


# ---------------------------------------------------------------- rows (each in its own process)

def run_ours(pcn, name: str, res: int, gc: bool, impl: str = "ours", warm: int = WARM, steps: int = STEPS,
             seed: int = 0) -> dict:
    """trainer.training.loop.train_lora itself (what KleinLoRATrainer calls), timed between its per-step callbacks.

    on_step runs after the step's float(loss), which synchronises the GPU, so the time between two
    callbacks is one whole step: batch, forward, backward, clipping, AdamW update.
    """
    import dataclasses
    import tempfile
    from pathlib import Path

    import torch
    from klein_lora_studio.trainer.training import loop

    fields = {f.name for f in dataclasses.fields(loop.TrainConfig)}
    extra = OURS[impl]
    if missing := [k for k in extra if k not in fields]:
        raise ValueError(f"{impl}: TrainConfig has no {missing} (the trainer is not wired for this variant yet)")
    patcher = random_patcher(pcn, name)
    data, targets = random_run(pcn, name, patcher, res)
    cfg = loop.TrainConfig(rank=32, alpha=32.0, learning_rate=1e-4, steps=warm + steps, seed=seed,
                           gradient_checkpointing=gc, save_dtype="bf16", output_name="bench", **extra)
    stamps = []
    hooks = loop.TrainHooks(on_step=lambda step, total, loss: stamps.append(time.perf_counter()))
    reset_peak()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, torch.inference_mode():
        result = loop.train_lora(patcher, data, targets, cfg, Path(out), hooks)
    times = [b - a for a, b in zip(stamps[warm - 1:-1], stamps[warm:], strict=True)]
    return dict(impl=impl, model=name, res=res, gc=gc, step_s=statistics.median(times), step_min_s=min(times),
                peak_gib=peak_gib(), warmup_s=stamps[warm - 1] - t0, n_targets=len(targets.modules),
                losses=result.losses, final_loss=result.losses[-1])


def run_diffusers(name: str, res: int, gc: bool, impl: str = "diffusers", warm: int = WARM, steps: int = STEPS):
    import peer_diffusers_peft as pdp

    row = pdp.run(name, res, gc, steps=steps, warm=warm, compile_=impl == "diffusers:compiled")
    row["impl"] = impl
    return row


def run_row(spec: dict) -> dict:
    """One row in this process: `spec` = impl, model, res, gc (+ warm, steps)."""
    pcn = setup_comfy()
    impl, name, res, gc = spec["impl"], spec["model"], spec["res"], spec["gc"]
    warm, steps = spec.get("warm", WARM), spec.get("steps", STEPS)
    key = dict(impl=impl, model=name, res=res, gc=gc)
    if impl in OURS:
        return guarded(run_ours, key, pcn, name, res, gc, impl, warm, steps)
    if impl.startswith("diffusers"):
        return guarded(run_diffusers, key, name, res, gc, impl, warm, steps)
    if impl == "comfy":
        hidden, depth, single, ctx = pcn.SIZES[name]
        sd = {k: v.cpu() for k, v in pcn.random_sd(hidden, depth, single, ctx).items()}
        return guarded(run_comfy_native, key, pcn, sd, name, res, gc, warm, warm + steps)
    raise ValueError(f"unknown impl '{impl}': one of {[*OURS, *PEERS]}")


def row_process(spec: dict, script: str, cpu: bool, timeout: float, log_dir: str) -> dict:
    """Run `script --row spec` in a fresh process; its JSON row, or an error row saying why there is none."""
    os.makedirs(log_dir, exist_ok=True)
    tag = "_".join(str(spec[k]) for k in ("impl", "model", "res", "gc") if k in spec).replace(":", "-")
    out_file, log_file = os.path.join(log_dir, f"{tag}.json"), os.path.join(log_dir, f"{tag}.log")
    env = dict(os.environ, **({"CUDA_VISIBLE_DEVICES": ""} if cpu else {}))
    cmd = [sys.executable, script, "--row", json.dumps(spec), "--row-out", out_file]
    t = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    if rc == 0 and os.path.exists(out_file):
        with open(out_file) as f:
            row = json.load(f)
    else:
        tail = open(log_file, errors="replace").read()[-600:]
        row = dict(error=f"process ended {rc} after {time.perf_counter() - t:.0f}s: ...{tail[-300:]}")
    row.update({k: v for k, v in spec.items() if k not in row})
    row["process_s"] = time.perf_counter() - t
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return row


def plan(models: list[str], configs: list[tuple[int, bool]], impls: list[str], warm: int, steps: int) -> list[dict]:
    return [dict(impl=i, model=m, res=r, gc=g, warm=warm, steps=steps) for m in models for r, g in configs for i in impls]


def run_plan(specs: list[dict], script: str, cpu: bool, budget: float, row_timeout: float, log_dir: str) -> list[dict]:
    """Each spec in its own process, in order, until `budget` seconds are spent (the rest are recorded as skipped)."""
    rows, start = [], time.perf_counter()
    for spec in specs:
        left = budget - (time.perf_counter() - start)
        if left < 30:
            rows.append(dict(spec, error=f"skipped: the invocation's budget of {budget:.0f}s was spent"))
            continue
        rows.append(row_process(spec, script, cpu, min(row_timeout, left), log_dir))
    return rows

# ---------------------------------------------------------------- driver

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="klein4b,klein9b")
    ap.add_argument("--res", default="512,1024")
    ap.add_argument("--gc", default="1,0")
    ap.add_argument("--impls", default="ours,ours:eager,diffusers,diffusers:compiled,comfy",
                    help=f"any of {', '.join([*OURS, *PEERS])}")
    ap.add_argument("--warm", type=int, default=WARM)
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--cpu", action="store_true", help="run every row on the CPU (a smoke test of the driver)")
    ap.add_argument("--budget", type=float, default=3600, help="seconds for the whole invocation")
    ap.add_argument("--row-timeout", type=float, default=600)
    ap.add_argument("--tag", default="run")
    ap.add_argument("--row", help="(internal) one row as JSON, run in this process")
    ap.add_argument("--row-out", help="(internal) where --row writes its JSON")
    ap.add_argument("--report", nargs="*", help="folders with bench_*.json: merge them into bench/RESULTS.md and stop")
    a = ap.parse_args()
    if a.report is not None:
        return report(a.report)
    if a.row:
        return write_row(a.row_out, run_row(json.loads(a.row)))
    configs = [(r, g == "1") for r in map(int, a.res.split(",")) for g in a.gc.split(",")]
    specs = plan(a.models.split(","), configs, [i for i in a.impls.split(",") if i], a.warm, a.steps)
    rows = run_plan(specs, os.path.abspath(__file__), a.cpu, a.budget, a.row_timeout, os.path.join(OUT, f"rows_{a.tag}"))
    write_rows(os.path.join(OUT, f"bench_{a.tag}.json"), rows)
    print(markdown(rows))
    return rows


def write_row(path: str, row: dict) -> None:
    """What a --row process hands back: its row and the environment it ran in."""
    row["env"] = env_info()
    with open(path + ".tmp", "w") as f:
        json.dump(row, f)
    os.replace(path + ".tmp", path)


def write_rows(path: str, rows: list[dict]) -> None:
    env = next((r["env"] for r in rows if "env" in r), {})
    with open(path, "w") as f:
        json.dump({"env": env, "rows": [{k: v for k, v in r.items() if k != "env"} for r in rows]}, f, indent=1)


# ---------------------------------------------------------------- report

def _fmt(x, f="{:.3f}"):
    return "-" if x is None else f.format(x)


def max_rel_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b, strict=True))


def loss_checks(rows: dict) -> list[str]:
    """Same seed, same data, same init: compiled vs eager, fp8 vs bf16 base products (issue 17: within 1%/step)."""
    out = []
    for (impl, m, r, g), row in sorted(rows.items()):
        ref = {"ours:eager": "ours", "ours:fp8": "ours", "ours:fp8:eager": "ours:eager"}.get(impl)
        base = rows.get((ref, m, r, g), {}) if ref else {}
        if "losses" in row and "losses" in base and len(row["losses"]) == len(base["losses"]):
            d = max_rel_diff(row["losses"], base["losses"])
            limit = " (limit 1%: " + ("MET" if d <= 0.01 else "NOT MET") + ")" if "fp8" in impl else ""
            out.append(f"- {m} {r}² ckpt={'on' if g else 'off'}: {impl} vs {ref}, max relative loss difference over "
                       f"{len(row['losses'])} steps {d:.2e}{limit}")
    return out


# issue 17 targets, klein 4B/9B at 1024² bs1 r32 on one H200: (model, gc, impl) -> (max s/step, max GiB or None)
TARGETS = {("klein4b", False, "ours:fp8"): (0.10, "peer"), ("klein4b", False, "ours"): (0.14, "peer"),
           ("klein4b", True, "ours:fp8"): (0.15, 10.0), ("klein9b", False, "ours:fp8"): (0.20, None),
           ("klein9b", False, "ours"): (0.29, None)}
SPEEDUPS = {"ours:fp8": 1.66, "ours": 1.18}  # over the compiled diffusers peer; both >= 3.8x ComfyUI native


def target_lines(rows: dict) -> list[str]:
    out = []
    for (m, g, impl), (limit, mem) in TARGETS.items():
        row = rows.get((impl, m, 1024, g), {})
        if not row.get("step_s"):
            continue
        peer = rows.get(("diffusers:compiled", m, 1024, g), {})
        comfy = rows.get(("comfy", m, 1024, g), {})
        parts = [f"{m} 1024² ckpt={'on' if g else 'off'} {impl}: {row['step_s']:.3f} s/step vs <= {limit} "
                 f"({'MET' if row['step_s'] <= limit else 'missed by {:.0%}'.format(row['step_s'] / limit - 1)})"]
        if mem == "peer" and peer.get("peak_gib") and row.get("peak_gib"):
            ok = row["peak_gib"] <= peer["peak_gib"]
            parts.append(f"peak {row['peak_gib']:.1f} vs compiled peer {peer['peak_gib']:.1f} GiB ({'MET' if ok else 'MORE'})")
        elif isinstance(mem, float) and row.get("peak_gib"):
            parts.append(f"peak {row['peak_gib']:.1f} vs <= {mem} GiB ({'MET' if row['peak_gib'] <= mem else 'NOT MET'})")
        if impl in SPEEDUPS and peer.get("step_s") and not g:
            sp = peer["step_s"] / row["step_s"]
            parts.append(f"{sp:.2f}x the compiled peer (target >= {SPEEDUPS[impl]}x: "
                         f"{'MET' if sp >= SPEEDUPS[impl] else 'not met'})")
        if impl in SPEEDUPS and comfy.get("step_s") and not g:
            sp = comfy["step_s"] / row["step_s"]
            parts.append(f"{sp:.2f}x ComfyUI native (target >= 3.8x: {'MET' if sp >= 3.8 else 'not met'})")
        out.append("- " + "; ".join(parts))
    return out


def markdown(row_list: list[dict], env: dict | None = None) -> str:
    rows = {(r["impl"], r["model"], r["res"], r["gc"]): r for r in row_list}
    env = env or next((r["env"] for r in row_list if "env" in r), {})
    L = [SECTION[0], "## Training step, every row in its own process (issue 17)", "",
         f"{env.get('gpu')} | torch {env.get('torch')} | diffusers {env.get('diffusers')} | peft {env.get('peft')} | "
         f"ComfyUI {env.get('comfyui')} | {env.get('date')}. `bench/bench_step.py`: random weights at the real "
         "sizes, batch 1, 512 text tokens, rank 32, bf16, AdamW; ours and diffusers+peft on the attention "
         "projections (LoRA fp32 under bf16 autocast), ComfyUI native on all linears (bf16 LoRA, its defaults). "
         "s/step: median after warm-up (ComfyUI: long-minus-short run); peak: max_memory_allocated with the base "
         "weights; MFU: KLEIN.md FLOP at 800 TFLOP/s. Ratios: peer s/step / row s/step (>1: the row is faster).", "",
         "| model | res | ckpt | impl | s/step | peak GiB | MFU | vs diffusers eager | vs diffusers compiled | note |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    order = [*OURS, *PEERS]
    for m, r, g in sorted({k[1:] for k in rows}, key=lambda k: (k[0], k[1], not k[2])):
        for impl in sorted({k[0] for k in rows if k[1:] == (m, r, g)}, key=lambda i: order.index(i) if i in order else 99):
            row = rows[(impl, m, r, g)]
            ratios = []
            for peer in ("diffusers", "diffusers:compiled"):
                p = rows.get((peer, m, r, g), {})
                ok = p.get("step_s") and row.get("step_s")
                ratios.append(f"{p['step_s'] / row['step_s']:.2f}x" if ok else "")
            mfu = TFLOP.get((m, r, g)) / row["step_s"] / PEAK_TFLOPS if TFLOP.get((m, r, g)) and row.get("step_s") else None
            note = str(row.get("error", ""))[:160].replace("|", "/").replace("\n", " ")
            L.append(f"| {m} | {r} | {'yes' if g else 'no'} | {impl} | {_fmt(row.get('step_s'))} | "
                     f"{_fmt(row.get('peak_gib'), '{:.1f}')} | {_fmt(mfu, '{:.0%}')} | {ratios[0]} | {ratios[1]} | {note} |")
    if checks := loss_checks(rows):
        L += ["", "Loss curves (same seed, data and init):", "", *checks]
    if targets := target_lines(rows):
        L += ["", "Against issue 17's targets (stated for one H200):", "", *targets]
    return "\n".join([*L, SECTION[1]])


def report(folders: list[str], dest: str | None = None) -> None:
    """Merge the rows of every DIR/bench_*.json (later files win) into bench/RESULTS.md's issue-17 section."""
    from bench_multigpu import merge_section

    rows, env = {}, {}
    for d in folders:
        for path in sorted(glob.glob(os.path.join(d, "bench_*.json"))):
            with open(path) as f:
                data = json.load(f)
            env = env or data.get("env", {})
            for r in data["rows"]:
                if not r["impl"].startswith("sample:"):  # bench_sampling.py's rows share the folder
                    rows[(r["impl"], r["model"], r["res"], r["gc"])] = r
    text = markdown(list(rows.values()), env)
    merge_section(dest or os.path.join(HERE, "RESULTS.md"), text, *SECTION)
    print(text)


if __name__ == "__main__":
    sys.path.insert(0, HERE)
    main()
