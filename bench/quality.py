"""Quality benchmark (issue 16): does a LoRA trained here learn its concept? Graded by ground truth.

The engine (training through the node's own path, sampling, the reader's grading, the calibration of the pack's
metrics) is microworld/quality.py; this script boots ComfyUI, runs it per recipe and writes the report.

    python bench/quality.py --models micro --steps 300 --every 50 --prompts 16 --sample-steps 8   # CPU, minutes
    python bench/quality.py --models micro --steps 1200 --every 100 --prompts 64 --sample-steps 50  # GPU, full
    python bench/quality.py --models tiny ...    # the random tiny models (plumbing only: they know nothing)
    python bench/quality.py --recipes style --adapters lora,lokr,loha,dora ...   # issue 20: the adapters side by side

`--adapters` trains each adapter on the same concept at a comparable parameter count (microworld/quality.py
ADAPTER_RUNS) and adds a side-by-side table (ground-truth metrics of the final file, trained parameters, file size,
step time) to the docs section.

Writes a table and a labelled grid per run into docs/quality.md (between the quality-bench markers) and
docs/images/quality_<recipe>.png, and the raw numbers to bench/results/quality_<tag>.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
MARK_START, MARK_END = "<!-- quality-bench:start -->", "<!-- quality-bench:end -->"


def boot_comfy(base: Path):
    """ComfyUI as a library on `base` (models/, input/, output/), the pack importable, as the tests do."""
    pkg = Path(tempfile.mkdtemp(prefix="klein-pkg-"))
    (pkg / "klein_lora_studio").symlink_to(REPO, target_is_directory=True)
    sys.path.insert(0, str(pkg))
    comfyui = os.environ.get("COMFYUI_PATH") or str(REPO / ".comfy")
    sys.path.insert(1, comfyui)
    try:
        import av  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(HERE / "avstub"))
    for sub in ("models", "input", "output", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    import comfy.options

    comfy.options.enable_args_parsing()
    import torch

    argv, sys.argv = sys.argv, [sys.argv[0], "--base-directory", str(base), "--disable-api-nodes",
                                *([] if torch.cuda.is_available() else ["--cpu"])]
    try:
        import comfy.cli_args  # noqa: F401
        import comfy.model_management  # noqa: F401
        import folder_paths  # noqa: F401

        import nodes
    finally:
        sys.argv = argv
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return nodes
























# --------------------------------------------------------------------------------------- image-to-image






# --------------------------------------------------------------------------------------- calibration






# --------------------------------------------------------------------------------------- report
def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    run, rows = result["run"], result["truth"]
    extras = (f" + {run['plain_images']} regularisation images" + (" (the same scenes without the concept)"
                                                                    if run.get("plain_paired") else "")
              if run.get("plain_images") else "")
    extras += f", block groups {' + '.join(run['groups'])} alone" if run.get("groups") else ""
    head = (f"### {run['recipe']} (trigger `{result['trigger']}`)\n\n{run['images']} images{extras} at {run['px']} px, "
            f"rank {result['rank']}, alpha {result.get('alpha', result['rank']):g}, lr {result['lr']:g}, "
            f"{run['steps']} steps (checkpoint every {run['every']}), "
            f"{result['prompts']} held-out prompts, {result['sample_steps']} sampling steps, CFG 4, seed "
            f"{run['seed']}; {result['models']} models; training {result['train_s']:.0f} s, evaluation "
            f"{result['eval_s']:.0f} s on {result['device']}.\n\n")
    if run["recipe"] == "image-to-image":
        lines = ["| checkpoint | transform error | identity baseline | mean-target baseline | swapped colour | "
                 "colour + rest kept |", "|---|---|---|---|---|---|"]
        lines += [f"| {r['label']} | {_f(r['error'], '{:.3f}')} | {_f(r['identity_error'], '{:.3f}')} | "
                  f"{_f(r['mean_target_error'], '{:.3f}')} | {_f(r['colour_accuracy'])} | {_f(r['kept_accuracy'])} |"
                  for r in rows]
    else:
        pack = {p["label"]: p for p in result["pack"]}
        lines = ["| checkpoint | strength | leakage | flexibility | base accuracy | pack strength | pack leakage | "
                 "pack flexibility | pack verdict |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            p = pack.get(r["label"], {})
            verdict = "recommended" if p.get("recommended") else "; ".join(p.get("flags", [])) or ""
            lines.append(f"| {r['label']} | {_f(r['strength'])} | {_f(r['leakage'])} | {_f(r['flexibility'])} | "
                         f"{_f(r['base_accuracy'])} | {_f(p.get('strength'))} | {_f(p.get('leakage'))} | "
                         f"{_f(p.get('flexibility'))} | {verdict} |")
    return head + "\n".join(lines) + f"\n\n![{run['recipe']} grid](images/{result['grid']})\n"


def file_facts(lora: Path) -> dict:
    """The final file's trained parameters (every tensor but alpha) and its size on disk (fp32)."""
    import math

    from safetensors import safe_open

    with safe_open(str(lora), framework="pt") as f:
        params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if not k.endswith(".alpha"))
    return {"params": params, "file_bytes": lora.stat().st_size}


