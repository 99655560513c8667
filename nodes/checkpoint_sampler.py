from __future__ import annotations

import os
from pathlib import Path

import comfy.utils
import folder_paths
from comfy_api.latest import io, ui

from ..trainer.evaluation import sampling as sp
from ..trainer.evaluation.checkpoints import Judges, evaluate_checkpoints
from .types import CATEGORY, KleinDataset

DEFAULT_PROMPTS = "\n".join(f"{label}: {text}" for label, text in sp.DEFAULT_SUBJECTS)


def _lora_roots() -> list[Path]:
    return [Path(os.path.realpath(p)) for p in folder_paths.get_folder_paths("loras")]


def resolve_checkpoints(text: str) -> list[Path]:
    """Checkpoint lines (absolute paths from the trainer, or names in the loras folder) as existing files
    inside ComfyUI's loras folders."""
    roots = _lora_roots()
    found = []
    for n, line in enumerate((ln.strip() for ln in (text or "").splitlines()), start=1):
        if not line:
            continue
        raw = Path(os.path.expanduser(line))
        if raw.is_absolute():
            real = Path(os.path.realpath(raw))
            if not any(os.path.commonpath([str(real), str(r)]) == str(r) for r in roots):
                raise ValueError(f"checkpoints line {n} '{line}' is outside ComfyUI's loras folders "
                                 f"{[str(r) for r in roots]}: pick a file there (the trainer saves its checkpoints there).")
        else:
            full = folder_paths.get_full_path("loras", line)
            real = Path(os.path.realpath(full)) if full else None
        if real is None or not real.is_file():
            raise ValueError(f"checkpoints line {n} '{line}' is not a file: give one path per line (the trainer's "
                             "'checkpoints' output) or a LoRA name from models/loras.")
        found.append(real)
    if not found:
        raise ValueError("checkpoints is empty: connect the trainer's 'checkpoints' output or list LoRA files, one per line.")
    return found


class KleinCheckpointSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinCheckpointSampler",
            display_name="Klein Checkpoint Sampler",
            category=CATEGORY,
            is_output_node=True,
            description="Samples a prompt suite (with and without the trigger) from the base model and every LoRA "
                        "checkpoint with fixed seeds, returns a labelled grid (rows prompts, columns checkpoints), "
                        "per-checkpoint metrics and the recommended checkpoint; writes a JSON report next to the LoRA.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.2 [klein] Base model the LoRAs were trained on (no LoRA applied)."),
                io.Clip.Input("clip", tooltip="klein's text encoder (Qwen3), to encode the prompt suite."),
                io.Vae.Input("vae", tooltip="The FLUX.2 VAE, to decode the samples."),
                io.String.Input("checkpoints", multiline=True, default="",
                                tooltip="LoRA files, one per line: the trainer's 'checkpoints' output (add its lora_path "
                                        "for the final LoRA), or names from models/loras. Columns follow this order."),
                io.String.Input("trigger", default="kln_concept",
                                tooltip="The trigger word; each prompt is sampled with it (concept) and without it (leakage)."),
                io.String.Input("prompts", multiline=True, default=DEFAULT_PROMPTS,
                                tooltip="Subjects, one per line as 'label: prompt'. Empty: woman portrait, mountain "
                                        "landscape, man portrait, one other subject."),
                io.Int.Input("steps", default=sp.BASE_STEPS, min=1, max=200,
                             tooltip="Sampling steps (klein Base: 50) on FLUX.2's resolution-dependent schedule."),
                io.Float.Input("cfg", default=sp.BASE_CFG, min=0.0, max=30.0, step=0.1, advanced=True,
                               tooltip="CFG scale with an empty negative (klein Base: 4.0)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="One noise seed for every cell, so cells differ only by prompt and checkpoint."),
                io.Boolean.Input("preview", default=False,
                                 tooltip="Quick look: sample with preview_steps instead of steps."),
                io.Int.Input("preview_steps", default=sp.PREVIEW_STEPS, min=1, max=50, advanced=True,
                             tooltip="Steps when preview is on."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=16,
                             tooltip="Square sample size in pixels (a multiple of 16)."),
                KleinDataset.Input("dataset", optional=True,
                                   tooltip="The training dataset (Klein Dataset Loader): enables concept strength, leakage "
                                           "and the validation loss by timestep band."),
                KleinDataset.Input("holdout", optional=True,
                                   tooltip="Held-out images (a second Klein Dataset Loader) for the validation loss; "
                                           "without it the loss is measured on the training dataset."),
                io.ClipVision.Input("clip_vision", optional=True, advanced=True,
                                    tooltip="Optional CLIP vision model: adds concept strength measured on image embeddings."),
                io.Model.Input("distilled_model", optional=True, advanced=True,
                               tooltip="The distilled klein of the same size, if you generate with it: each checkpoint "
                                       "is also shown on it (4 steps, CFG 1) beside Base. Metrics stay on Base."),
                io.String.Input("run", optional=True, force_input=True,
                                tooltip="A trainer's `checkpoints` output; its files are added to the list above."),
            ],
            outputs=[
                io.Image.Output(display_name="grid", tooltip="Rows prompts, columns base model then checkpoints."),
                io.String.Output(display_name="metrics", tooltip="Per-checkpoint metrics and the recommendation in words."),
                io.String.Output(display_name="recommended", tooltip="Path of the recommended checkpoint."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, clip, vae, checkpoints: str, trigger: str, prompts: str, steps: int, cfg: float, seed: int,
                preview: bool, preview_steps: int, resolution: int, dataset=None, holdout=None,
                clip_vision=None, distilled_model=None, run: str = "") -> io.NodeOutput:
        files = resolve_checkpoints("\n".join(s for s in (checkpoints, run) if s))
        suite = sp.prompt_suite(trigger.strip(), sp.parse_subjects(prompts))
        settings = sp.SampleSettings(preview_steps if preview else steps, cfg, seed, resolution, resolution)
        pbar = comfy.utils.ProgressBar((len(files) + 1) * len(suite))
        title = f"{trigger} - {settings.steps} steps, CFG {cfg:g}, seed {seed}" + (" (preview)" if preview else "")
        out = evaluate_checkpoints(model, clip, vae, files, suite, settings, Judges(dataset, holdout, clip_vision),
                                   title, preview, distilled_model,
                                   progress=lambda done, total: pbar.update_absolute(done, total))
        ui_out = {**ui.PreviewImage(out.grid, cls=cls).as_dict(), "text": (out.text,)}
        return io.NodeOutput(out.grid, out.text, out.recommended, ui=ui_out)
