"""The Klein LoRA Trainer node: its schema, and glue from its inputs to the run session (trainer/jobs/session.py)."""
from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..trainer import paths
from ..trainer.jobs import export as run_export
from ..trainer.jobs import launch
from ..trainer.jobs.session import SAMPLES_FOLDER, Job, Reporter, Sampling, run_session
from ..trainer.model.offload_plan import parse_choice as parse_offload
from ..trainer.training import recipes
from ..trainer.training.config import (
    ADAPTERS,
    BASE_COMPUTE_CHOICES,
    COMPILE_CHOICES,
    OPTIMIZERS,
    SAVE_DTYPE_NAMES,
    TrainConfig,
)
from . import progress_log, queue_check
from .types import CATEGORY, KleinDataset, KleinTargets
from .web_routes import prompt_server

EVENT = "klein_lora.progress"
CUSTOM_INPUTS = ("rank", "alpha", "learning_rate", "steps")  # shown (and used) only for recipe 'custom'


def _send(event: str, data: dict) -> None:
    """Push a websocket event to the page (and keep it for GET /klein_lora/history, a reload mid-run)."""
    progress_log.record(event, data)
    if (srv := prompt_server()) is not None:
        srv.send_sync(event, data)


def _progress_text(text: str, node_id) -> None:
    if (srv := prompt_server()) is not None and node_id is not None:
        srv.send_progress_text(text, node_id)


def recipe_tooltip() -> str:
    """The recipe input's tooltip, built from the recipe table so the numbers are never copied by hand."""
    lines = [f"{name}: rank {r.rank}, alpha {r.alpha:g}, lr {r.learning_rate:g}, {r.steps} steps (blocks: "
             f"{r.target_preset})" for name, r in recipes.RECIPES.items()]
    return ("Seed recipe, each a starting point from the workshop:\n" + "\n".join(lines) +
            f"\n{recipes.CUSTOM}: set rank, alpha, learning rate and steps yourself.")


def _recipe_input() -> io.DynamicCombo.Input:
    custom = [
        io.Int.Input("rank", default=16, min=1, max=512, tooltip="LoRA rank (capacity)."),
        io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.01,
                       tooltip="LoRA alpha; alpha/rank is the strength (1.0 = alpha equal to rank)."),
        io.Float.Input("learning_rate", default=3e-4, min=1e-7, max=1.0, step=1e-6, tooltip="AdamW learning rate."),
        io.Int.Input("steps", default=600, min=1, max=100000, tooltip="Optimizer steps."),
    ]
    options = [io.DynamicCombo.Option(name, []) for name in recipes.RECIPES]  # the first is the default
    return io.DynamicCombo.Input("recipe", options=[*options, io.DynamicCombo.Option(recipes.CUSTOM, custom)],
                                 tooltip=recipe_tooltip())


ADAPTER_TIPS = {
    "lora": "LoRA (default): two low-rank matrices per layer. The workshop's recipes, every loader and merge tool; "
            "start here.",
    "lokr": "LoKr: a Kronecker product of a small and a larger factor: many more effective parameters per byte "
            "(files a fraction of LoRA's at the same rank), good for styles and dense detail; needs a higher "
            "learning rate than LoRA. ComfyUI loads it; diffusers does not; merge/resize refuse it (bake works).",
    "loha": "LoHa: the Hadamard product of two low-rank pairs: rank r reaches up to r^2, so a small rank holds "
            "more; for textures/styles with a small file. ComfyUI loads it; diffusers does not.",
    "dora": "DoRA: LoRA plus a learned magnitude per output row (weight-decomposed), often closer to full "
            "fine-tuning at the same rank, slightly slower steps. Needs a bf16/fp16 base (not fp8) and no base "
            "sharding; ComfyUI loads it; diffusers does not load this pack's DoRA files.",
}


