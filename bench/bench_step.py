"""One LoRA training step of klein 4B/9B: ours against diffusers+peft and ComfyUI's TrainLoraNode.

Runs on the GPU machine (see bench/README.md for the command). Random weights at the real klein
sizes (no checkpoints are reachable there), batch 1, rank 32, bf16 base, 512 text tokens.

  ours      the node's code path: ComfyUI model from a BFL state dict (comfy.sd.load_diffusion_model_state_dict,
            cached_patcher_init set) trained by klein_lora_studio.trainer.training.loop.train_lora itself, with the
            node's default compile_blocks="auto" (compiled blocks on CUDA); attention targets of all groups.
  ours:eager the same with compile_blocks="off" (uncompiled blocks); its loss curve checks the compiled one.
  diffusers bench/peer_diffusers_peft.py (Flux2Transformer2DModel + peft, attention projections, AdamW).
  comfy     bench/peer_comfy_native.py (ComfyUI's TrainLoraNode, all linears, rank 32, bf16 LoRA).

Step time: median of timed steps after warm-up (comfy: (long run - short run) / extra steps, as the
peer script does). Peak memory: torch.cuda.max_memory_allocated, base weights included, for all three.
MFU: KLEIN.md's FLOP count per step over the measured time, at 800 TFLOP/s.

usage: bench_step.py --models klein4b,klein9b --impls ours,diffusers,comfy [--variants fused,noitem,...]
       bench_step.py --report DIR...   (merge bench_*.json into bench/RESULTS.md)
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import os
import statistics
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


# ---------------------------------------------------------------- ours

VARIANTS = {
    "base": {"compile_blocks": "auto"},     # the node's default: compiled blocks on CUDA
    "eager": {"compile_blocks": "off"},     # uncompiled blocks
}


WARM, STEPS = 4, 10
WARM_PLUS_STEPS = WARM + STEPS


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


def run_ours(pcn, patcher, name, res, gc, variant="base", warm=WARM, steps=STEPS, seed=0):
    """trainer.training.loop.train_lora itself (what KleinLoRATrainer calls), timed between its per-step callbacks.

    on_step runs after the step's float(loss), which synchronises the GPU, so the time between two
    callbacks is one whole step: batch, forward, backward, clipping, AdamW update.
    """
    import tempfile
    from pathlib import Path

    import torch
    from klein_lora_studio.trainer.training import loop

    data, targets = random_run(pcn, name, patcher, res)
    cfg = loop.TrainConfig(rank=32, alpha=32.0, learning_rate=1e-4, steps=warm + steps, seed=seed,
                           gradient_checkpointing=gc, save_dtype="bf16", output_name="bench",
                           compile_blocks=VARIANTS[variant]["compile_blocks"])
    stamps = []
    hooks = loop.TrainHooks(on_step=lambda step, total, loss: stamps.append(time.perf_counter()))
    reset_peak()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out, torch.inference_mode():
        result = loop.train_lora(patcher, data, targets, cfg, Path(out), hooks)
    times = [b - a for a, b in zip(stamps[warm - 1:-1], stamps[warm:], strict=True)]
    return dict(impl="ours" if variant == "base" else f"ours:{variant}", model=name, res=res, gc=gc,
                step_s=statistics.median(times), step_min_s=min(times), peak_gib=peak_gib(),
                warmup_s=stamps[warm - 1] - t0, n_targets=len(targets.modules),
                losses=result.losses, final_loss=result.losses[-1])


def check_equivalence(rows: list[dict]) -> list[dict]:
    """The compiled run's loss curve against the eager one (same seed, same data, same init)."""
    out = []
    for r in rows:
        if r.get("impl") != "ours:eager" or "losses" not in r:
            continue
        base = next((b for b in rows if b.get("impl") == "ours" and "losses" in b and
                     (b["model"], b["res"], b["gc"]) == (r["model"], r["res"], r["gc"])), None)
        if base is None:
            continue
        rel = max(abs(a - b) / max(abs(b), 1e-6) for a, b in zip(r["losses"], base["losses"], strict=True))
        out.append(dict(model=r["model"], res=r["res"], gc=r["gc"], max_rel_loss_diff=rel,
                        compiled=base["losses"][:6], eager=r["losses"][:6]))
        print(json.dumps(out[-1]), flush=True)
    return out


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


# ---------------------------------------------------------------- peers

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


