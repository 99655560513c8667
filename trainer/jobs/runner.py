"""Run a RunConfig outside the ComfyUI server: ComfyUI as a library, its own loaders, the node's run session.

`train.py` (python -m <pack>.train CONFIG) calls boot_comfyui then run. Progress goes out as JSON lines
(trainer/jobs/events.py), so a parent process (the trainer node's job mode, the sweep queue) can follow a run.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..data import dataset_file
from ..training import loop, sharding
from ..training.distributed import Ranks
from . import comfy_library
from . import config as run_config
from .events import PACK_DIR, emit_line
from .session import Reporter, Sampling, run_session

# Text encoders the config's clip_type can name beyond ComfyUI's own (CLIPType): name -> loader of the files.
# The pack's tests register their tiny encoder here (train.py, when KLEIN_LORA_DEV_NODES=1).
CLIP_LOADERS: dict[str, Callable[[list[str]], object]] = {}


def register_clip_loader(clip_type: str, load: Callable[[list[str]], object]) -> None:
    CLIP_LOADERS[clip_type] = load


def find_comfyui(explicit: str | None, cfg: run_config.RunConfig | None = None) -> Path:
    """ComfyUI's folder: --comfyui, else COMFYUI_PATH, else the config's comfyui.path, else the ComfyUI this
    pack is installed in (the parent of its custom_nodes/ folder)."""
    tried = []
    for source, value in (("--comfyui", explicit), ("COMFYUI_PATH", os.environ.get("COMFYUI_PATH")),
                          ("comfyui.path", cfg.comfyui.path if cfg else ""),
                          ("the pack's custom_nodes parent", str(PACK_DIR.parent.parent)
                           if PACK_DIR.parent.name == "custom_nodes" else "")):
        if value:
            if (Path(value) / "comfy").is_dir():
                return Path(value).resolve()
            tried.append(f"{source}={value}")
    raise run_config.ConfigError("no ComfyUI found (" + (", ".join(tried) or "nothing set") + "): pass --comfyui "
                                 "PATH or set COMFYUI_PATH to a ComfyUI folder (the one with comfy/ and main.py).")


def boot_comfyui(comfy_dir: Path, base_directory: str = "", cpu: bool = False) -> None:
    """Import ComfyUI as a library (no server, no custom nodes), with its folders under `base_directory`."""
    comfy_library.boot(comfy_dir, base_directory, cpu)


def _full_path(kind: str, name: str, field: str) -> str:
    import folder_paths

    if os.path.isabs(name):
        if not os.path.isfile(name):
            raise run_config.ConfigError(f"{field}: {name} does not exist.")
        return name
    path = folder_paths.get_full_path(kind, name)
    if path is None:
        have = folder_paths.get_filename_list(kind)[:8]
        raise run_config.ConfigError(f"{field}: '{name}' is not in ComfyUI's models/{kind} (found: {have}); give a "
                                     "file name there or an absolute path.")
    return path


def load_model(spec: run_config.ModelSpec):
    """The diffusion model through ComfyUI's UNETLoader (names) or comfy.sd.load_diffusion_model (paths)."""
    import comfy.sd

    import nodes

    path = _full_path("diffusion_models", spec.file, "model.file")
    if not os.path.isabs(spec.file):
        return nodes.UNETLoader().load_unet(spec.file, spec.weight_dtype)[0]
    options = {}
    if spec.weight_dtype.startswith("fp8_e4m3fn"):
        options["dtype"] = torch.float8_e4m3fn
        options["fp8_optimizations"] = spec.weight_dtype.endswith("_fast")
    elif spec.weight_dtype == "fp8_e5m2":
        options["dtype"] = torch.float8_e5m2
    return comfy.sd.load_diffusion_model(path, model_options=options)


def load_clip(files: list[str], clip_type: str, field: str):
    import comfy.sd
    import folder_paths

    paths = [_full_path("text_encoders", f, field) for f in files]
    if clip_type in CLIP_LOADERS:
        return CLIP_LOADERS[clip_type](paths)
    if clip_type == run_config.DEV_CLIP_TYPE:
        raise run_config.ConfigError(f"{field}: clip type '{clip_type}' is for the pack's tests only.")
    kind = getattr(comfy.sd.CLIPType, clip_type.upper(), None)
    if kind is None:
        raise run_config.ConfigError(f"{field}: unknown clip type '{clip_type}' (klein uses 'flux2').")
    return comfy.sd.load_clip(ckpt_paths=paths, embedding_directory=folder_paths.get_folder_paths("embeddings"),
                              clip_type=kind)


def load_vae(name: str, field: str):
    import comfy.sd
    import comfy.utils

    import nodes

    if os.path.isabs(name):
        sd, meta = comfy.utils.load_torch_file(_full_path("vae", name, field), return_metadata=True)
        return comfy.sd.VAE(sd=sd, metadata=meta)
    try:
        return nodes.VAELoader().load_vae(name)[0]
    except (FileNotFoundError, ValueError) as e:
        raise run_config.ConfigError(f"{field}: {e}") from e


def encoded_path(cfg: run_config.RunConfig) -> Path:
    import folder_paths

    raw = Path(cfg.dataset.encoded)
    return raw if raw.is_absolute() else Path(folder_paths.get_output_directory()) / raw


def build_dataset(cfg: run_config.RunConfig, ranks: Ranks):
    """The encoded dataset: the exported file, else rank 0 encodes the folder (through the cache) into a file
    that every rank then reads, so only one process loads the VAE and the text encoder."""
    import folder_paths

    if cfg.dataset.encoded:
        return dataset_file.load_dataset(encoded_path(cfg))
    target = (Path(folder_paths.get_output_directory()) / run_config.RUNS_FOLDER / cfg.train.output_name
              / "dataset.job.safetensors")
    if ranks.is_main:
        data = encode_folder(cfg)
        if not ranks.distributed:
            return data
        dataset_file.save_dataset(data, target)
    ranks.barrier()
    return dataset_file.load_dataset(target)