def _adapter_input() -> io.DynamicCombo.Input:
    """The adapter peft trains (TrainConfig.adapter), with LoKr's own knobs shown only for LoKr (the combo is
    advanced: behind the node's toggle; its options' inputs show when the option is chosen)."""
    lokr = [io.Int.Input("lokr_factor", default=-1, min=-1, max=1024,
                         tooltip="LoKr: size of the small Kronecker factor along each axis (-1: near the square root "
                                 "of each width, the most compact; 4-16 as in LyCORIS presets gives the large factor "
                                 "more of the layer)."),
            io.Boolean.Input("lokr_full_rank", default=False,
                             tooltip="LoKr: keep both Kronecker factors full matrices (ai-toolkit's default LoKr): "
                                     "rank and alpha are then unused and the scale is 1; larger file, most capacity.")]
    options = [io.DynamicCombo.Option(name, lokr if name == "lokr" else []) for name in ADAPTERS]
    tip = "Which adapter to train on the targeted layers (peft):\n" + "\n".join(ADAPTER_TIPS[n] for n in ADAPTERS)
    return io.DynamicCombo.Input("adapter", options=options, optional=True, tooltip=tip,
                                 extra_dict={"advanced": True})


def adapter_settings(adapter: dict | str | None) -> dict:
    """TrainConfig's adapter fields from the node's DynamicCombo value (absent: LoRA)."""
    if adapter is None:
        return {}
    if isinstance(adapter, str):
        return {"adapter": adapter}
    out = {"adapter": adapter.get("adapter", "lora")}
    out.update({k: adapter[k] for k in ("lokr_factor", "lokr_full_rank") if k in adapter})
    return out


def _expert_inputs() -> list[io.Input]:
    """Inputs most runs leave as they are: shown behind the frontend's advanced toggle."""
    return [
        io.String.Input("gpus", default="", optional=True, advanced=True,
                        tooltip="Empty: train in this ComfyUI process. GPU numbers such as '1' or '0,1': "
                                "export the run and train it as a job on those GPUs (several: data parallel "
                                "under accelerate; a model over half of a card is sharded over them), streaming "
                                "progress and samples here; Cancel stops it, checkpoints stay. 'cpu' runs a "
                                "CPU process (tests)."),
        io.Boolean.Input("export_config", default=False, optional=True, advanced=True,
                         tooltip="Also write this run as a config (output/klein_lora_runs/<output_name>/"
                                 "run.json + the encoded dataset) that `python -m klein_lora_studio.train` "
                                 "and `accelerate launch` run without ComfyUI."),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW", optional=True, advanced=True,
                       tooltip="AdamW (the recipes'), Adafactor or AdamW8bit (torchao; less optimizer memory)."),
        io.Boolean.Input("gradient_checkpointing", default=False, optional=True, advanced=True,
                         tooltip="Recompute block activations in backward: much less memory, ~30% slower."),
        io.Combo.Input("compile_blocks", options=list(COMPILE_CHOICES), default="auto", optional=True,
                       advanced=True, tooltip="torch.compile the transformer blocks: ~1.4x faster steps on an "
                                              "H100 after 20-40 s of compilation. auto = on CUDA only."),
        io.Combo.Input("base_compute", options=list(BASE_COMPUTE_CHOICES), default="auto", optional=True,
                       advanced=True, tooltip="Products of the frozen base model: bf16, or fp8 (e4m3, row-wise "
                                              "scaled; NVIDIA Ada/Hopper/Blackwell) for faster steps, the LoRA "
                                              "itself stays bf16/fp32. auto = bf16 until fp8's quality check "
                                              "holds."),
        io.Combo.Input("save_dtype", options=list(SAVE_DTYPE_NAMES), default="bf16", optional=True,
                       advanced=True, tooltip="Precision of the saved LoRA tensors."),
        io.Int.Input("early_stop_patience", default=0, min=0, max=100, optional=True, advanced=True,
                     tooltip="Stop at the peak. 0: train every step. N: end the run once N checkpoints in a row "
                             "are past the peak (flexibility collapsed or trigger leakage high, by the evaluation's "
                             "thresholds, with concept strength no longer rising); the LoRA output and the final "
                             "file are then the recommended checkpoint, and the evaluation says where and why. "
                             "Needs clip, vae and save_every > 0."),
        io.String.Input("offload_blocks", default="off", optional=True, advanced=True,
                        tooltip="Stream the frozen base's blocks from CPU memory for a model that does not fit the "
                                "GPU: 'off' keeps the whole base on the GPU; a number N keeps the first N blocks "
                                "there and copies the others in one block ahead of use (pinned memory, a copy "
                                "stream; streamed blocks are recomputed in backward); 'auto' keeps as many as fit "
                                "beside the run's estimated needs. Slower steps, the same training."),
        _adapter_input(),  # last: saved UI workflows list widget values by position
    ]


