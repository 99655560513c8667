"""The quality benchmark's engine (issue 16): train a micro-world concept through the node's own path and
grade every checkpoint by ground truth. `bench/quality.py` is its command line and report; the CPU quality
tests (tests/test_microworld_quality.py) call the same functions at a smaller size.

For each workshop recipe (style, object, character, image-to-image) a concept dataset of the micro world
(world.py) is written as an ordinary folder and trained through KleinDatasetLoader -> KleinBlockTargetSelector
-> KleinLoRATrainer with the recipe's rank, alpha and target preset. Every checkpoint (and the base) is sampled
on held-out prompts through the pack's sampling (trainer/evaluation/sampling.py) and read by reader.py:

  concept recipes   strength (concept present with the trigger), leakage (present without it),
                    flexibility (attribute accuracy of the triggered samples), base accuracy (untriggered)
  image-to-image    the transform error on held-out references against the identity and mean-target
                    baselines, and the share with the swapped colour (stock ReferenceLatent edit graph)

The pack's own latent metrics (trainer/evaluation/metrics.py) are computed on the same samples, for the
calibration against ground truth (Spearman rank correlation per metric).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

CONCEPT_OF = {"style": "style", "object": "object", "character": "character", "image-to-image": "transform"}
GRID_ROWS = 3  # held-out prompts shown per grid (each with and without the trigger)
# issue 20: each adapter at about the trained parameters of LoRA rank 16 on the micro model's attention (hidden 128):
# LoHa rank 8 has 2 x 8 x (in + out) per layer, DoRA adds one magnitude per output row, full-rank LoKr with factor 2
# keeps an (out/2) x (in/2) factor (proj: exactly LoRA 16's 4,096; qkv: 1.5x)
ADAPTER_RUNS = {"lora": dict(rank=16, alpha=16.0), "lokr": dict(rank=16, alpha=16.0, lokr_factor=2, lokr_full_rank=True),
                "loha": dict(rank=8, alpha=8.0), "dora": dict(rank=16, alpha=16.0)}


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
        from . import models as mm

        return micro_models(mm.write_micro_models(folder_paths.models_dir, weights))
    from ..devtools import tiny_models

    paths = tiny_models.write_tiny_models(folder_paths.models_dir)
    return Models(tiny_models.UNET_FILE, nodes.VAELoader().load_vae("taef2")[0], tiny_models.tiny_clip(paths["te"]),
                  kind)


def micro_models(paths: dict) -> Models:
    """The micro models already written into a models folder ComfyUI searches first (`paths`: what
    models.write_micro_models returned), through the stock loaders."""
    import nodes

    from . import models as mm

    return Models(mm.UNET_FILE, nodes.VAELoader().load_vae("taef2")[0], mm.micro_clip(paths["te"]), "micro")


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
    plain_images: int = 0  # regularisation images (world.write_dataset's `plain`): untriggered base-world scenes
    plain_paired: bool = False  # ... the concept images' own scenes without the concept (write_dataset's `paired`)
    groups: tuple[str, ...] = ()  # issue 18 item 4: these block groups alone (targets.GROUPS) instead of the preset
    rank_override: int = 0  # issue 18 item 3: this rank instead of the recipe's (0: the recipe's / the adapter's)
    alpha_ratio: float = 0.0  # ... and alpha = rank x this (0: the recipe's alpha)
    concept: str = field(init=False)

    def __post_init__(self):
        self.concept = CONCEPT_OF[self.recipe]
        from ..trainer.model.targets import GROUPS

        if set(self.groups) - set(GROUPS):
            raise ValueError(f"Run.groups {self.groups!r}: use block groups of {list(GROUPS)}")
        if self.adapter and self.adapter not in ADAPTER_RUNS:
            raise ValueError(f"Run.adapter {self.adapter!r}: use '' (the recipe's LoRA) or one of {list(ADAPTER_RUNS)}")

    @property
    def rank(self) -> int:
        from ..trainer.training import recipes

        if self.rank_override:
            return self.rank_override
        return ADAPTER_RUNS.get(self.adapter, {}).get("rank", recipes.RECIPES[self.recipe].rank)

    @property
    def alpha(self) -> float:
        from ..trainer.training import recipes

        if self.alpha_ratio or self.rank_override:  # a grid cell: alpha = rank x ratio (1: the recipes' alpha = rank)
            return self.rank * (self.alpha_ratio or 1.0)
        return ADAPTER_RUNS.get(self.adapter, {}).get("alpha", recipes.RECIPES[self.recipe].alpha)

    @property
    def variant(self) -> str:
        """What sets this run apart from the recipe's own, for file names: adapter, block groups, grid cell."""
        return ((f"_{self.adapter}" if self.adapter else "") + ("_" + "-".join(self.groups) if self.groups else "")
                + (f"_r{self.rank}a{self.alpha:g}" if self.rank_override or self.alpha_ratio else ""))


