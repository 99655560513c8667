"""Watching a run: sample the prompt suite at every checkpoint, judge it, recommend where to stop.

The workshop's lesson is "validate with prompts, not just loss": the trainer samples the suite with
the live model (the LoRA as trained so far) at each checkpoint, writes a labelled grid per checkpoint
to ComfyUI's output folder, and at the end scores every checkpoint (trainer/evaluation/metrics.py) and writes the
recommendation next to the LoRA.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, fields
from pathlib import Path

from . import early_stop
from . import metrics as mt
from . import sampling as sp

HISTORY_FORMAT = "klein-lora-monitor"


class TrainingMonitor:
    """`before(model)` once, then use as TrainHooks.on_checkpoint, then `finish(lora_path)`.

    Each checkpoint is judged when it is sampled (`history`: its metrics against the base model's samples,
    the same numbers `finish` reports). With `patience` > 0 (stop at the peak) the history is also kept in
    the run's `<run>_monitor.json`, so a resumed run decides from the whole run's history (`begin`).
    """

    def __init__(self, clip, vae, dataset, seed: int, sample_steps: int, samples_dir: Path,
                 cfg: float = sp.BASE_CFG, patience: int = 0):
        settings = sp.SampleSettings(steps=sample_steps, cfg=cfg, seed=seed, width=dataset.resolution,
                                     height=dataset.resolution)
        self.sampler = sp.LiveSampler(clip, vae, sp.prompt_suite(dataset.trigger), settings)
        self.dataset, self.samples_dir = dataset, Path(samples_dir)
        self.base: sp.Column | None = None
        self.grids: list[Path] = []
        self.history: list[mt.CheckpointMetrics] = []
        self.patience, self.history_file = patience, None

    def before(self, base_model) -> None:
        """The base model's samples: every metric is relative to them."""
        self.base = self.sampler.base_column(base_model)

    def begin(self, first_step: int, history_file: Path) -> None:
        """The run starts at `first_step` (> 1: resumed); with stop-at-peak on, its earlier history is read back."""
        if not self.patience:
            return
        self.history_file = Path(history_file)
        self.history = [m for m in self._read_history() if m.step is not None and m.step < first_step]
        if first_step > 1:
            logging.info("Klein LoRA monitor: resumed with %d judged checkpoints from %s", len(self.history),
                         self.history_file.name)

    def _read_history(self) -> list[mt.CheckpointMetrics]:
        if self.history_file is None or not self.history_file.is_file():
            return []
        try:
            data = json.loads(self.history_file.read_text())
            if data.get("format") != HISTORY_FORMAT or data.get("sampling") != asdict(self.sampler.settings):
                logging.warning("Klein LoRA monitor: %s was judged with other sample settings; the stop rule starts "
                                "afresh from this run's checkpoints.", self.history_file.name)
                return []
            names = {f.name for f in fields(mt.CheckpointMetrics)}
            return [mt.CheckpointMetrics(**{k: v for k, v in m.items() if k in names}) for m in data["checkpoints"]]
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            logging.warning("Klein LoRA monitor: %s is unreadable (%s); the stop rule starts afresh.",
                            self.history_file.name, e)
            return []

    def _write_history(self) -> None:
        from ..paths import atomic_write_text

        if self.history_file is not None:
            atomic_write_text(json.dumps(mt._clean({"format": HISTORY_FORMAT, "sampling": asdict(self.sampler.settings),
                                                    "checkpoints": [asdict(m) for m in self.history]}), indent=1),
                              self.history_file)

    def checkpoint_metrics(self, column: sp.Column) -> mt.CheckpointMetrics:
        """One sampled checkpoint's numbers against the base model's samples (metrics are per column)."""
        [m] = mt.suite_metrics([self.base, column], self.sampler.prompts, self.dataset.latents)
        return m

    def __call__(self, step: int, path: Path, live_model):
        """Sample with the live model and judge it; returns (grid image, file) for previews."""
        from ..paths import atomic_save_image

        self.sampler(step, path, live_model)
        column = self.sampler.columns[-1]
        columns = [self.base, column] if self.base else [column]
        if self.base is not None:
            self.history = [m for m in self.history if m.step is None or m.step < step]
            self.history.append(self.checkpoint_metrics(column))
            self._write_history()
        grid = sp.columns_grid(columns, self.sampler.prompts, f"{path.stem}: step {step}")
        out = atomic_save_image(grid, self.samples_dir / f"{path.stem}.png")
        self.grids.append(out)
        return grid, out

    def stop_check(self, step: int) -> early_stop.StopDecision | None:
        """After checkpoint `step` has been judged: stop here? (the rule of trainer/evaluation/early_stop.py)"""
        decision = early_stop.decide(self.history, self.patience)
        if decision is not None and decision.step == step:
            logging.info("Klein LoRA monitor: %s", decision.reason)
            return decision
        return None

    def finish(self, lora_path: Path, stopped: early_stop.StopDecision | None = None) -> tuple[str, Path | None, Path]:
        """Score every judged checkpoint; (text, recommended checkpoint, report file)."""
        if self.base is None or not self.history:
            return "no checkpoints were sampled", None, Path()
        scores = list(self.history)
        pick, reason = mt.recommend(scores)
        report = mt.build_report(scores, pick, reason, asdict(self.sampler.settings), self.sampler.prompts)
        if stopped is not None:
            report["stopped"] = stopped.to_dict()
        where = mt.write_report(report, mt.report_path(lora_path))
        logging.info("Klein LoRA monitor: %s (report %s)", reason, where)
        text = mt.metrics_text(scores, reason)
        if stopped is not None:
            text += f"\nStopped early: {stopped.reason}"
        return text, Path(pick.path) if pick and pick.path else None, where
