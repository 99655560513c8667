"""Klein Rank x Steps Grid: one image per LoRA, by rank and steps (glue over trainer/evaluation/sampling.py)."""
from __future__ import annotations

import os
from pathlib import Path

import comfy.sd
import folder_paths
from comfy_api.latest import io, ui

from ..trainer import paths
from ..trainer.evaluation import sampling as sp
from ..trainer.jobs import sweep as job_queue
from .checkpoint_sampler import resolve_checkpoints
from .types import CATEGORY, model_inputs, one_prompt_inputs

RUN_SLOTS = 16


def run_slots() -> io.Autogrow.Input:
    """Sockets `runs.run_1`, `.run_2`, ... for trainers' `checkpoints` outputs; one more appears when the last is
    connected, none is required."""
    template = io.Autogrow.TemplateNames(
        io.String.Input("run", force_input=True, tooltip="A trainer's `checkpoints` output (its checkpoints and final "
                                                         "LoRA, one per line)."),
        names=[f"run_{i}" for i in range(1, RUN_SLOTS + 1)], min=0)
    return io.Autogrow.Input("runs", optional=True, template=template,
                             tooltip="Trainers' `checkpoints` outputs, one per slot (a slot appears when the last is "
                                     "connected); their checkpoints and final LoRAs are added to the list.")


def manifest_path(name: str, output_dir: Path) -> Path:
    """A sweep manifest inside the output folder, links and '../' resolved; one error for missing and outside.

    The same words for both: the node must not tell which files exist elsewhere on the machine.
    """
    output = Path(os.path.realpath(output_dir))
    raw = Path(os.path.expanduser(name.strip()))
    real = Path(os.path.realpath(raw if raw.is_absolute() else output / raw))
    if not paths.is_within(real, output) or not real.is_file():
        raise ValueError(f"sweep_manifest '{name.strip()}' is not a sweep manifest in ComfyUI's output folder: give "
                         "the sweep.json that `python -m klein_lora_studio.sweep` wrote there, as a path relative to "
                         "the output folder (e.g. klein_sweeps/<sweep>/sweep.json).")
    return real


class KleinRankStepsGrid(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinRankStepsGrid",
            display_name="Klein Rank x Steps Grid",
            category=CATEGORY,
            is_output_node=True,
            description="The seed's comparison grid: one prompt, one seed, one image per LoRA, rows by the LoRA's "
                        "rank and columns by its training steps (read from the trainer's metadata).",
            inputs=[
                *model_inputs(),
                io.String.Input("loras", multiline=True, default="",
                                tooltip="LoRA files, one per line (trainer lora_path outputs or names in models/loras), "
                                        "e.g. runs at rank 8/16/32 x 250/500/1000 steps."),
                *one_prompt_inputs("kln_concept, " + sp.DEFAULT_SUBJECTS[0][1]),
                run_slots(),
                io.String.Input("sweep_manifest", default="", optional=True,
                                tooltip="A sweep's sweep.json (python -m klein_lora_studio.sweep), absolute or relative "
                                        "to the output folder: the checkpoints and final LoRA of every finished job "
                                        "are added to the list."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="Rows rank, columns training steps.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, loras: str, prompt: str, steps: int, cfg: float, seed: int,
                resolution: int, runs: dict[str, str] | None = None, sweep_manifest: str = "") -> io.NodeOutput:
        swept = ""
        if (sweep_manifest or "").strip():
            output = Path(folder_paths.get_output_directory())
            manifest = manifest_path(sweep_manifest, output)
            swept = "\n".join(str(p) for p in job_queue.manifest_loras(manifest, output))
        files = resolve_checkpoints("\n".join(s for s in (loras, *(runs or {}).values(), swept) if s))
        settings = sp.SampleSettings(steps, cfg, seed, resolution, resolution)
        conds = sp.encode_prompts(clip, [sp.SuitePrompt("prompt", "prompt", prompt, True)])
        entries = []
        for path in files:
            sd, meta = sp.read_lora(path)
            patched, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
            col = sp.sample_column(patched, conds, vae, settings, path.stem)
            entries.append((meta, sp.to_pil(col.images[0])))
        grid = sp.to_image_tensor(sp.rank_steps_grid(entries, prompt[:80]))
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))