def train(models: Models, run: Run, base_model):
    """Write the concept folder, then Dataset Loader -> Block Target Selector -> LoRA Trainer (node classes)."""
    import folder_paths
    import torch

    from ..nodes.dataset_loader import KleinDatasetLoader
    from ..nodes.lora_trainer import KleinLoRATrainer
    from ..nodes.target_selector import KleinBlockTargetSelector
    from ..trainer.model.targets import GROUPS
    from ..trainer.training import recipes
    from . import world

    name = f"mw_{run.concept}_{run.seed}{run.variant}"
    folder, control = world.write_dataset(Path(folder_paths.get_input_directory()) / name, run.concept, run.images,
                                          seed=run.seed, px=run.px, plain=run.plain_images, paired=run.plain_paired)
    # with regularisation images the captions carry the trigger where it belongs: the loader must not add it
    trigger = "" if run.plain_images else world.CONCEPTS[run.concept].trigger
    r = recipes.RECIPES[run.recipe]
    with torch.inference_mode():
        data, report = KleinDatasetLoader.execute(name, trigger, run.px, models.vae, models.clip,
                                                  control_folder=control.name if control else "",
                                                  use_cache=False).args
        preset, switches = (("custom", [g in run.groups for g in GROUPS]) if run.groups
                            else (r.target_preset, [True] * len(GROUPS)))
        targets = KleinBlockTargetSelector.execute(base_model, preset, *switches, "attention", "both").args[0]
        t0 = time.perf_counter()
        knobs = ADAPTER_RUNS.get(run.adapter, {})
        recipe = {"recipe": "custom", "rank": run.rank, "alpha": run.alpha,
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
    from ..trainer.evaluation import sampling as sp
    from . import world

    prompts, scenes = [], []
    for i, s in enumerate(world.heldout_scenes(seed + 1000, n)):
        t = world.with_concept(s, concept)
        prompts += [sp.SuitePrompt(f"{i} + trigger", str(i), world.caption(t), True),
                    sp.SuitePrompt(f"{i}, no trigger", str(i), world.caption(s), False)]
        scenes += [t, s]
    return prompts, scenes


def settings_for(run: Run, sample_steps: int):
    from ..trainer.evaluation import sampling as sp

    return sp.SampleSettings(steps=sample_steps, cfg=sp.BASE_CFG, seed=run.seed, width=run.px, height=run.px)


def score_concept_columns(columns, prompts, scenes, concept: str) -> list[dict]:
    """Ground truth per column (base first): the reader on every decoded sample."""
    from ..trainer.evaluation import sampling as sp
    from . import scoring

    rows = []
    for col in columns:
        images = [sp.to_pil(im) for im in col.images]
        trig = [(s, im) for s, im, p in zip(scenes, images, prompts, strict=True) if p.triggered]
        untrig = [(s, im) for s, im, p in zip(scenes, images, prompts, strict=True) if not p.triggered]
        rows.append({"label": col.label, "step": col.step, **scoring.score_concept(concept, trig, untrig).as_dict()})
    return rows


def pack_metrics(columns, prompts, dataset) -> list[dict]:
    """The pack's own latent metrics on the same samples (what its monitor would report), per checkpoint."""
    from ..trainer.evaluation import metrics as mt

    scores = mt.suite_metrics(columns, prompts, dataset.latents)
    pick, reason = mt.recommend(scores)
    return [{"label": m.label, "step": m.step, "strength": m.concept_strength, "leakage": m.trigger_leakage,
             "flexibility": m.prompt_flexibility, "token_strength": m.token_strength, "token_leakage": m.token_leakage,
             "flags": m.flags, "recommended": m is pick} for m in scores]


def concept_grid(columns, prompts, title: str):
    """The first GRID_ROWS held-out prompts, triggered and not: rows = prompts, columns = base + checkpoints."""
    from ..trainer.evaluation import sampling as sp

    keep = list(range(min(2 * GRID_ROWS, len(prompts))))
    cells = [[sp.to_pil(col.images[i]) for col in columns] for i in keep]
    return sp.grid_image(cells, [prompts[i].text for i in keep], [c.label for c in columns], title)


def evaluate_concept(models: Models, run: Run, base_model, data, checkpoints, prompts_n: int, sample_steps: int):
    """Sample base + every checkpoint on held-out prompts; ground truth and the pack's metrics per column."""
    from ..trainer.evaluation import sampling as sp

    prompts, scenes = concept_suite(run.concept, prompts_n, run.seed)
    with torch_inference():
        columns = sp.sample_checkpoints(base_model, models.clip, models.vae, checkpoints, prompts,
                                        settings_for(run, sample_steps))
    truth = score_concept_columns(columns, prompts, scenes, run.concept)
    return truth, pack_metrics(columns, prompts, data), concept_grid(columns, prompts, f"{run.recipe}: held-out prompts")


def evaluate_strengths(models: Models, run: Run, base_model, lora: Path, strengths, prompts_n: int,
                       sample_steps: int) -> list[dict]:
    """One LoRA file at each strength (as the Strength Sweep node and Load LoRA apply it) on the held-out suite:
    ground truth per strength, the base first (issue 18 item 3: is alpha/rank, or the load strength, the strength?)."""
    prompts, scenes = concept_suite(run.concept, prompts_n, run.seed)
    columns = strength_columns(models, run, base_model, lora, strengths, prompts, sample_steps)
    applied = [0.0, *strengths]
    return [{**row, "strength_applied": s}
            for row, s in zip(score_concept_columns(columns, prompts, scenes, run.concept), applied, strict=True)]


def strength_columns(models: Models, run: Run, base_model, lora: Path, strengths, prompts, sample_steps: int) -> list:
    """The base model's column, then the LoRA's at each strength (sampling.sample_checkpoints' own strength)."""
    from ..trainer.evaluation import sampling as sp

    columns = []
    with torch_inference():
        for i, strength in enumerate(strengths):
            columns += sp.sample_checkpoints(base_model, models.clip, models.vae, [lora], prompts,
                                             settings_for(run, sample_steps), include_base=i == 0, strength=strength)
    return columns


def torch_inference():
    import torch

    return torch.inference_mode()


def edit_conditioning(clip, text: str, reference):
    """The stock edit graph's conditioning: CLIPTextEncode -> ReferenceLatent(reference)."""
    from comfy_extras.nodes_edit_model import ReferenceLatent

    cond = clip.encode_from_tokens_scheduled(clip.tokenize(text))
    return ReferenceLatent.execute(cond, {"samples": reference[None]}).result[0]


def edit_samples(model, models: Models, references, settings) -> list:
    """One sample per reference latent (positive and empty negative both carry the reference), decoded."""
    from ..trainer.evaluation import sampling as sp
    from . import world

    latents = []
    for ref in references:
        pos = edit_conditioning(models.clip, world.TRANSFORM_CAPTION, ref)
        neg = edit_conditioning(models.clip, "", ref)
        latents += sp.sample_latents(model, [pos], neg, settings)
    return [sp.to_pil(im) for im in sp.decode(models.vae, latents)]


def evaluate_transform(models: Models, run: Run, base_model, data, checkpoints, prompts_n: int, sample_steps: int):
    """Held-out references through the edit graph, per checkpoint: transform error vs the baselines."""
    import comfy.sd

    from ..trainer.evaluation import sampling as sp
    from . import scoring, world

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
    for k, truth_key in (("token_strength", "strength"), ("token_leakage", "leakage")):  # the token metric (session 8)
        if all(p.get(k) is not None for p in pack):
            out[k] = spearman([p[k] for p in pack], [g[truth_key] for g in gt])
    quality = [truth_quality(g) for g in gt]
    order = sorted(range(len(gt)), key=lambda i: -quality[i])
    pick = next((i for i, p in enumerate(pack) if p["recommended"]), None)
    out["recommended"] = pack[pick]["label"] if pick is not None else None
    out["recommended_truth_rank"] = order.index(pick) + 1 if pick is not None else None
    out["truth_best"] = [gt[i]["label"] for i in order[:2]]
    return out
