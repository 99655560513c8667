"""Quality benchmark (issue 16): does a LoRA trained here learn its concept? Graded by ground truth.

For each workshop recipe (style, object, character, image-to-image) a concept dataset of the micro
world (microworld/world.py) is written as an ordinary folder and trained through the node's own path
(KleinDatasetLoader -> KleinBlockTargetSelector -> KleinLoRATrainer, called as the tests call them),
with the recipe's rank, alpha and target preset. Every checkpoint (and the base model) is sampled on
held-out prompts through the pack's sampling (trainer/evaluation/sampling.py: FLUX.2 schedule, CFG 4,
empty negative, one seed for all cells; --sample-steps 8 is the pack's preview setting, 50 its full
one), decoded by the VAE and read by the analytic reader (microworld/reader.py):

  concept recipes   strength (concept present with the trigger), leakage (present without it),
                    flexibility (attribute accuracy of the triggered samples), base accuracy (untriggered)
  image-to-image    the transform error on held-out references against the identity and mean-target
                    baselines, and the share with the swapped colour (stock ReferenceLatent edit graph)

The pack's own latent metrics (trainer/evaluation/metrics.py) are computed on the same samples, for
the calibration against ground truth (Spearman rank correlation per metric, in the raw JSON).

    python bench/quality.py --models micro --steps 300 --every 50 --prompts 16 --sample-steps 8   # CPU, minutes
    python bench/quality.py --models micro --steps 1200 --every 100 --prompts 64 --sample-steps 50  # GPU, full
    python bench/quality.py --models tiny ...    # the random tiny models (plumbing only: they know nothing)
    python bench/quality.py --recipes style --adapters lora,lokr,loha,dora ...   # issue 20: the adapters side by side

`--adapters` trains each adapter on the same concept at a comparable parameter count (ADAPTER_RUNS) and adds a
side-by-side table (ground-truth strength, leakage, flexibility of the final LoRA, trained parameters, file
size, step time) to the docs section.

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
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CONCEPT_OF = {"style": "style", "object": "object", "character": "character", "image-to-image": "transform"}
MARK_START, MARK_END = "<!-- quality-bench:start -->", "<!-- quality-bench:end -->"
GRID_ROWS = 3  # held-out prompts shown per grid (each with and without the trigger)
# issue 20: each adapter at about the parameters of LoRA rank 16 on the micro model's attention (hidden 128):
# LoHa rank 8 has 2 x 8 x (in + out), DoRA adds one magnitude per output row, full-rank LoKr with factor 2 keeps
# an (out/2) x (in/2) factor (proj: exactly LoRA 16's 4096; qkv: 1.5x)
ADAPTER_RUNS = {"lora": dict(rank=16, alpha=16.0), "lokr": dict(rank=16, alpha=16.0, lokr_factor=2, lokr_full_rank=True),
                "loha": dict(rank=8, alpha=8.0), "dora": dict(rank=16, alpha=16.0)}


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


@dataclass
class Models:
    unet_file: str
    vae: object
    clip: object
    kind: str

    def unet(self):
        import nodes

        return nodes.UNETLoader().load_unet(self.unet_file, "default")[0]


def load_models(kind: str, weights: Path | None = None) -> Models:
    """The pretrained micro models (microworld/models.py; `weights`: another folder of them, e.g. a fresh
    pretraining's output, instead of the committed ones) or the random tiny ones, via the stock loaders."""
    import folder_paths

    import nodes

    if kind == "micro":
        from klein_lora_studio.microworld import models as mm

        paths = mm.write_micro_models(folder_paths.models_dir, weights)
        return Models(mm.UNET_FILE, nodes.VAELoader().load_vae("taef2")[0], mm.micro_clip(paths["te"]), kind)
    from klein_lora_studio.devtools import tiny_models

    paths = tiny_models.write_tiny_models(folder_paths.models_dir)
    return Models(tiny_models.UNET_FILE, nodes.VAELoader().load_vae("taef2")[0], tiny_models.tiny_clip(paths["te"]),
                  kind)


@dataclass
class Run:
    recipe: str
    steps: int
    every: int
    images: int
    px: int
    seed: int = 0
    lr_scale: float = 1.0
    base_compute: str = "auto"  # the trainer's base_compute (issue 17: fp8 against bf16 on the same seeds)
    adapter: str = ""  # issue 20: '' = the recipe's plain LoRA; else a key of ADAPTER_RUNS (its rank and knobs)
    concept: str = field(init=False)

    def __post_init__(self):
        self.concept = CONCEPT_OF[self.recipe]


def train(models: Models, run: Run, base_model):
    """Write the concept folder, then Dataset Loader -> Block Target Selector -> LoRA Trainer (node classes)."""
    import folder_paths
    import torch
    from klein_lora_studio.microworld import world
    from klein_lora_studio.nodes.dataset_loader import KleinDatasetLoader
    from klein_lora_studio.nodes.lora_trainer import KleinLoRATrainer
    from klein_lora_studio.nodes.target_selector import KleinBlockTargetSelector
    from klein_lora_studio.trainer.training import recipes

    name = f"mw_{run.concept}_{run.seed}" + (f"_{run.adapter}" if run.adapter else "")
    folder, control = world.write_dataset(Path(folder_paths.get_input_directory()) / name, run.concept, run.images,
                                          seed=run.seed, px=run.px)
    trigger = world.CONCEPTS[run.concept].trigger
    r = recipes.RECIPES[run.recipe]
    with torch.inference_mode():
        data, report = KleinDatasetLoader.execute(name, trigger, run.px, models.vae, models.clip,
                                                  control_folder=control.name if control else "",
                                                  use_cache=False).args
        targets = KleinBlockTargetSelector.execute(base_model, r.target_preset, True, True, True, True, "attention",
                                                   "both").args[0]
        t0 = time.perf_counter()
        knobs = ADAPTER_RUNS.get(run.adapter, {})
        recipe = {"recipe": "custom", "rank": knobs.get("rank", r.rank), "alpha": knobs.get("alpha", r.alpha),
                  "learning_rate": r.learning_rate * run.lr_scale, "steps": run.steps}  # the DynamicCombo's value
        adapter = {"adapter": run.adapter or "lora", **{k: v for k, v in knobs.items() if k.startswith("lokr_")}}
        out = KleinLoRATrainer.execute(model=base_model, dataset=data, targets=targets, recipe=recipe,
                                       output_name=name, save_every=run.every, batch_size=1, seed=run.seed,
                                       compile_blocks="off", save_dtype="fp32", base_compute=run.base_compute,
                                       adapter=adapter).args
    seconds = time.perf_counter() - t0
    checkpoints = [Path(p) for p in out[4].splitlines() if p.strip()]
    logging.info("quality: %s trained %d steps in %.0f s (%s)", run.recipe, run.steps, seconds, report.splitlines()[0])
    return data, checkpoints, out[3]["loss"], seconds  # checkpoints every `every` steps, then the final LoRA


def concept_suite(concept: str, n: int, seed: int):
    """(suite prompts, the scene of each prompt): each held-out scene with the trigger, then without."""
    from klein_lora_studio.microworld import world
    from klein_lora_studio.trainer.evaluation import sampling as sp

    prompts, scenes = [], []
    for i, s in enumerate(world.heldout_scenes(seed + 1000, n)):
        t = world.with_concept(s, concept)
        prompts += [sp.SuitePrompt(f"{i} + trigger", str(i), world.caption(t), True),
                    sp.SuitePrompt(f"{i}, no trigger", str(i), world.caption(s), False)]
        scenes += [t, s]
    return prompts, scenes


def settings_for(run: Run, sample_steps: int):
    from klein_lora_studio.trainer.evaluation import sampling as sp

    return sp.SampleSettings(steps=sample_steps, cfg=sp.BASE_CFG, seed=run.seed, width=run.px, height=run.px)


def score_concept_columns(columns, prompts, scenes, concept: str) -> list[dict]:
    """Ground truth per column (base first): the reader on every decoded sample."""
    from klein_lora_studio.microworld import scoring
    from klein_lora_studio.trainer.evaluation import sampling as sp

    rows = []
    for col in columns:
        images = [sp.to_pil(im) for im in col.images]
        trig = [(s, im) for s, im, p in zip(scenes, images, prompts, strict=True) if p.triggered]
        untrig = [(s, im) for s, im, p in zip(scenes, images, prompts, strict=True) if not p.triggered]
        rows.append({"label": col.label, "step": col.step, **scoring.score_concept(concept, trig, untrig).as_dict()})
    return rows


def pack_metrics(columns, prompts, dataset) -> list[dict]:
    """The pack's own latent metrics on the same samples (what its monitor would report), per checkpoint."""
    from klein_lora_studio.trainer.evaluation import metrics as mt

    scores = mt.suite_metrics(columns, prompts, dataset.latents)
    pick, reason = mt.recommend(scores)
    return [{"label": m.label, "step": m.step, "strength": m.concept_strength, "leakage": m.trigger_leakage,
             "flexibility": m.prompt_flexibility, "flags": m.flags, "recommended": m is pick} for m in scores]


def concept_grid(columns, prompts, title: str):
    """The first GRID_ROWS held-out prompts, triggered and not: rows = prompts, columns = base + checkpoints."""
    from klein_lora_studio.trainer.evaluation import sampling as sp

    keep = list(range(min(2 * GRID_ROWS, len(prompts))))
    cells = [[sp.to_pil(col.images[i]) for col in columns] for i in keep]
    return sp.grid_image(cells, [prompts[i].text for i in keep], [c.label for c in columns], title)


def evaluate_concept(models: Models, run: Run, base_model, data, checkpoints, prompts_n: int, sample_steps: int):
    """Sample base + every checkpoint on held-out prompts; ground truth and the pack's metrics per column."""
    from klein_lora_studio.trainer.evaluation import sampling as sp

    prompts, scenes = concept_suite(run.concept, prompts_n, run.seed)
    with torch_inference():
        columns = sp.sample_checkpoints(base_model, models.clip, models.vae, checkpoints, prompts,
                                        settings_for(run, sample_steps))
    truth = score_concept_columns(columns, prompts, scenes, run.concept)
    return truth, pack_metrics(columns, prompts, data), concept_grid(columns, prompts, f"{run.recipe}: held-out prompts")


def torch_inference():
    import torch

    return torch.inference_mode()


# --------------------------------------------------------------------------------------- image-to-image
def edit_conditioning(clip, text: str, reference):
    """The stock edit graph's conditioning: CLIPTextEncode -> ReferenceLatent(reference)."""
    from comfy_extras.nodes_edit_model import ReferenceLatent

    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return ReferenceLatent.execute(cond, {"samples": reference[None]}).result[0]


def edit_samples(model, models: Models, references, settings) -> list:
    """One sample per reference latent (positive and empty negative both carry the reference), decoded."""
    from klein_lora_studio.microworld import world
    from klein_lora_studio.trainer.evaluation import sampling as sp

    latents = []
    for ref in references:
        pos = edit_conditioning(models.clip, world.TRANSFORM_CAPTION, ref)
        neg = edit_conditioning(models.clip, "", ref)
        latents += sp.sample_latents(model, [pos], neg, settings)
    return [sp.to_pil(im) for im in sp.decode(models.vae, latents)]


def evaluate_transform(models: Models, run: Run, base_model, data, checkpoints, prompts_n: int, sample_steps: int):
    """Held-out references through the edit graph, per checkpoint: transform error vs the baselines."""
    import comfy.sd
    from klein_lora_studio.microworld import scoring, world
    from klein_lora_studio.trainer.evaluation import sampling as sp

    refs = world.heldout_scenes(run.seed + 1000, prompts_n)
    train_targets = [world.render(world.transformed(s), run.px) for s in world.pretraining_scenes(run.seed, run.images)]
    settings = settings_for(run, sample_steps)
    rows, cols = [], []
    with torch_inference():
        latents = [models.vae.encode(sp.to_image_tensor(world.render(s, run.px))).to("cpu")[0] for s in refs]
        for label, step, path in [(sp.BASE_LABEL, 0, None), *[(None, None, p) for p in checkpoints]]:
            model = base_model
            if path is not None:
                sd, meta = sp.read_lora(path)
                model = comfy.sd.load_lora_for_models(base_model, None, sd, 1.0, 0)[0]
                step = sp.lora_step(path, meta)
                label = f"step {step}"
            images = edit_samples(model, models, latents, settings)
            rows.append({"label": label, "step": step, **scoring.score_transform(images, refs, train_targets).as_dict()})
            cols.append((label, images))
    keep = range(min(2 * GRID_ROWS, len(refs)))
    cells = [[world.render(refs[i], run.px), world.render(world.transformed(refs[i]), run.px),
              *[imgs[i] for _, imgs in cols]] for i in keep]
    grid = sp.grid_image(cells, [f"held-out reference {i}" for i in keep],
                         ["reference", "expected", *[c for c, _ in cols]], "image-to-image: held-out references")
    return rows, [], grid


# --------------------------------------------------------------------------------------- calibration
def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman rank correlation (average ranks for ties); None with fewer than 3 pairs or a constant side."""
    import numpy as np

    if len(a) < 3:
        return None

    def ranks(x):
        x = np.asarray(x, float)
        order = x.argsort(kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        for v in np.unique(x):
            r[x == v] = r[x == v].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return None
    return float(np.corrcoef(ra, rb)[0, 1])


def truth_quality(row: dict) -> float:
    """One ground-truth figure of merit per checkpoint: strength x (1 - leakage) x flexibility kept."""
    kept = min(1.0, row["flexibility"] / row["base_accuracy"]) if row["base_accuracy"] > 0 else 0.0
    return row["strength"] * (1 - row["leakage"]) * kept


def calibration(truth: list[dict], pack: list[dict]) -> dict:
    """Rank correlation of the pack's metrics with ground truth over the checkpoints (base excluded), and
    where the pack's recommended checkpoint ranks by truth_quality (1 = best)."""
    gt = truth[1:]
    out = {k: spearman([p[k] for p in pack], [g[k] for g in gt]) for k in ("strength", "leakage", "flexibility")
           if all(p[k] is not None for p in pack)}
    quality = [truth_quality(g) for g in gt]
    order = sorted(range(len(gt)), key=lambda i: -quality[i])
    pick = next((i for i, p in enumerate(pack) if p["recommended"]), None)
    out["recommended"] = pack[pick]["label"] if pick is not None else None
    out["recommended_truth_rank"] = order.index(pick) + 1 if pick is not None else None
    out["truth_best"] = [gt[i]["label"] for i in order[:2]]
    return out


# --------------------------------------------------------------------------------------- report
def _f(v, fmt="{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(result: dict) -> str:
    run, rows = result["run"], result["truth"]
    head = (f"### {run['recipe']} (trigger `{result['trigger']}`)\n\n{run['images']} images at {run['px']} px, "
            f"rank {result['rank']}, lr {result['lr']:g}, {run['steps']} steps (checkpoint every {run['every']}), "
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
    """The final file's trained parameters (every tensor but alpha) and size on disk (fp32)."""
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
    lines = ["### Adapters side by side (final LoRA)\n", "| adapter | rank | trained parameters | file (fp32) | "
             "step time | strength | leakage | flexibility | base accuracy |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["truth"][-1]
        lines.append(f"| {r['run']['adapter']} | {r['rank']} | {r['params']:,} | {r['file_bytes'] / 1024:.0f} KiB | "
                     f"{1000 * r['train_s'] / r['run']['steps']:.0f} ms | {_f(t['strength'])} | {_f(t['leakage'])} | "
                     f"{_f(t['flexibility'])} | {_f(t['base_accuracy'])} |")
    return "\n".join(lines) + "\n\nStep time: training seconds (sampling excluded) / steps.\n\n"


def write_docs(results: list[dict], doc: Path, tag: str) -> None:
    """Replace the quality-bench section of docs/quality.md (everything else in the file is kept)."""
    from klein_lora_studio.trainer.paths import atomic_write_text

    body = adapter_table(results) + "\n".join(markdown(r) for r in results)
    section = (f"{MARK_START}\n## Quality benchmark ({tag})\n\nWritten by `bench/quality.py` "
               f"(raw numbers: bench/results/quality_{tag}.json).\n\n{body}{MARK_END}")
    text = doc.read_text(encoding="utf-8") if doc.is_file() else "# Quality on the micro world\n\n"
    if MARK_START in text and MARK_END in text:
        text = text[:text.index(MARK_START)] + section + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip() + "\n\n" + section + "\n"
    atomic_write_text(text, doc)


def run_recipe(models: Models, base_model, run: Run, prompts_n: int, sample_steps: int, images_dir: Path,
               tag: str) -> dict:
    import torch
    from klein_lora_studio.microworld import world
    from klein_lora_studio.trainer.paths import atomic_save_image
    from klein_lora_studio.trainer.training import recipes

    data, checkpoints, losses, train_s = train(models, run, base_model)
    t0 = time.perf_counter()
    evaluate = evaluate_transform if run.recipe == "image-to-image" else evaluate_concept
    truth, pack, grid = evaluate(models, run, base_model, data, checkpoints, prompts_n, sample_steps)
    name = f"quality_{tag}_{run.recipe}{'_' + run.adapter if run.adapter else ''}.png"
    atomic_save_image(grid, images_dir / name)
    if os.environ.get("OUT"):  # the GPU machine sends back only $OUT
        atomic_save_image(grid, Path(os.environ["OUT"]) / name)
    r = recipes.RECIPES[run.recipe]
    result = {"run": {k: v for k, v in vars(run).items()}, "trigger": world.CONCEPTS[run.concept].trigger,
              "rank": ADAPTER_RUNS.get(run.adapter, {}).get("rank", r.rank),
              **file_facts(checkpoints[-1]), "lr": r.learning_rate * run.lr_scale, "prompts": prompts_n,
              "sample_steps": sample_steps,
              "models": models.kind, "train_s": train_s, "eval_s": time.perf_counter() - t0, "losses": losses,
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
              "truth": truth, "pack": pack, "grid": name}
    if pack:
        result["calibration"] = calibration(truth, pack)
    return result


def save(results: list[dict], args) -> None:
    """Raw JSON into bench/results/ and the docs section; copies into $OUT on the GPU machine."""
    from klein_lora_studio.trainer.paths import atomic_write_text

    raw = json.dumps(results, indent=1, default=str)
    atomic_write_text(raw, HERE / "results" / f"quality_{args.tag}.json")
    write_docs(results, args.docs / "quality.md", args.tag)
    if os.environ.get("OUT"):
        atomic_write_text(raw, Path(os.environ["OUT"]) / f"quality_{args.tag}.json")
        write_docs(results, Path(os.environ["OUT"]) / "quality.md", args.tag)


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
    ap.add_argument("--adapters", default="", help="issue 20: e.g. lora,lokr,loha,dora (each per ADAPTER_RUNS)")
    ap.add_argument("--tag", default="cpu")
    ap.add_argument("--docs", type=Path, default=REPO / "docs", help="where quality.md and images/ go")
    ap.add_argument("--weights", type=Path, default=None, help="micro weights folder (default: the committed ones)")
    ap.add_argument("--base", type=Path, default=None, help="ComfyUI base directory (default: a temp folder)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    boot_comfy(args.base or Path(tempfile.mkdtemp(prefix="klein-quality-")))
    models = load_models(args.models, args.weights)
    base_model = models.unet()
    results = []
    adapters = [a.strip() for a in args.adapters.split(",") if a.strip()] or [""]
    for recipe, adapter in [(r.strip(), a) for r in args.recipes.split(",") if r.strip() for a in adapters]:
        run = Run(recipe, args.steps, args.every, args.images, args.px, args.seed, args.lr_scale, args.base_compute,
                  adapter)
        results.append(run_recipe(models, base_model, run, args.prompts, args.sample_steps,
                                  args.docs / "images", args.tag))
        logging.info("quality: %s", json.dumps({k: results[-1][k] for k in ("truth", "calibration")
                                                if k in results[-1]}, default=str)[:2000])
        save(results, args)  # after every recipe: a run cut short keeps what it finished
    return 0


if __name__ == "__main__":
    sys.exit(main())
