"""Know when to stop: per-checkpoint numbers from the prompt-suite samples, and a recommendation.

All sample metrics compare a checkpoint's samples with the base model's samples of the same prompts
and seed (the grid's first column), so 0 means "as the base model" whatever the model or resolution:

- concept strength: how far the triggered samples have moved from the base model's toward the
  dataset. Each latent is summarised by its per-channel mean and standard deviation (the VAE latent's
  "colour and texture" statistics, independent of composition); the distance d to the dataset's
  average statistics gives strength = 1 - d(checkpoint) / d(base): 0 = no concept, 1 = the dataset's
  statistics exactly. (With a CLIP_VISION model the same ratio is also computed on image embeddings.)
- trigger leakage: the same ratio for the untriggered prompts: how far samples WITHOUT the trigger
  drift toward the dataset. A LoRA should leave them like the base model's (leakage near 0).
- prompt flexibility: the mean pairwise distance between the triggered samples of different prompts,
  divided by the base model's. 1 = prompts still change the image as much as before; toward 0 =
  every prompt gives the same (the dataset's) image, the classic overfit.
- validation loss by timestep band: the trainer's own objective (velocity MSE, trainer/training/objective.py) on
  held-out latents, with fixed noises and fixed sigmas per band (low 0.1-0.3: fine detail, mid 0.4-0.6,
  high 0.7-0.9: composition), so numbers are comparable across checkpoints and runs.

- token strength / leakage: how many of the samples' latent tokens are new (near the dataset's tokens, far from the
  base model's), over the dataset's own share (`token_novelty`).

`recommend` picks the checkpoint with the highest strength (`strength_of`: the token strength where it is measured,
else the channel statistic) among those that are not flagged (flexibility below FLEX_MIN of the base model's, or
leakage above LEAK_MAX), and says why in words.
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

FLEX_MIN = 0.5  # below half the base model's prompt-to-prompt variety: prompts have stopped mattering
LEAK_MAX = 0.5  # untriggered samples halfway to the dataset: the concept shows without its trigger
NEAR_PEAK = 0.9  # a checkpoint within 90% of the best strength counts as the peak (earlier is safer)
BANDS: dict[str, tuple[float, ...]] = {"low": (0.1, 0.2, 0.3), "mid": (0.4, 0.5, 0.6), "high": (0.7, 0.8, 0.9)}


def latent_stats(latent: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and std of one latent (C, h, w): a (2C,) vector."""
    flat = latent.float().flatten(1)
    return torch.cat([flat.mean(1), flat.std(1, unbiased=False)])


def stats_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """RMS difference of two statistics vectors (same scale for any channel count)."""
    return float((a - b).pow(2).mean().sqrt())


def layout(latent: torch.Tensor, cells: int = 4) -> torch.Tensor:
    """Coarse composition: the latent average-pooled to cells x cells, flattened."""
    return torch.nn.functional.adaptive_avg_pool2d(latent.float()[None], cells).flatten()


def sample_features(latent: torch.Tensor) -> torch.Tensor:
    """What distinguishes two samples: channel statistics plus coarse layout."""
    return torch.cat([latent_stats(latent), layout(latent)])