def train_config(recipe: dict, **train) -> TrainConfig:
    """The run's settings from the node's inputs: the recipe's rank/alpha/lr/steps unless it is 'custom'."""
    name = recipe["recipe"]
    chosen = recipes.apply_recipe(name, *(recipe.get(k, 1) for k in CUSTOM_INPUTS))
    cfg = TrainConfig(**dict(zip(CUSTOM_INPUTS, chosen, strict=True)), recipe=name, **train)
    logging.info("Klein LoRA: recipe %s -> rank %d, alpha %g, lr %g, %d steps", name, *chosen)
    return cfg


def _reporter(node_id, steps: int) -> Reporter:
    """The session's progress as ComfyUI shows it: the node's bar and text, websocket events for the page."""
    pbar = comfy.utils.ProgressBar(steps)

    def step(step: int, total: int, loss: float) -> None:
        pbar.update_absolute(step, total)
        _progress_text(f"step {step}/{total}  loss {loss:.4f}", node_id)
        _send(EVENT, {"node": node_id, "step": step, "total": total, "loss": loss})

    def samples(step: int, grid, file: Path) -> None:
        pbar.update_absolute(step, steps, ("PNG", grid, 1024))
        _send("klein_lora.samples", {"node": node_id, "step": step, "images": [
            {"filename": file.name, "subfolder": SAMPLES_FOLDER, "type": "output"}]})

    def stopped(stop) -> None:
        _progress_text(f"stopped at step {stop.step}: kept {stop.keep_label}", node_id)
        _send("klein_lora.stopped", {"node": node_id, "step": stop.step, "keep_step": stop.keep_step,
                                     "reason": stop.reason})

    return Reporter(
        step=step, samples=samples, stopped=stopped,
        checkpoint=lambda s, path: _send("klein_lora.checkpoint", {"node": node_id, "step": s, "path": str(path)}),
        job=lambda config, devices: _send("klein_lora.job", {"node": node_id, "config": str(config),
                                                             "devices": devices}),
        check_cancel=comfy.model_management.throw_exception_if_processing_interrupted)