def run_diffusers(name, res, gc):
    import peer_diffusers_peft as pdp
    pdp.CONFIGS.setdefault("tiny", dict(num_layers=1, num_single_layers=2, num_attention_heads=2,
                                        attention_head_dim=128, joint_attention_dim=192, guidance_embeds=False))
    row = pdp.run(name, res, gc)
    row["impl"] = "diffusers"
    return row


# ---------------------------------------------------------------- driver

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
    except torch.cuda.OutOfMemoryError:
        row = dict(error="OOM")
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="klein4b,klein9b")
    ap.add_argument("--res", default="512,1024")
    ap.add_argument("--gc", default="1,0")
    ap.add_argument("--impls", default="ours,diffusers,comfy")
    ap.add_argument("--variants", default="", help="extra variants of ours, e.g. fused,noitem,compile")
    ap.add_argument("--variant-configs", default="", help="model:res:gc list the variants run on (default: all)")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--report", nargs="*", help="folders with bench_*.json: write bench/RESULTS.md and stop")
    a = ap.parse_args()
    if a.report is not None:
        return report(a.report)
    pcn = setup_comfy()
    import torch
    info = env_info()
    print(json.dumps(info), flush=True)
    rows = []
    path = os.path.join(OUT, f"bench_{a.tag}.json")

    def save():
        json.dump({"env": info, "rows": rows}, open(path, "w"), indent=1)

    configs = [(r, g == "1") for r in map(int, a.res.split(",")) for g in a.gc.split(",")]
    vconf = {tuple(c.split(":")) for c in a.variant_configs.split(",") if c}
    impls = a.impls.split(",") if a.impls else []
    variants = [v for v in a.variants.split(",") if v]
    for name in a.models.split(","):
        hidden, depth, single, ctx = pcn.SIZES[name]
        if "ours" in impls or "comfy" in impls or variants:
            t = time.perf_counter()
            sd = {k: v.cpu() for k, v in pcn.random_sd(hidden, depth, single, ctx).items()}
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
            print(f"# {name}: random state dict in {time.perf_counter() - t:.1f}s", flush=True)
        if "ours" in impls or variants:
            patcher = load_patcher(sd)  # the state dict is shared with the ComfyUI-native peer below
            for res, gc in configs:
                key = dict(impl="ours", model=name, res=res, gc=gc)
                if "ours" in impls:
                    rows.append(guarded(run_ours, key, pcn, patcher, name, res, gc))
                    save()
                for var in variants:
                    if vconf and (name, str(res), str(int(gc))) not in vconf:
                        continue
                    key = dict(impl=f"ours:{var}", model=name, res=res, gc=gc)
                    rows.append(guarded(run_ours, key, pcn, patcher, name, res, gc, var))
                    save()
            del patcher
            free_comfy()
        if "comfy" in impls:
            for res, gc in configs:
                rows.append(guarded(run_comfy_native, dict(impl="comfy", model=name, res=res, gc=gc),
                                    pcn, sd, name, res, gc))
                save()
        sd = None
        if "diffusers" in impls:
            for res, gc in configs:
                rows.append(guarded(run_diffusers, dict(impl="diffusers", model=name, res=res, gc=gc), name, res, gc))
                save()
    json.dump(check_equivalence(rows), open(os.path.join(OUT, f"equivalence_{a.tag}.json"), "w"), indent=1)
    save()
    report([OUT], os.path.join(OUT, "RESULTS.md"))


# ---------------------------------------------------------------- report

def _fmt(x, f="{:.3f}"):
    return "-" if x is None else f.format(x)