def adapter_table(results: list[dict]) -> str:
    """Issue 20: the adapters on one concept, their final LoRA side by side."""
    rows = [r for r in results if r["run"].get("adapter")]
    if not rows:
        return ""
    concept = "transform error | identity baseline" if rows[0]["run"]["recipe"] == "image-to-image" else \
        "strength | leakage | flexibility | base accuracy"
    lines = ["### Adapters side by side (final LoRA)\n", f"| adapter | rank | trained parameters | file (fp32) | "
             f"step time | {concept} |", "|---|---|---|---|---|" + "---|" * (concept.count("|") + 1)]
    for r in rows:
        t = r["truth"][-1]
        cells = [_f(t["error"], "{:.3f}"), _f(t["identity_error"], "{:.3f}")] if "error" in t else \
            [_f(t[k]) for k in ("strength", "leakage", "flexibility", "base_accuracy")]
        lines.append(f"| {r['run']['adapter']} | {r['rank']} | {r['params']:,} | {r['file_bytes'] / 1024:.0f} KiB | "
                     f"{1000 * r['train_s'] / r['run']['steps']:.0f} ms | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nStep time: training seconds (sampling excluded) / steps.\n\n"


def groups_table(results: list[dict]) -> str:
    """Issue 18 item 4: the same concept trained on each block group alone; what the final LoRA moves, per attribute."""
    rows = [r for r in results if r["run"].get("groups")]
    if not rows:
        return ""
    attrs = sorted({k for r in rows for k in r["truth"][-1].get("per_attribute", {})})
    head = "transform error | " if "error" in rows[0]["truth"][-1] else "strength | leakage | flexibility | "
    lines = ["### Block groups alone (final LoRA)\n", "| groups | trained parameters | " + head + " | ".join(attrs) + " |",
             "|---|---|" + "---|" * (head.count("|") + len(attrs))]
    base = rows[0]["truth"][0]
    for label, t, params in [("untrained base", base, 0)] + [(" + ".join(r["run"]["groups"]), r["truth"][-1], r["params"])
                                                             for r in rows]:
        cells = [_f(t["error"], "{:.3f}")] if "error" in t else [_f(t[k]) for k in ("strength", "leakage", "flexibility")]
        cells += [_f(t.get("per_attribute", {}).get(a)) for a in attrs]
        lines.append(f"| {label} | {params:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nPer attribute: the share of samples whose reading matches the expected picture.\n\n"


def write_docs(results: list[dict], doc: Path, tag: str) -> None:
    """Replace the quality-bench section of docs/quality.md (everything else in the file is kept)."""
    from klein_lora_studio.trainer.paths import atomic_write_text

    body = adapter_table(results) + groups_table(results) + "\n".join(markdown(r) for r in results)
    section = (f"{MARK_START}\n## Quality benchmark ({tag})\n\nWritten by `bench/quality.py` "
               f"(raw numbers: bench/results/quality_{tag}.json).\n\n{body}{MARK_END}")
    text = doc.read_text(encoding="utf-8") if doc.is_file() else "# Quality on the micro world\n\n"
    if MARK_START in text and MARK_END in text:
        text = text[:text.index(MARK_START)] + section + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(text, doc)


def run_recipe(models, base_model, run, prompts_n: int, sample_steps: int, images_dir: Path, tag: str,
               strengths: list[float] | None = None) -> dict:
    import torch
    from klein_lora_studio.microworld import quality as q
    from klein_lora_studio.microworld import world
    from klein_lora_studio.trainer.paths import atomic_save_image
    from klein_lora_studio.trainer.training import recipes

    data, checkpoints, losses, train_s = q.train(models, run, base_model)
    t0 = time.perf_counter()
    evaluate = q.evaluate_transform if run.recipe == "image-to-image" else q.evaluate_concept
    truth, pack, grid = evaluate(models, run, base_model, data, checkpoints, prompts_n, sample_steps)
    name = f"quality_{tag}_{run.recipe}{run.variant}.png"
    atomic_save_image(grid, images_dir / name)
    if os.environ.get("OUT"):  # the GPU machine sends back only $OUT
        atomic_save_image(grid, Path(os.environ["OUT"]) / name)
    r = recipes.RECIPES[run.recipe]
    result = {"run": {k: v for k, v in vars(run).items()}, "trigger": world.CONCEPTS[run.concept].trigger,
              "rank": run.rank, "alpha": run.alpha, **file_facts(checkpoints[-1]), "lr": r.learning_rate * run.lr_scale,
              "prompts": prompts_n, "sample_steps": sample_steps,
              "models": models.kind, "train_s": train_s, "eval_s": time.perf_counter() - t0, "losses": losses,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
              "truth": truth, "pack": pack, "grid": name}
    if pack:
        result["calibration"] = q.calibration(truth, pack)
    if strengths and run.recipe != "image-to-image":
        result["strengths"] = q.evaluate_strengths(models, run, base_model, checkpoints[-1], strengths, prompts_n,
                                                   sample_steps)
    return result


def sweep_file(models, base_model, run, lora: Path, strengths: list[float], prompts_n: int, sample_steps: int) -> dict:
    """--lora: an existing LoRA file at each strength, no training (the file of an earlier run, e.g. its final one)."""
    from klein_lora_studio.microworld import quality as q

    return {"run": {k: v for k, v in vars(run).items()}, "lora": str(lora), **file_facts(lora), "prompts": prompts_n,
            "sample_steps": sample_steps, "models": models.kind,
            "strengths": q.evaluate_strengths(models, run, base_model, lora, strengths, prompts_n, sample_steps)}


def save(results: list[dict], args) -> None:
    """Raw JSON into bench/results/ and the docs section; copies into $OUT on the GPU machine."""
    from klein_lora_studio.trainer.paths import atomic_write_text

    raw = json.dumps(results, indent=1, default=str)
    atomic_write_text(raw, HERE / "results" / f"quality_{args.tag}.json")
    write_docs(results, args.docs / "quality.md", args.tag)
    if os.environ.get("OUT"):
        atomic_write_text(raw, Path(os.environ["OUT"]) / f"quality_{args.tag}.json")
        write_docs(results, Path(os.environ["OUT"]) / "quality.md", args.tag)


def _sweep_only(args, models, base_model, strengths: list[float]) -> int:
    from klein_lora_studio.microworld import quality as q
    from klein_lora_studio.trainer.paths import atomic_write_text

    if not strengths:
        raise SystemExit("--lora needs --strengths (the load strengths to sample it at)")
    run = q.Run(args.recipes.split(",")[0].strip(), args.steps, args.every, args.images, args.px, args.seed)
    result = sweep_file(models, base_model, run, args.lora, strengths, args.prompts, args.sample_steps)
    atomic_write_text(json.dumps(result, indent=1, default=str), HERE / "results" / f"quality_{args.tag}.json")
    logging.info("quality: %s", json.dumps(result["strengths"], default=str)[:2000])
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", choices=("micro", "tiny"), default="micro")
    ap.add_argument("--recipes", default="style,object,character,image-to-image")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--every", type=int, default=50)
    ap.add_argument("--images", type=int, default=24, help="concept dataset size")
    ap.add_argument("--px", type=int, default=128)
    ap.add_argument("--prompts", type=int, default=16, help="held-out prompts (each also without the trigger)")
    ap.add_argument("--sample-steps", type=int, default=8, help="8 = the pack's preview, 50 = klein Base's")
    ap.add_argument("--lr-scale", type=float, default=1.0, help="times the recipe's learning rate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-compute", default="auto", choices=("auto", "bf16", "fp8"),
                    help="the frozen base's products (issue 17's check: fp8 within the run-to-run noise of bf16)")
    ap.add_argument("--adapters", default="", help="issue 20: e.g. lora,lokr,loha,dora (each as ADAPTER_RUNS sizes it)")
    ap.add_argument("--groups", default="", help="issue 18 item 4: one run per block-group set instead of the "
                    "recipe's preset, e.g. double,single_early,single_mid,single_late (join groups with +)")
    ap.add_argument("--plain-images", type=int, default=0,
                    help="regularisation images beside the concept's (untriggered base-world scenes; not for pairs)")
    ap.add_argument("--cells", default="", help="issue 18 item 3: one run per rank x alpha/rank cell instead of the "
                    "recipe's, e.g. 8x1,16x1,32x1,16x0.5,16x2 (every run keeps its checkpoints: the steps axis)")
    ap.add_argument("--plain-paired", action="store_true",
                    help="the regularisation images are the concept images' own scenes without the concept")
    ap.add_argument("--strengths", default="", help="issue 18 item 3: the final LoRA also sampled at these load "
                    "strengths, e.g. 0.5,1,1.5,2 (concept recipes)")
    ap.add_argument("--lora", type=Path, default=None, help="with --strengths: sweep this LoRA file of the (one) "
                    "recipe instead of training")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--docs", type=Path, default=REPO / "docs", help="where quality.md and images/ go")
    ap.add_argument("--weights", type=Path, default=None, help="micro weights folder (default: the committed ones)")
    ap.add_argument("--base", type=Path, default=None, help="ComfyUI base directory (default: a temp folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    boot_comfy(args.base or Path(tempfile.mkdtemp(prefix="klein-quality-")))
    from klein_lora_studio.microworld import quality as q

    models = q.load_models(args.models, args.weights)
    base_model = models.unet()
    results = []
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()] or [""]
    group_sets = [tuple(g.split("+")) for g in args.groups.split(",") if g.strip()] or [()]
    cells = [(int(c.split("x")[0]), float(c.split("x")[1])) for c in args.cells.split(",") if c.strip()] or [(0, 0.0)]
    strengths = [float(x) for x in args.strengths.split(",") if x.strip()]
    if args.lora is not None:
        return _sweep_only(args, models, base_model, strengths)
    for recipe, adapter, groups, (rank, ratio) in [(r.strip(), a, g, c) for r in args.recipes.split(",") if r.strip()
                                                   for a in adapters for g in group_sets for c in cells]:
        run = q.Run(recipe, args.steps, args.every, args.images, args.px, args.seed, args.lr_scale, args.base_compute,
                    adapter, plain_images=0 if recipe == "image-to-image" else args.plain_images, groups=groups,
                    plain_paired=args.plain_paired, rank_override=rank, alpha_ratio=ratio)
        results.append(run_recipe(models, base_model, run, args.prompts, args.sample_steps,
                                  args.docs / "images", args.tag, strengths))
        logging.info("quality: %s", json.dumps({k: results[-1][k] for k in ("truth", "calibration")
                                                if k in results[-1]}, default=str)[:2000])
        save(results, args)  # after every recipe: a run cut short keeps what it finished
    return 0


if __name__ == "__main__":
    sys.exit(main())