def dataset_reference(dataset_latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """The dataset's average latent statistics."""
    if not dataset_latents:
        raise ValueError("the dataset has no latents: connect a Klein Dataset Loader with at least one image.")
    return torch.stack([latent_stats(x) for x in dataset_latents]).mean(0)


def mean_distance(latents: Sequence[torch.Tensor], reference: torch.Tensor) -> float:
    return sum(stats_distance(latent_stats(x), reference) for x in latents) / max(1, len(latents))


def pairwise_spread(latents: Sequence[torch.Tensor]) -> float:
    """Mean pairwise RMS distance between the samples' features (0 = all the same image)."""
    feats = [sample_features(x) for x in latents]
    pairs = [stats_distance(feats[i], feats[j]) for i in range(len(feats)) for j in range(i + 1, len(feats))]
    return sum(pairs) / len(pairs) if pairs else 0.0


BANK_TOKENS = 8192  # latent tokens kept per bank (evenly strided): bounds the nearest-neighbour search at 1024²
SAMPLE_TOKENS = 1024  # tokens of one sample compared with the banks


def _tokens(latent: torch.Tensor, keep: int) -> torch.Tensor:
    """The latent's tokens (h*w, C), evenly strided down to at most `keep`."""
    t = latent.float().flatten(1).T
    return t[:: max(1, -(-len(t) // keep))]


def token_bank(latents: Sequence[torch.Tensor], keep: int = BANK_TOKENS) -> torch.Tensor:
    """Every token of the latents, (N, C), evenly strided down to at most `keep`."""
    bank = torch.cat([_tokens(x, 1 << 30) for x in latents])
    return bank[:: max(1, -(-len(bank) // keep))]


def _nearest(tokens: torch.Tensor, bank: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.cdist(c, bank).min(1).values for c in tokens.split(256)])


def token_novelty(latents: Sequence[torch.Tensor], dataset_bank: torch.Tensor, base_bank: torch.Tensor) -> float:
    """How much of the samples is made of the dataset's own tokens that the base model never drew.

    Per token: its distance to the nearest base-model token minus its distance to the nearest dataset token,
    floored at 0, averaged over the sample's tokens, then over the samples. A base sample scores 0 (its tokens are
    in the base bank); a token that moved somewhere new but not toward the dataset (damage) scores ~0; a region that
    now looks like the dataset's (a concept drawn in part of the picture, or a look over all of it) scores its
    distance from the base. Paired by prompt through the base bank, so it reads local concepts that the
    whole-latent statistics of concept_strength average away.
    """
    if not latents:
        return 0.0
    per = [(_nearest(t, base_bank) - _nearest(t, dataset_bank)).clamp_min(0).mean()
           for t in (_tokens(x, SAMPLE_TOKENS) for x in latents)]
    return float(torch.stack(per).mean())


def toward(d_now: float, d_base: float) -> float:
    """1 - d_now / d_base: 0 = as far as the base model, 1 = reached the reference, < 0 = moved away."""
    return 1.0 - d_now / d_base if d_base > 1e-12 else 0.0


def embedding_strength(triggered: torch.Tensor, base_triggered: torch.Tensor, reference: torch.Tensor) -> float:
    """The concept-strength ratio on image embeddings (e.g. CLIP vision), cosine distance to the dataset mean."""
    ref = torch.nn.functional.normalize(reference.float().mean(0), dim=0)

    def dist(x: torch.Tensor) -> float:
        return float((1 - torch.nn.functional.normalize(x.float(), dim=-1) @ ref).mean())

    return toward(dist(triggered), dist(base_triggered))


@dataclass
class CheckpointMetrics:
    label: str
    step: int | None
    path: str | None
    concept_strength: float | None = None
    trigger_leakage: float | None = None
    prompt_flexibility: float | None = None
    clip_concept_strength: float | None = None
    token_strength: float | None = None  # token_novelty of the triggered samples / the dataset's own
    token_leakage: float | None = None  # the same for the untriggered samples
    validation_loss: dict[str, float] = field(default_factory=dict)
    flags: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def f(v):
            return "n/a" if v is None else f"{v:.2f}"
        loss = ", ".join(f"{k} {v:.4f}" for k, v in self.validation_loss.items())
        text = (f"{self.label}: strength {f(self.concept_strength)}, leakage {f(self.trigger_leakage)}, "
                f"flexibility {f(self.prompt_flexibility)}")
        if self.clip_concept_strength is not None:
            text += f", CLIP strength {f(self.clip_concept_strength)}"
        if self.token_strength is not None:
            text += f", token strength {f(self.token_strength)} / leakage {f(self.token_leakage)}"
        if loss:
            text += f", val loss {loss}"
        if self.flags:
            text += "  [" + "; ".join(self.flags) + "]"
        return text


def strength_of(m: CheckpointMetrics) -> float | None:
    """The strength that `recommend` and the stop rule rank checkpoints by: the token strength where it is measured,
    else the channel statistic. Chosen on the micro world's ground truth (docs/evaluation.md): over 10 runs of 3-8
    checkpoints, the pick by token strength was among the two best checkpoints in 8, the pick by the channel
    statistic in 4 (its rank correlation with the true strength went as low as -0.80, character recipe)."""
    for v in (m.token_strength, m.concept_strength):
        if v is not None and math.isfinite(v):
            return v
    return None


def suite_metrics(columns: Sequence, prompts: Sequence, dataset_latents: Sequence[torch.Tensor] | None,
                  clip_embeds: Sequence[torch.Tensor] | None = None,
                  dataset_embeds: torch.Tensor | None = None) -> list[CheckpointMetrics]:
    """Metrics for every column after the first; the first column must be the base model's samples.

    `columns` are trainer.evaluation.sampling.Column (latents in suite order); `prompts` the suite. Without a dataset
    the concept strength and leakage are left out (None); flexibility needs only the base column.
    `clip_embeds[i]` (optional) are the image embeddings of column i's samples.
    """
    if not columns:
        return []
    trig = [i for i, p in enumerate(prompts) if p.triggered]
    untrig = [i for i, p in enumerate(prompts) if not p.triggered]
    base = columns[0]
    ref = dataset_reference(dataset_latents) if dataset_latents else None

    def pick(col, idx):
        return [col.latents[i] for i in idx]

    base_spread = pairwise_spread(pick(base, trig))
    if ref is not None:  # the token metric's banks and scale, once per suite
        dataset_bank, base_bank = token_bank(dataset_latents), token_bank(base.latents)
        dataset_novelty = token_novelty(dataset_latents, dataset_bank, base_bank)
    out = []
    for ci, col in enumerate(columns[1:], start=1):
        m = CheckpointMetrics(col.label, col.step, col.path)
        if ref is not None and trig:
            m.concept_strength = toward(mean_distance(pick(col, trig), ref), mean_distance(pick(base, trig), ref))
        if ref is not None and untrig:
            m.trigger_leakage = toward(mean_distance(pick(col, untrig), ref), mean_distance(pick(base, untrig), ref))
        if ref is not None and dataset_novelty > 1e-12:
            m.token_strength = token_novelty(pick(col, trig), dataset_bank, base_bank) / dataset_novelty if trig else None
            m.token_leakage = token_novelty(pick(col, untrig), dataset_bank, base_bank) / dataset_novelty if untrig else None
        if len(trig) > 1 and base_spread > 1e-12:
            m.prompt_flexibility = pairwise_spread(pick(col, trig)) / base_spread
        if clip_embeds is not None and dataset_embeds is not None and trig:
            m.clip_concept_strength = embedding_strength(clip_embeds[ci][trig], clip_embeds[0][trig], dataset_embeds)
        out.append(m)
    return out


@torch.no_grad()
def validation_loss(patcher, latents: Sequence[torch.Tensor], contexts: Sequence[torch.Tensor], seed: int = 0,
                    bands: dict[str, tuple[float, ...]] | None = None) -> dict[str, float]:
    """Velocity MSE per timestep band on fixed noises and sigmas, with the trainer's objective.

    `patcher` is a ComfyUI MODEL (with a LoRA from load_lora_for_models, or the trainer's live model);
    it is loaded the way ComfyUI loads a model to sample, so its patches are in the weights, and its
    diffusion_model is called as trainer/training/loop.py train_step calls it. The noise for image i is drawn from
    `seed + i`, so every checkpoint sees the same noisy inputs.
    """
    import comfy.model_management as mm

    from ..training import objective

    if not latents:
        raise ValueError("validation needs at least one held-out latent: connect a dataset with images.")
    bands = bands or BANDS
    mm.load_models_gpu([patcher])
    model = patcher.model
    dm = model.diffusion_model
    device, dtype = patcher.load_device, model.get_dtype()
    out = {}
    for band, sigmas in bands.items():
        total, n = 0.0, 0
        for i, (x0, ctx) in enumerate(zip(latents, contexts, strict=True)):
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + i))[None]
            for s in sigmas:
                sigma = torch.tensor([s], dtype=torch.float32)
                xt, target = objective.noisy_input(x0[None].float(), noise, sigma)
                timestep = model.model_sampling.timestep(sigma.to(device)).float()
                pred = dm(xt.to(device, dtype), timestep, ctx[None].to(device, dtype))
                total += float(objective.flow_loss(pred, target.to(device)))
                n += 1
        out[band] = total / n
    out["mean"] = sum(out[b] for b in bands) / len(bands)
    return out


def flag(metrics: Sequence[CheckpointMetrics], flex_min: float = FLEX_MIN, leak_max: float = LEAK_MAX) -> None:
    """Mark each checkpoint whose prompts stopped mattering or whose concept shows without the trigger."""
    for m in metrics:
        m.flags = []
        if m.prompt_flexibility is not None and m.prompt_flexibility < flex_min:
            m.flags.append(f"flexibility collapsed ({m.prompt_flexibility:.2f} of the base model's prompt variety, "
                           f"limit {flex_min:.2f})")
        if m.trigger_leakage is not None and m.trigger_leakage > leak_max:
            m.flags.append(f"trigger leakage ({m.trigger_leakage:.2f} of the way to the dataset without the trigger, "
                           f"limit {leak_max:.2f})")


def _order(metrics: Sequence[CheckpointMetrics]) -> list[CheckpointMetrics]:
    return sorted(metrics, key=lambda m: (m.step is None, m.step if m.step is not None else 0))


def recommend(metrics: Sequence[CheckpointMetrics], flex_min: float = FLEX_MIN,
              leak_max: float = LEAK_MAX) -> tuple[CheckpointMetrics | None, str]:
    """(the checkpoint to use, why in words): the peak of concept strength before flexibility collapses
    or leakage rises.

    Checkpoints are taken in step order. Training past the first flagged checkpoint only deepens the
    overfit, so the candidates are the checkpoints before it; among them the earliest within NEAR_PEAK
    of the best strength wins (the same concept with more flexibility left).
    """
    ordered = _order(metrics)
    if not ordered:
        return None, "no checkpoints to judge."
    flag(ordered, flex_min, leak_max)
    first_bad = next((i for i, m in enumerate(ordered) if m.flags), None)
    candidates = ordered if first_bad is None else ordered[:first_bad]
    if not candidates:
        m = ordered[0]
        return m, (f"every checkpoint is flagged, from the first ({m.label}: {'; '.join(m.flags)}); {m.label} is the "
                   "least trained. Train again with fewer steps, a lower learning rate or save checkpoints earlier.")
    measured = [(s, m) for m in candidates if (s := strength_of(m)) is not None]
    if measured:
        best = max(s for s, _ in measured)
        near = best - (1 - NEAR_PEAK) * abs(best)  # not NEAR_PEAK * best: that is above best when best is negative
        value, pick = next((s, m) for s, m in measured if s >= near - 1e-9)
        kind = "token strength" if pick.token_strength is not None else "concept strength"
        why = f"{pick.label} has {kind} {value:.2f} (best before any warning: {best:.2f})"
    else:
        pick = candidates[-1]
        why = f"{pick.label} is the last checkpoint before any warning (no dataset given: concept strength not measured)"
    if pick.prompt_flexibility is not None:
        why += f", prompt flexibility {pick.prompt_flexibility:.2f}"
    if pick.trigger_leakage is not None:
        why += f", trigger leakage {pick.trigger_leakage:.2f}"
    if first_bad is not None:
        bad = ordered[first_bad]
        why += f". From {bad.label} on: {'; '.join(bad.flags)}: training past {pick.label} overfits."
    else:
        why += ". No checkpoint is flagged: the concept may still grow with more steps."
    return pick, why


def report_path(lora_path: Path) -> Path:
    """Where the report goes: next to the run's final LoRA (`<run>_eval.json`), also for a checkpoint
    inside `<run>_checkpoints/`."""
    from ..training.run_files import run_of_checkpoints_dir

    p = Path(lora_path)
    if (run := run_of_checkpoints_dir(p.parent)) is not None:
        return p.parent.parent / f"{run}_eval.json"
    return p.with_name(f"{p.stem}_eval.json")


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_clean(x) for x in v]
    return v


def build_report(metrics: Sequence[CheckpointMetrics], pick: CheckpointMetrics | None, reason: str,
                 settings: dict | None = None, prompts: Sequence | None = None) -> dict:
    return _clean({
        "recommended": {"label": pick.label, "step": pick.step, "path": pick.path} if pick else None,
        "reason": reason,
        "thresholds": {"flexibility_min": FLEX_MIN, "leakage_max": LEAK_MAX, "near_peak": NEAR_PEAK},
        "sampling": settings or {},
        "prompts": [{"label": p.label, "text": p.text, "triggered": p.triggered} for p in prompts or []],
        "checkpoints": [asdict(m) for m in _order(metrics)],
    })


def write_report(report: dict, path: Path) -> Path:
    """Atomically write the JSON report (a reader never sees half a file)."""
    from ..paths import atomic_write_text

    return atomic_write_text(json.dumps(report, indent=2), Path(path))


def metrics_text(metrics: Sequence[CheckpointMetrics], reason: str) -> str:
    return "\n".join([*(m.summary() for m in _order(metrics)), "", f"Recommended: {reason}"])
