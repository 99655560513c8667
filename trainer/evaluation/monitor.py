"""Watching a run: sample the prompt suite at every checkpoint, judge it, recommend where to stop.

The workshop's lesson is "validate with prompts, not just loss": the trainer samples the suite with
the live model (the LoRA as trained so far) at each checkpoint, writes a labelled grid per checkpoint
to ComfyUI's output folder, and at the end scores every checkpoint (trainer/evaluation/metrics.py) and writes the
recommendation next to the LoRA.
"""
from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from . import metrics as mt
from . import sampling as sp


class TrainingMonitor:
    """`before(model)` once, then use as TrainHooks.on_checkpoint, then `finish(lora_path)`."""

    def __init__(self, clip, vae, dataset, seed: int, sample_steps: int, samples_dir: Path,
                 cfg: float = sp.BASE_CFG):
        settings = sp.SampleSettings(steps=sample_steps, cfg=cfg, seed=seed, width=dataset.resolution,
                                     height=dataset.resolution)
        self.sampler = sp.LiveSampler(clip, vae, sp.prompt_suite(dataset.trigger), settings)
        self.dataset, self.samples_dir = dataset, Path(samples_dir)
        self.base: sp.Column | None = None
        self.grids: list[Path] = []

    def before(self, base_model) -> None:
        """The base model's samples: every metric is relative to them."""
        self.base = self.sampler.base_column(base_model)

    def __call__(self, step: int, path: Path, live_model):
        """Sample with the live model; returns (grid image, file) for previews."""
        from ..paths import atomic_save_image

        self.sampler(step, path, live_model)
        columns = [self.base, self.sampler.columns[-1]] if self.base else [self.sampler.columns[-1]]
        grid = sp.columns_grid(columns, self.sampler.prompts, f"{path.stem}: step {step}")
        out = atomic_save_image(grid, self.samples_dir / f"{path.stem}.png")
        self.grids.append(out)
        return grid, out

    def finish(self, lora_path: Path) -> tuple[str, Path | None, Path]:
        """Score every sampled checkpoint; (text, recommended checkpoint, report file)."""
        if self.base is None or not self.sampler.columns:
            return "no checkpoints were sampled", None, Path()
        scores = mt.suite_metrics([self.base, *self.sampler.columns], self.sampler.prompts, self.dataset.latents)
        pick, reason = mt.recommend(scores)
        report = mt.build_report(scores, pick, reason, asdict(self.sampler.settings), self.sampler.prompts)
        where = mt.write_report(report, mt.report_path(lora_path))
        logging.info("Klein LoRA monitor: %s (report %s)", reason, where)
        return mt.metrics_text(scores, reason), Path(pick.path) if pick and pick.path else None, where
