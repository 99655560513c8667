from __future__ import annotations

import logging
from pathlib import Path

import comfy.model_management
import comfy.sd
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..trainer import paths
from ..trainer.evaluation.monitor import TrainingMonitor
from ..trainer.jobs import export as run_export
from ..trainer.jobs import launch as jobs
from ..trainer.lora.layers import SAVE_DTYPES
from ..trainer.model import model_check
from ..trainer.training import loop, recipes
from . import progress_log, queue_check
from .types import CATEGORY, KleinDataset, KleinTargets
from .web_routes import prompt_server

EVENT = "klein_lora.progress"


def _send(event: str, data: dict) -> None:
    """Push a websocket event to the page (and keep it for GET /klein_lora/history, a reload mid-run)."""
    progress_log.record(event, data)
    if (srv := prompt_server()) is not None:
        srv.send_sync(event, data)


def _progress_text(text: str, node_id) -> None:
    if (srv := prompt_server()) is not None and node_id is not None:
        srv.send_progress_text(text, node_id)


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
                io.Combo.Input("recipe", options=list(recipes.RECIPE_CHOICES), default="style",
                               tooltip="Seed recipe (style r16 lr3e-4 600 steps; character r32 lr2e-4 1000; object r24 "
                                       "lr2e-4 800; image-to-image r32 lr1e-4 400). 'custom' uses the values below."),
                io.Int.Input("rank", default=16, min=1, max=512, tooltip="LoRA rank (capacity). Used with recipe 'custom'."),
                io.Float.Input("alpha", default=16.0, min=0.01, max=1024.0, step=0.01,
                               tooltip="LoRA alpha; alpha/rank is the strength (1.0 = alpha equal to rank)."),
                io.Float.Input("learning_rate", default=3e-4, min=1e-7, max=1.0, step=1e-6,
                               tooltip="AdamW learning rate. Used with recipe 'custom'."),
                io.Int.Input("steps", default=600, min=1, max=100000, tooltip="Optimizer steps. Used with recipe 'custom'."),
                io.Int.Input("batch_size", default=1, min=1, max=64, tooltip="Images per step."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seeds the LoRA init, data order, noise and timesteps: same seed, same run."),
                io.Combo.Input("optimizer", options=list(loop.OPTIMIZERS), default="AdamW",
                               tooltip="AdamW (the recipes'), Adafactor or AdamW8bit (torchao; less optimizer memory)."),
                io.Int.Input("save_every", default=100, min=0, max=100000,
                             tooltip="Save a checkpoint every N steps (0: only the final LoRA)."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute block activations in backward: much less memory, ~30% slower."),
                io.Combo.Input("compile_blocks", options=list(loop.COMPILE_CHOICES), default="auto",
                               tooltip="torch.compile the transformer blocks: ~1.4x faster steps on an H100 after "
                                       "20-40 s of compilation. auto = on CUDA only."),
                io.String.Input("output_name", default="klein_lora",
                                tooltip="File name in models/loras (no folders); an existing name gets _2, _3..."),
                io.Combo.Input("save_dtype", options=list(SAVE_DTYPES), default="bf16",
                               tooltip="Precision of the saved LoRA tensors."),
                io.Int.Input("sample_steps", default=20, min=1, max=200,
                             tooltip="Sampling steps for the prompt suite at each checkpoint (klein Base uses 50; "
                                     "fewer is a quicker preview). Needs clip and vae connected."),
                io.Clip.Input("clip", optional=True,
                              tooltip="Connect the text encoder to sample the prompt suite (with and without the "
                                      "trigger) at every checkpoint and get a recommended checkpoint."),
                io.Vae.Input("vae", optional=True, tooltip="The VAE that decodes the checkpoint samples."),
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
                io.Boolean.Input("export_config", default=False, optional=True,
                                 tooltip="Also write this run as a config (output/klein_lora_runs/<output_name>/"
                                         "run.json + the encoded dataset) that `python -m klein_lora_studio.train` "
                                         "and `accelerate launch` run without ComfyUI."),
                io.String.Input("gpus", default="", optional=True,
                                tooltip="Empty: train in this ComfyUI process. GPU numbers such as '1' or '0,1': "
                                        "export the run and train it as a job on those GPUs (several: data parallel "
                                        "under accelerate; a model over half of a card is sharded over them), streaming "
                                        "progress and samples here; Cancel stops it, checkpoints stay. 'cpu' runs a "
                                        "CPU process (tests)."),
            ],
            outputs=[
                io.Model.Output(display_name="model", tooltip="The input model with the trained LoRA applied (strength 1)."),
                io.LoraModel.Output(display_name="lora", tooltip="The LoRA tensors (core Load LoRA Model / Save LoRA)."),
                io.String.Output(display_name="lora_path"),
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
    def validate_inputs(cls, output_name: str, gpus: str = "", model=None) -> bool | str:
        """At queue time, before any model loads: a bad output name or GPU list, and a MODEL that is not klein or
        a rank wider than its targeted layers (found by nodes/queue_check.py from the prompt), fail now, not after
        the encode. `model` is listed so ComfyUI attributes the error to it too (it is None at queue time)."""
        try:
            paths.safe_name(output_name)
            jobs.job_devices(gpus or "")
        except ValueError as e:
            return str(e)
        return queue_check.problem(cls) or True

    @classmethod
    def execute(cls, model, dataset, targets, recipe: str, rank: int, alpha: float, learning_rate: float,
                steps: int, batch_size: int, seed: int, optimizer: str, save_every: int,
                gradient_checkpointing: bool, compile_blocks: str, output_name: str, save_dtype: str,
                sample_steps: int = 20, clip=None, vae=None, resume_from: str = "", export_config: bool = False,
                gpus: str = "", low_vram: bool = False) -> io.NodeOutput:
        rank, alpha, learning_rate, steps = recipes.apply_recipe(recipe, rank, alpha, learning_rate, steps)
        cfg = loop.TrainConfig(rank=rank, alpha=alpha, learning_rate=learning_rate, steps=steps,
                               batch_size=batch_size, seed=seed, optimizer=optimizer, save_every=save_every,
                               gradient_checkpointing=gradient_checkpointing, compile_blocks=compile_blocks,
                               output_name=paths.safe_name(output_name), save_dtype=save_dtype, recipe=recipe,
                               resume_from=(resume_from or "").strip(), low_vram=bool(low_vram))
        logging.info("Klein LoRA: recipe %s -> rank %d, alpha %g, lr %g, %d steps", recipe, rank, alpha,
                     learning_rate, steps)
        node_id = cls.hidden.unique_id if cls.hidden is not None else None  # None when called as a library
        pbar = comfy.utils.ProgressBar(steps)

        def on_step(step: int, total: int, loss: float) -> None:
            pbar.update_absolute(step, total)
            _progress_text(f"step {step}/{total}  loss {loss:.4f}", node_id)
            _send(EVENT, {"node": node_id, "step": step, "total": total, "loss": loss})

        monitor = None
        if clip is not None and vae is not None and save_every > 0:
            samples = Path(folder_paths.get_output_directory()) / "klein_lora_samples"
            monitor = TrainingMonitor(clip, vae, dataset, seed, sample_steps, samples)
            monitor.before(model)

        def on_checkpoint(step: int, path: Path, live_model) -> None:
            _send("klein_lora.checkpoint", {"node": node_id, "step": step, "path": str(path)})
            if monitor is None:
                return
            grid, file = monitor(step, path, live_model)
            pbar.update_absolute(step, steps, ("PNG", grid, 1024))
            _send("klein_lora.samples", {"node": node_id, "step": step, "images": [
                {"filename": file.name, "subfolder": "klein_lora_samples", "type": "output"}]})

        hooks = loop.TrainHooks(on_step=on_step, on_checkpoint=on_checkpoint,
                                check_cancel=comfy.model_management.throw_exception_if_processing_interrupted)
        out_dir = Path(folder_paths.get_folder_paths("loras")[0])
        devices = jobs.job_devices(gpus or "")
        if export_config or devices:
            config = run_export.export(model, dataset, targets, cfg, clip, vae, sample_steps)
            logging.info("Klein LoRA: run config written to %s", config)
        if devices:
            result = run_job(config, devices, model, hooks, node_id)
        else:
            result = loop.train_lora(model, dataset, targets, cfg, out_dir, hooks)
        trained, _ = comfy.sd.load_lora_for_models(model, None, result.lora, 1.0, 0)
        checkpoints = "\n".join(str(p) for p in [*result.checkpoints, result.lora_path])
        evaluation = "connect clip and vae (and save_every > 0) to sample and judge the checkpoints"
        if monitor is not None:
            evaluation, _, report = monitor.finish(result.lora_path)
            evaluation += f"\nreport: {report}"
        distilled = model_check.distilled_warning(loop.base_model_file(model))
        if distilled is not None:  # said at queue time too (queue_check.notices); here it stays with the result
            logging.warning("Klein LoRA: %s", distilled)
            evaluation = f"WARNING: {distilled}\n{evaluation}"
        ui = {"lora_path": [str(result.lora_path)], "checkpoints": [str(p) for p in result.checkpoints],
              "final_loss": [result.losses[-1]]}
        return io.NodeOutput(trained, result.lora, str(result.lora_path), {"loss": result.losses}, checkpoints,
                             evaluation, ui=ui)


def run_job(config: Path, devices: list[str], model, hooks: loop.TrainHooks, node_id) -> loop.TrainResult:
    """The exported run as a child process on `devices`: its progress drives the same hooks as an in-process run.

    Checkpoints are sampled here, in ComfyUI, from the files the job writes (the MODEL with each checkpoint
    applied, with the node's own clip and vae), so the job is told not to sample the config's suite as well.
    """
    from ..trainer.evaluation import sampling as sp

    job = jobs.Job(config, devices, ["--no-sampling"], log_prefix=f"klein job {config.parent.name}")
    _send("klein_lora.job", {"node": node_id, "config": str(config), "devices": devices})
    for event in job.events(hooks.check_cancel):
        kind = event["klein_lora"]
        if kind == "step":
            hooks.on_step(event["step"], event["total"], event["loss"])
        elif kind == "checkpoint":
            path = Path(event["path"])
            sd, _ = sp.read_lora(path)
            live, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0)
            hooks.on_checkpoint(event["step"], path, live)
    done = job.done
    lora_path = Path(done["lora_path"])
    lora, _ = sp.read_lora(lora_path)
    return loop.TrainResult(lora, list(done["losses"]), lora_path, [Path(p) for p in done["checkpoints"]],
                            done["run"], float(done["seconds"]))
