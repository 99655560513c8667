"""Judging a list of LoRA checkpoints after training: sample the suite from each, score them, recommend one.

The Klein Checkpoint Sampler node's whole pipeline: the fixed-seed samples of the base model and every
checkpoint, the metrics (concept strength, leakage, flexibility, optionally image-embedding strength and a
validation loss), the report beside the run, and the labelled grid (with the distilled klein's columns
when one is given).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from . import metrics as mt
from . import sampling as sp

EVAL_FOLDER = "klein_lora_eval"  # in ComfyUI's output folder: reports of LoRAs that live outside its folders


@dataclass
class CheckpointEvaluation:
    grid: object  # IMAGE tensor (1, H, W, 3)
    text: str  # per-checkpoint metrics, the recommendation in words and the report's path
    recommended: str  # path of the recommended checkpoint, "" when none stands out
    report: Path


@dataclass
class Judges:
    """What the metrics may use beyond the samples: the training set, held-out images, a CLIP vision model."""

    dataset: object = None
    holdout: object = None
    clip_vision: object = None


def evaluate_checkpoints(model, clip, vae, files: Sequence[Path], suite: Sequence[sp.SuitePrompt],
                         settings: sp.SampleSettings, judges: Judges, title: str, preview: bool = False,
                         distilled_model=None,
                         progress: Callable[[int, int], None] | None = None) -> CheckpointEvaluation:
    """Sample, score, recommend and report; the grid's columns are the base then `files` in order."""
    columns = sp.sample_checkpoints(model, clip, vae, files, suite, settings, progress=progress)
    results = _scores(model, vae, files, columns, suite, judges, settings.seed)
    pick, reason = mt.recommend(results)
    if judges.holdout is None and judges.dataset is not None:
        reason += " (Validation loss is on the training images: connect 'holdout' for a held-out loss.)"
    text = mt.metrics_text(results, reason)
    report = mt.build_report(results, pick, reason, {**settings.__dict__, "preview": preview}, suite)
    written = mt.write_report(report, report_path(files[-1]))
    logging.info("Klein eval: %s", reason)
    if distilled_model is not None:
        sp.check_same_size(model, distilled_model)
        columns = columns + sp.distilled_columns(distilled_model, clip, vae, files, suite, settings)
        title += f" | distilled: {sp.DISTILLED_STEPS} steps, CFG {sp.DISTILLED_CFG:g}"
    grid = sp.to_image_tensor(sp.columns_grid(columns, suite, title))
    return CheckpointEvaluation(grid, f"{text}\nReport: {written}", pick.path if pick and pick.path else "", written)


def report_path(lora: Path) -> Path:
    """`<run>_eval.json` beside the run when that lies inside ComfyUI's models, loras or output folders once
    links are resolved; for a LoRA linked in from elsewhere, the same name in output/klein_lora_eval."""
    import folder_paths

    output = Path(folder_paths.get_output_directory())
    roots = [Path(folder_paths.models_dir), output, *map(Path, folder_paths.get_folder_paths("loras"))]
    return sp.report_path_within(mt.report_path(lora), roots, output / EVAL_FOLDER)


def _scores(model, vae, files: Sequence[Path], columns, suite, judges: Judges, seed: int) -> list:
    """The suite metrics of every column, with the image-embedding strength and validation loss when possible."""
    import comfy.sd

    dataset = judges.dataset
    embeds = data_embeds = None
    if judges.clip_vision is not None and dataset is not None:
        embeds = [judges.clip_vision.encode_image(c.images).image_embeds.float().cpu() for c in columns]
        data_embeds = judges.clip_vision.encode_image(sp.decode(vae, dataset.latents)).image_embeds.float().cpu()
    results = mt.suite_metrics(columns, suite, dataset.latents if dataset is not None else None, embeds, data_embeds)
    val = judges.holdout if judges.holdout is not None else dataset
    if val is not None:
        for m, path in zip(results, files, strict=True):
            sd, _ = sp.read_lora(path)
            patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
            m.validation_loss = mt.validation_loss(patched, val.latents, val.contexts, seed)
    return results