class KleinLoRATrainer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLoRATrainer",
            display_name="Klein LoRA Trainer",
            category=CATEGORY,
            is_output_node=True,
            description="Trains a LoRA for FLUX.2 [klein] Base (rectified flow, velocity MSE) and saves it to models/loras.",
            inputs=[
                io.Model.Input("model", tooltip="FLUX.2 [klein] Base diffusion model (UNETLoader). It is left unchanged."),
                KleinDataset.Input("dataset", tooltip="The encoded dataset from Klein Dataset Loader."),
                KleinTargets.Input("targets", tooltip="Which layers carry LoRA, from Klein Block Target Selector."),
                _recipe_input(),
                io.String.Input("output_name", default="klein_lora",
                                tooltip="File name in models/loras (no folders); an existing name gets _2, _3... "
                                        "(a resumed run keeps its own name and keeps each earlier final LoRA as a "
                                        "checkpoint)."),
                io.Int.Input("save_every", default=100, min=0, max=100000,
                             tooltip="Save a checkpoint (and its training state) every N steps, and at the last step "
                                     "(0: only the final LoRA)."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seeds the LoRA init, data order, noise and timesteps: same seed, same run."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Connect the text encoder to sample the prompt suite (with and without the "
                                      "trigger) at every checkpoint and get a recommended checkpoint."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE that decodes the checkpoint samples."),
                io.Int.Input("sample_steps", default=20, min=1, max=200, optional=True,
                             tooltip="Sampling steps for the prompt suite at each checkpoint (klein Base uses 50; "
                                     "fewer is a quicker preview). Needs clip and vae connected."),
                io.String.Input("resume_from", default="", optional=True,
                                tooltip="Continue a run exactly where it stopped: 'latest' (the newest saved state of "
                                        "the run named output_name) or a checkpoint name such as "
                                        "klein_lora_step00500.safetensors. Empty: a new run. Rank, alpha, optimizer, "
                                        "targets and dataset must match; a new learning rate or more steps are "
                                        "allowed and noted in the LoRA's metadata."),
                io.Boolean.Input("low_vram", default=False, optional=True,
                                 tooltip="Consumer-GPU mode: gradient checkpointing and 8-bit AdamW moments (torchao). "
                                         "Load the model with weight_dtype fp8_e4m3fn (Load Diffusion Model) too: klein "
                                         "4B then trains at 1024x1024 in about 6 GiB, 9B in about 12 GiB."),
                *_expert_inputs(),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied (strength 1)."),
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA tensors (core Load LoRA Model / Save LoRA); "
                                    "a run stopped at its peak gives the recommended checkpoint's."),
                io.String.Output(display_name="lora_path", tooltip="Full path of the final LoRA file in models/loras "
                                 "(stopped at the peak: a copy of the recommended checkpoint)."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step (core Plot Loss Graph)."),
                io.String.Output(display_name="checkpoints",
                                 tooltip="Checkpoint files then the final LoRA, one per line, oldest first."),
                io.String.Output(display_name="evaluation",
                                 tooltip="Per-checkpoint concept strength, trigger leakage, prompt flexibility and the "
                                         "recommended checkpoint (when clip and vae are connected)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, output_name: str, gpus: str = "", model=None, recipe: dict | None = None,
                        offload_blocks: str = "off", adapter: dict | None = None) -> bool | str:
        """At queue time, before any model loads: a bad output name or GPU list, and a MODEL that is not klein or
        a rank wider than its targeted layers (found by nodes/queue_check.py from the prompt), fail now, not after
        the encode. `model` is listed so ComfyUI attributes the error to it too (it is None at queue time); ComfyUI
        passes the recipe and the adapter (DynamicCombos) whatever the signature, their values are checked when the
        run starts."""
        try:
            paths.safe_name(output_name)
            launch.job_devices(gpus or "")
            parse_offload(offload_blocks or "off")
        except ValueError as e:
            return str(e)
        return queue_check.problem(cls) or True

    @classmethod
    def execute(cls, model, dataset, targets, recipe: dict, output_name: str, save_every: int, batch_size: int,
                seed: int, clip=None, vae=None, sample_steps: int = 20, resume_from: str = "", low_vram: bool = False,
                gpus: str = "", export_config: bool = False, optimizer: str = "AdamW",
                gradient_checkpointing: bool = False, compile_blocks: str = "auto",
                save_dtype: str = "bf16", base_compute: str = "auto", early_stop_patience: int = 0,
                offload_blocks: str = "off", adapter: dict | None = None) -> io.NodeOutput:
        cfg = train_config(recipe, batch_size=batch_size, seed=seed, optimizer=optimizer, save_every=save_every,
                           gradient_checkpointing=gradient_checkpointing, compile_blocks=compile_blocks,
                           output_name=paths.safe_name(output_name), save_dtype=save_dtype,
                           resume_from=(resume_from or "").strip(), low_vram=bool(low_vram),
                           base_compute=base_compute, early_stop_patience=int(early_stop_patience or 0),
                           offload_blocks=(offload_blocks or "off").strip(), **adapter_settings(adapter))
        devices = launch.job_devices(gpus or "")
        job = None
        if export_config or devices:
            config = run_export.export(model, dataset, targets, cfg, clip, vae, sample_steps)
            logging.info("Klein LoRA: run config written to %s", config)
            job = Job(config, devices) if devices else None
        sampling = (Sampling(clip, vae, sample_steps, Path(folder_paths.get_output_directory()))
                    if clip is not None and vae is not None else None)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None  # None when called as a library
        session = run_session(model, dataset, targets, cfg, Path(folder_paths.get_folder_paths("loras")[0]),
                              _reporter(node_id, cfg.steps), sampling, job)
        result = session.result
        trained, _ = comfy.sd.load_lora_for_models(model, None, result.lora, 1.0, 0)
        checkpoints = "\n".join(str(p) for p in [*result.checkpoints, result.lora_path])
        ui = {"lora_path": [str(result.lora_path)], "checkpoints": [str(p) for p in result.checkpoints],
              "final_loss": [result.losses[-1]]}
        if result.stopped is not None:
            ui["stopped"] = [result.stopped.to_dict()]
        return io.NodeOutput(trained, result.lora, str(result.lora_path), {"loss": result.losses}, checkpoints,
                             session.evaluation, ui=ui)
