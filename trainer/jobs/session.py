"""One training run as the trainer node and the command line both run it.

A session wires what a run needs around the training loop: the monitor that samples the prompt suite at
every checkpoint (and its samples folder), where the run trains (in this process, or as a job on other
devices whose checkpoints are sampled here), and the evaluation text at the end. The callers differ only
in how they report (`Reporter`: ComfyUI's progress bar and websocket, or JSON lines) and where their
models come from.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..training.config import TrainConfig
from ..training.distributed import Ranks
from ..training.loop import TrainHooks, TrainResult, train_lora
from .events import EVENT_KEY, verdict_line

SAMPLES_FOLDER = "klein_lora_samples"  # in ComfyUI's output folder: one grid per checkpoint
NOT_SAMPLED = "connect clip and vae (and save_every > 0) to sample and judge the checkpoints"
NO_MONITOR = ("early_stop_patience {n} stops the run by the checkpoint samples' metrics, and this run samples none: "
              "connect clip and vae and set save_every above 0, or set early_stop_patience to 0.")


def _nothing(*_args) -> None:
    return None


@dataclass
class Reporter:
    """Where a session's progress goes. `samples` gets the checkpoint's grid image and the file it was saved to."""

    step: Callable[[int, int, float], None] = _nothing
    checkpoint: Callable[[int, Path], None] = _nothing
    samples: Callable[[int, object, Path], None] = _nothing
    job: Callable[[Path, list[str]], None] = _nothing
    check_cancel: Callable[[], None] = _nothing
    stopped: Callable[[object], None] = _nothing  # the StopDecision that ended the run at its peak
    begin: Callable[[int, object], None] = _nothing  # stop at the peak: (first step, the run's RunFiles)


@dataclass
class Sampling:
    """Sample the prompt suite at every checkpoint with this text encoder and VAE into `output_dir`/samples."""

    clip: object
    vae: object
    sample_steps: int
    output_dir: Path

    @property
    def samples_dir(self) -> Path:
        return Path(self.output_dir) / SAMPLES_FOLDER


@dataclass
class Job:
    """Train the exported run config `config` as a child process on `devices` (trainer/jobs/launch.py)."""

    config: Path
    devices: list[str]


@dataclass
class SessionResult:
    result: TrainResult
    evaluation: str  # per-checkpoint judgement and the recommendation, or what to connect to get one
    report: Path | None = None
    sampled: bool = False


def run_session(model, dataset, targets, cfg: TrainConfig, out_dir: Path, reporter: Reporter,
                sampling: Sampling | None = None, job: Job | None = None, ranks: Ranks | None = None,
                verdicts: Callable[[int], object] | None = None) -> SessionResult:
    """Train (here, or as `job`), sampling each checkpoint when `sampling` is given and the run saves checkpoints;
    rank 0 alone samples and reports checkpoints. With cfg.early_stop_patience the monitor's stop rule ends the
    run at its peak; `verdicts` (a job's child, which samples nothing) asks its parent for the rule's verdict."""
    ranks = ranks or Ranks()
    monitor = None
    if sampling is not None and cfg.save_every > 0 and ranks.is_main:
        from ..evaluation.monitor import TrainingMonitor

        monitor = TrainingMonitor(sampling.clip, sampling.vae, dataset, cfg.seed, sampling.sample_steps,
                                  sampling.samples_dir, patience=cfg.early_stop_patience)
        monitor.before(model)
    if cfg.early_stop_patience and ranks.is_main and monitor is None and verdicts is None:
        raise ValueError(NO_MONITOR.format(n=cfg.early_stop_patience))

    def on_checkpoint(step: int, path: Path, live_model) -> None:
        reporter.checkpoint(step, path)
        if monitor is not None:
            grid, file = monitor(step, path, live_model)
            reporter.samples(step, grid, file)

    def on_begin(first_step: int, files) -> None:
        reporter.begin(first_step, files)
        if monitor is not None:
            monitor.begin(first_step, files.monitor)

    stop_check = verdicts or (monitor.stop_check if monitor is not None else (lambda step: None))
    hooks = TrainHooks(on_step=reporter.step, on_checkpoint=on_checkpoint, check_cancel=reporter.check_cancel,
                       on_begin=on_begin, stop_check=stop_check)
    if job is not None:
        reporter.job(job.config, job.devices)
        result = run_job(job, model, hooks, stop_at_peak=cfg.early_stop_patience > 0)
    else:
        result = train_lora(model, dataset, targets, cfg, Path(out_dir), hooks, ranks)
    if result.stopped is not None:
        reporter.stopped(result.stopped)
    warning = _distilled_warning(model)
    if monitor is None:
        stopped = f"\nStopped early: {result.stopped.reason}" if result.stopped is not None else ""
        return SessionResult(result, warning + NOT_SAMPLED + stopped)
    text, _, report = monitor.finish(result.lora_path, result.stopped)
    return SessionResult(result, f"{warning}{text}\nreport: {report}", report, sampled=True)


def _distilled_warning(model) -> str:
    """A base named as the distilled klein (said at queue time too, nodes/queue_check.py) stays with the result."""
    from ..model import model_check
    from ..training.loop import base_model_file

    distilled = model_check.distilled_warning(base_model_file(model))
    if distilled is None:
        return ""
    logging.warning("Klein LoRA: %s", distilled)
    return f"WARNING: {distilled}\n"


def run_job(job: Job, model, hooks: TrainHooks, stop_at_peak: bool = False) -> TrainResult:
    """The exported run as a child process: its progress drives the same hooks as an in-process run.

    Checkpoints are sampled here, in ComfyUI, from the files the job writes (the MODEL with each checkpoint
    applied, with the caller's own clip and vae), so the job is told not to sample the config's suite as well.
    Stopping at the peak, the child waits after each checkpoint for this side's verdict (its stdin), so it stops
    at the checkpoint an in-process run stops at.
    """
    import comfy.sd

    from ..evaluation import early_stop
    from ..evaluation import sampling as sp
    from ..training.run_files import RunFiles
    from . import launch

    extra = ["--no-sampling", *(["--await-verdicts"] if stop_at_peak else [])]
    child = launch.Job(job.config, job.devices, extra, log_prefix=f"klein job {job.config.parent.name}",
                       verdicts=stop_at_peak)
    for event in child.events(hooks.check_cancel):
        kind = event[EVENT_KEY]
        if kind == "step":
            hooks.on_step(event["step"], event["total"], event["loss"])
        elif kind == "checkpoint":
            path = Path(event["path"])
            sd, _ = sp.read_lora(path)
            live, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
            hooks.on_checkpoint(event["step"], path, live)
        elif kind == "begin":
            hooks.on_begin(event["first_step"], RunFiles(Path(event["out_dir"]), event["run"]))
        elif kind == "await_verdict":
            decision = hooks.stop_check(event["step"])
            child.send(verdict_line(event["step"], decision))
    done = child.done
    lora_path = Path(done["lora_path"])
    lora, _ = sp.read_lora(lora_path)
    logging.info("Klein LoRA: job %s done", job.config.parent.name)
    stopped = early_stop.StopDecision.from_dict(done["stopped"]) if done.get("stopped") else None
    return TrainResult(lora, list(done["losses"]), lora_path, [Path(p) for p in done["checkpoints"]],
                       done["run"], float(done["seconds"]), stopped=stopped)