def encode_folder(cfg: run_config.RunConfig):
    """The config's dataset folder resolved as the Dataset Loader resolves it, encoded with its files checked
    one by one against the same allowed roots (a file linked from outside them is refused)."""
    from ..data import cache, dataset, folders

    d = cfg.dataset
    try:
        found = folders.resolve(d.folder, d.control_folder)
    except ValueError as e:
        raise run_config.ConfigError(f"dataset.folder: {e}") from e
    vae, clip = load_vae(d.vae, "dataset.vae"), load_clip(d.clip, d.clip_type, "dataset.clip")
    options = dict(control_folder=found.control, bucketing=d.bucketing, repeats=d.repeats,
                   caption_dropout=d.caption_dropout, shuffle_tags=d.shuffle_tags, roots=found.roots)
    if d.use_cache:
        return cache.encode_folder_cached(found.folder, vae, clip, d.resolution, d.trigger.strip(),
                                          cache.default_cache_dir(), **options)
    return dataset.encode_folder(found.folder, vae, clip, d.resolution, d.trigger.strip(), **options)


def run(cfg: run_config.RunConfig, ranks: Ranks, emit: Callable[..., None] = emit_line,
        sample: bool = True, await_verdicts: bool = False) -> loop.TrainResult:
    """The run session on the config's model, dataset and targets; rank 0 reports and samples (unless `sample`
    is off: the trainer node's job mode samples each checkpoint in ComfyUI itself, and with `await_verdicts`
    judges them there too: stopping at the peak, rank 0 asks for the verdict after each checkpoint)."""
    import folder_paths

    def say(event: str, **data) -> None:
        if ranks.is_main:
            emit(event, **data)

    with torch.inference_mode():  # as ComfyUI's executor runs the node: loaders and encoders in inference mode
        model = load_model(cfg.model)
        data = build_dataset(cfg, ranks)
        targets = run_config.targets_for(cfg.targets, model.model.diffusion_model)
        sharded = sharding.decide(cfg.train.shard_base, model.model.diffusion_model, model.load_device, ranks)
        cfg.train.shard_base = "on" if sharded else "off"  # decided once: train_lora takes it as given
        sampling = _sampling(cfg, ranks, sharded, sample and cfg.sampling.enabled, say)
        say("start", processes=ranks.world, steps=cfg.train.steps, batch_size=cfg.train.batch_size,
            items=len(data), targets=len(targets.modules))
        reporter = Reporter(step=lambda step, total, loss: say("step", step=step, total=total, loss=loss),
                            checkpoint=lambda step, path: say("checkpoint", step=step, path=str(path)),
                            samples=lambda step, grid, file: say("samples", step=step, file=str(file),
                                                                 subfolder=file.parent.name),
                            begin=lambda first, files: say("begin", first_step=first, run=files.run,
                                                           out_dir=str(files.out_dir)),
                            stopped=lambda stop: say("stopped", **stop.to_dict()))
        out_dir = Path(folder_paths.get_folder_paths("loras")[0])
        verdicts = _ask_parent(say) if await_verdicts and cfg.train.early_stop_patience else None
        session = run_session(model, data, targets, cfg.train, out_dir, reporter, sampling, ranks=ranks,
                              verdicts=verdicts)
    result = session.result
    say("done", run=result.run_name, lora_path=str(result.lora_path), checkpoints=[str(p) for p in result.checkpoints],
        losses=result.losses, seconds=result.seconds, processes=ranks.world,
        evaluation=session.evaluation if session.sampled else "", sharded_base=result.sharded_base,
        base_bytes_per_process=result.base_bytes_here,
        stopped=result.stopped.to_dict() if result.stopped is not None else None)
    logging.info("Klein LoRA: run %s done on %d process(es)", result.run_name, ranks.world)
    return result


def _ask_parent(say) -> Callable[[int], object]:
    """Rank 0's stop check in a job whose parent judges the checkpoints: ask, then wait for its verdict."""
    import sys

    from ..evaluation.early_stop import StopDecision
    from .events import read_verdict

    def verdict(step: int):
        say("await_verdict", step=step)
        stop = read_verdict(sys.stdin, step)
        return StopDecision.from_dict(stop) if stop else None

    return verdict


def _sampling(cfg: run_config.RunConfig, ranks: Ranks, sharded: bool, sample: bool, say) -> Sampling | None:
    """The config's sampling models, loaded on rank 0 when the run samples its checkpoints."""
    import folder_paths

    if sharded and sample:  # rank 0 alone cannot run a model whose weights all ranks share
        logging.warning("Klein LoRA: the base is sharded over %d processes, so the prompt suite is not sampled "
                        "during the run; sample the checkpoints afterwards (Klein Checkpoint Sampler, or the "
                        "Rank x Steps Grid), e.g. with the base loaded in fp8.", ranks.world)
        say("warning", message="checkpoint samples are off: the base model is sharded over the processes")
        return None
    if not sample or not ranks.is_main or cfg.train.save_every <= 0:
        return None
    clip = load_clip(cfg.sampling.clip, cfg.sampling.clip_type, "sampling.clip")
    vae = load_vae(cfg.sampling.vae, "sampling.vae")
    return Sampling(clip, vae, cfg.sampling.sample_steps, Path(folder_paths.get_output_directory()))