def report(folders, dest=None):
    env, rows = {}, {}
    for d in folders:
        for f in sorted(glob.glob(os.path.join(d, "bench_*.json"))):
            data = json.load(open(f))
            env = env or data["env"]
            for r in data["rows"]:
                rows[(r["impl"], r["model"], r["res"], r["gc"])] = r  # later files win
    dest = dest or os.path.join(HERE, "RESULTS.md")
    L = ["# Training-step benchmark: ours vs diffusers+peft vs ComfyUI TrainLoraNode", "",
         f"GPU: {env.get('gpu')} | torch {env.get('torch')} | diffusers {env.get('diffusers')} | "
         f"peft {env.get('peft')} | ComfyUI {env.get('comfyui')} | Python {env.get('python')} | {env.get('date')}", "",
         "Random weights at real klein sizes, batch 1, 512 text tokens, rank 32, bf16 base, AdamW. "
         "ours: trainer.training.loop.train_lora as the node runs it (compiled blocks on CUDA; `ours:eager` without). "
         "ours and diffusers+peft: attention targets (double qkv/proj both streams, single linear1/linear2), "
         "LoRA weights fp32 under bf16 autocast; ComfyUI native: all linears, bf16 LoRA (its defaults). "
         "s/step: median after warm-up (ComfyUI: long-minus-short run). Peak: max_memory_allocated incl. "
         "base weights. MFU: KLEIN.md TFLOP/step at 800 TFLOP/s. Produced by `bench/bench_step.py`.", "",
         "| model | res | ckpt | impl | s/step | peak GiB | MFU | ratio | note |",
         "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(m, r, g) for (_, m, r, g) in rows}, key=lambda k: (k[0], k[1], not k[2]))
    impls = sorted({i for (i, *_ ) in rows}, key=lambda i: (i != "ours", not i.startswith("ours"), i))
    for m, r, g in keys:
        ours = rows.get(("ours", m, r, g), {})
        for i in impls:
            row = rows.get((i, m, r, g))
            if not row:
                continue
            ratio, note = "", row.get("error", "")
            if i.startswith("ours:") and ours.get("step_s") and row.get("step_s"):
                ratio = f"{ours['step_s'] / row['step_s']:.2f}x (variant vs ours)"
            elif i != "ours" and ours.get("step_s") and row.get("step_s"):
                ratio = f"{row['step_s'] / ours['step_s']:.2f}x"
            L.append(f"| {m} | {r} | {'yes' if g else 'no'} | {i} | {_fmt(row.get('step_s'))} | "
                     f"{_fmt(row.get('peak_gib'), '{:.1f}')} | {_fmt(row.get('mfu'), '{:.0%}')} | {ratio} | {note} |")
    L += ["", "ratio: peer rows = peer s/step / ours s/step (>1: ours is faster); `ours:*` rows = ours s/step / "
          "variant s/step (>1: the variant is faster than ours as-is).", "",
          "## Against the targets (issue 5)", ""]
    for m, r, g in keys:
        o, d, c = (rows.get((i, m, r, g), {}) for i in ("ours", "diffusers", "comfy"))
        if not o.get("step_s"):
            continue
        parts = [f"{m} {r}² ckpt={'on' if g else 'off'}:"]
        if d.get("step_s"):
            sp = d["step_s"] / o["step_s"]
            mem = (o["peak_gib"] <= d["peak_gib"]) if o.get("peak_gib") and d.get("peak_gib") else None
            parts.append(f"vs diffusers+peft {sp:.2f}x (target >= 1.6x: {'MET' if sp >= 1.6 else 'not met'}), "
                         f"peak {_fmt(o.get('peak_gib'), '{:.1f}')} vs {_fmt(d.get('peak_gib'), '{:.1f}')} GiB "
                         f"({'no more' if mem else 'MORE'})")
        if c.get("step_s"):
            sp = c["step_s"] / o["step_s"]
            parts.append(f"vs ComfyUI native {sp:.2f}x (target >= 2.5x: {'MET' if sp >= 2.5 else 'not met'})")
        if m == "klein4b" and r == 1024:
            lim = 0.24 if g else 0.17
            ok = o["step_s"] <= lim and (not g or (o.get("peak_gib") or 99) <= 10)
            parts.append(f"absolute: {o['step_s']:.3f} s/step vs <= {lim} s"
                         + (f", {o.get('peak_gib', 0):.1f} GiB vs <= 10 GiB" if g else "")
                         + f" ({'MET' if ok else 'not met'}; targets are stated for H100)")
        L.append("- " + "; ".join(parts))
    eq = [e for d in folders for f in sorted(glob.glob(os.path.join(d, "equivalence_*.json")))
          for e in json.load(open(f))]
    if eq:
        L += ["", "## Compiled vs eager (same seed, same data, same init)", ""]
        L += [f"- {e['model']} {e['res']}² ckpt={'on' if e['gc'] else 'off'}: max relative loss difference over "
              f"{WARM_PLUS_STEPS} steps {e['max_rel_loss_diff']:.2e}" for e in eq]
    open(dest, "w").write("\n".join(L) + "\n")
    print("\n".join(L))


if __name__ == "__main__":
    main()
