"""A run config from the objects the trainer node holds: the MODEL's file, the encoded dataset, the targets.

The node's inputs are live objects, not file names; what a job needs to rebuild them is read from
ComfyUI's own records (the loaders' `cached_patcher_init`: file path and options). The encoded dataset
is written beside the config, so the job trains on exactly the tensors the node was given.
"""
from __future__ import annotations

import os
from pathlib import Path

from ..data import dataset_file
from ..training.config import TrainConfig
from . import config as run_config

_DTYPES = {"float8_e4m3fn": "fp8_e4m3fn", "float8_e5m2": "fp8_e5m2"}  # torch dtype names -> UNETLoader weight_dtype


def model_spec(patcher) -> run_config.ModelSpec:
    import comfy.sd
    import folder_paths

    init = getattr(patcher, "cached_patcher_init", None)
    if not init or init[0] is not comfy.sd.load_diffusion_model:
        raise ValueError("export_config / gpus: the MODEL was not loaded from a file by Load Diffusion Model "
                         "(UNETLoader), so a job cannot load it again. Load the klein Base model with UNETLoader.")
    if getattr(patcher, "patches", None):
        raise ValueError(f"export_config / gpus: the MODEL carries {len(patcher.patches)} weight patches (a LoRA "
                         "loaded onto it?); a job loads the model file alone. Connect the model straight from "
                         "UNETLoader, or train in this process (leave gpus empty).")
    path, options = init[1][0], (init[1][1] if len(init[1]) > 1 else {}) or {}
    dtype = _DTYPES.get(str(options.get("dtype")).removeprefix("torch."), "default")
    if dtype == "fp8_e4m3fn" and options.get("fp8_optimizations"):
        dtype = "fp8_e4m3fn_fast"
    return run_config.ModelSpec(file=_name_in(folder_paths.get_folder_paths("diffusion_models"), path),
                                weight_dtype=dtype)


def _name_in(folders: list[str], path: str) -> str:
    """The name ComfyUI lists the file under, else its absolute path."""
    real = os.path.realpath(path)
    for folder in folders:
        base = os.path.realpath(folder)
        if real.startswith(base + os.sep):
            return os.path.relpath(real, base).replace(os.sep, "/")
    return real


def sampling_spec(clip, vae, sample_steps: int) -> run_config.SamplingSpec:
    """clip and vae file names when ComfyUI's loaders recorded them; empty (no sampling in the job) otherwise."""
    import folder_paths

    c = getattr(getattr(clip, "patcher", None), "cached_patcher_init", None) if clip is not None else None
    v = getattr(getattr(vae, "patcher", None), "cached_patcher_init", None) if vae is not None else None
    if not c or not v or not c[1] or not v[1] or not isinstance(v[1][0], str):
        return run_config.SamplingSpec(sample_steps=sample_steps)
    clip_type = getattr(c[1][2], "name", "flux2").lower() if len(c[1]) > 2 else "flux2"
    return run_config.SamplingSpec(
        clip=[_name_in(folder_paths.get_folder_paths("text_encoders"), p) for p in c[1][0]], clip_type=clip_type,
        vae=_name_in(folder_paths.get_folder_paths("vae"), v[1][0]), sample_steps=sample_steps)


def export(patcher, data, targets, cfg: TrainConfig, clip=None, vae=None, sample_steps: int = 20,
           name: str | None = None) -> Path:
    """Write <output>/klein_lora_runs/<name>/run.json and its dataset.safetensors atomically; returns run.json."""
    import folder_paths

    output = Path(folder_paths.get_output_directory())
    folder = output / run_config.RUNS_FOLDER / (name or cfg.output_name)
    encoded = dataset_file.save_dataset(data, folder / "dataset.safetensors")
    comfy_dir = Path(folder_paths.__file__).resolve().parent
    spec = run_config.RunConfig(
        model=model_spec(patcher),
        dataset=run_config.DatasetSpec(
            encoded=_encoded_ref(encoded, output), folder=data.folder, trigger=data.trigger,
            resolution=data.resolution, control_folder=data.control_folder, bucketing=data.bucketing,
            repeats=data.repeats, caption_dropout=data.caption_dropout, shuffle_tags=bool(data.context_variants)),
        train=cfg,
        targets=run_config.TargetSpec(groups=list(targets.groups), layers=targets.layers, streams=targets.streams,
                                      modules=list(targets.modules)),
        sampling=sampling_spec(clip, vae, sample_steps),
        comfyui=run_config.ComfySpec(path=str(comfy_dir), base_directory=str(folder_paths.base_path)))
    return run_config.save(spec, folder / "run.json")


def _encoded_ref(encoded: Path, output: Path) -> str:
    """Relative to the output folder when that is the base directory's own (portable between machines with the
    same layout), else absolute: a job booted with only --base-directory would not know a custom --output-directory."""
    import folder_paths

    if output.resolve() == (Path(folder_paths.base_path) / "output").resolve():
        return encoded.relative_to(output).as_posix()
    return str(encoded.resolve())
