"""Merge, resize, convert and bake LoRAs: glue over trainer/lora/formats.py and trainer/lora/merge.py."""
from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..trainer import paths
from ..trainer.lora import formats as lora_formats
from ..trainer.lora import merge as lora_merge
from ..trainer.lora.layers import SAVE_DTYPES
from .lora_files import load_lora, lora_choices, lora_slots, read_picks
from .types import CATEGORY, LoraPick

DTYPE_CHOICES = ("auto", *SAVE_DTYPES)


def _dtype(choice: str, loras: list[lora_formats.KleinLora]):
    if choice != "auto":
        return SAVE_DTYPES[choice]
    first = next(iter(loras[0].layers.values()), None) if loras else None
    return first.dtype if first is not None else None


def _out_path(folder: str, output_name: str) -> Path:
    dirs = [Path(d) for d in folder_paths.get_folder_paths(folder)]
    out_dir = next((d for d in dirs if d.name == folder), dirs[0])  # models/diffusion_models, not legacy models/unet
    name = paths.unique_run_name(out_dir, paths.safe_name(output_name))
    return out_dir / f"{name}.safetensors"


def _save(lora: lora_formats.KleinLora, output_name: str, fmt: str, dtype) -> tuple[str, dict]:
    path = lora_formats.save_lora(lora, _out_path("loras", output_name), fmt, dtype)
    logging.info("Klein LoRA: wrote %s (%s)", path, fmt)
    return str(path), lora_formats.to_comfy_state_dict(lora, dtype)


def _outputs() -> list:
    return [io.String.Output(display_name="lora_path", tooltip="The written file."),
            io.LoraModel.Output(display_name="lora", tooltip="The result in ComfyUI form (core Load LoRA Model)."),
            io.String.Output(display_name="report", tooltip="What was done, with per-layer SVD error where relevant.")]


_FORMAT_TIP = ("comfyui: BFL names + alpha (ComfyUI, this pack; LoKr/LoHa/DoRA keep their own keys). diffusers: "
               "transformer.* names for diffusers' load_lora_weights, which reads plain LoRA only (a LoKr, LoHa or "
               "DoRA is refused; diff tensors are left out).")
_NAME_TIP = "File name in models/loras (no folders); an existing name gets _2, _3..."
_DTYPE_TIP = "Precision of the written tensors; 'auto' keeps the (first) input's."


class KleinLoRAMerge(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLoRAMerge", display_name="Klein LoRA Merge", category=CATEGORY, is_output_node=True,
            description="Merges two or more LoRAs with weights into one file: exact (ranks concatenated, equal to the "
                        "weighted sum) or compact (SVD to a target rank, with the error it costs). Plain LoRAs only: "
                        "a LoKr, LoHa or DoRA is refused with the reason (bake those into the model).",
            inputs=[lora_slots("loras", 2, "The LoRAs to merge, each from a Klein LoRA File node (file + weight); "
                                           "connect two or more, a slot appears when the last is connected."),
                    io.Combo.Input("mode", options=["exact", "compact"], default="exact",
                                   tooltip="exact: rank = sum of ranks, no loss. compact: each layer truncated by SVD to "
                                           "target_rank; the report gives the relative error and energy kept."),
                    io.Int.Input("target_rank", default=32, min=1, max=1024,
                                 tooltip="Rank of the compact result (ignored in exact mode)."),
                    io.String.Input("output_name", default="klein_merged", tooltip=_NAME_TIP),
                    io.Combo.Input("format", options=list(lora_formats.FORMATS), default="comfyui",
                                   tooltip=_FORMAT_TIP),
                    io.Combo.Input("save_dtype", options=list(DTYPE_CHOICES), default="auto", tooltip=_DTYPE_TIP,
                                   advanced=True)],
            outputs=_outputs())

    @classmethod
    def execute(cls, loras: dict[str, LoraPick], mode: str, target_rank: int, output_name: str, format: str,
                save_dtype: str) -> io.NodeOutput:
        sources, weights = read_picks(loras, "loras")
        if len(sources) < 2:
            raise ValueError(f"Klein LoRA Merge needs at least two LoRAs, got {len(sources)}: connect a Klein LoRA File "
                             "node to loras.lora_1 and one to loras.lora_2 (use Klein LoRA Resize for one).")
        if mode == "exact":
            merged = lora_merge.exact_merge(sources, weights, paths.safe_name(output_name))
            report = lora_merge.exact_report(merged)
        else:
            merged, report = lora_merge.compact_merge(sources, weights, target_rank, paths.safe_name(output_name))
        report.notes.insert(0, "sources: " + ", ".join(f"{lo.name} ({lo.source_format}) x {w:g}"
                                                        for lo, w in zip(sources, weights, strict=True)))
        path, sd = _save(merged, output_name, format, _dtype(save_dtype, sources))
        return io.NodeOutput(path, sd, report.text())


class KleinLoRAResize(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLoRAResize", display_name="Klein LoRA Resize", category=CATEGORY, is_output_node=True,
            description="Lowers a LoRA's rank by SVD (the best approximation at that rank) and reports the error. "
                        "Plain LoRAs only: a LoKr, LoHa or DoRA is refused with the reason.",
            inputs=[io.Combo.Input("lora", options=lora_choices()[1:], tooltip="The LoRA in models/loras (any layout)."),
                    io.Int.Input("target_rank", default=16, min=1, max=1024,
                                 tooltip="New rank; layers already at or below it keep their rank."),
                    io.String.Input("output_name", default="klein_resized", tooltip=_NAME_TIP),
                    io.Combo.Input("format", options=list(lora_formats.FORMATS), default="comfyui",
                                   tooltip="Layout of the written file."),
                    io.Combo.Input("save_dtype", options=list(DTYPE_CHOICES), default="auto", tooltip=_DTYPE_TIP,
                                   advanced=True)],
            outputs=_outputs())

    @classmethod
    def execute(cls, lora: str, target_rank: int, output_name: str, format: str, save_dtype: str) -> io.NodeOutput:
        src = load_lora(lora, "lora")
        resized, report = lora_merge.resize(src, target_rank, paths.safe_name(output_name))
        path, sd = _save(resized, output_name, format, _dtype(save_dtype, [src]))
        return io.NodeOutput(path, sd, report.text())


class KleinLoRAConvert(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLoRAConvert", display_name="Klein LoRA Convert", category=CATEGORY, is_output_node=True,
            description="Rewrites a LoRA from any trainer (ai-toolkit, diffusers, kohya, ComfyUI) as ComfyUI/BFL or "
                        "diffusers, with its alpha applied as trained and its metadata kept.",
            inputs=[io.Combo.Input("lora", options=lora_choices()[1:], tooltip="The LoRA in models/loras (any layout)."),
                    io.Combo.Input("format", options=list(lora_formats.FORMATS), default="comfyui",
                                   tooltip=_FORMAT_TIP),
                    io.String.Input("output_name", default="klein_converted", tooltip=_NAME_TIP),
                    io.Combo.Input("save_dtype", options=list(DTYPE_CHOICES), default="auto", tooltip=_DTYPE_TIP,
                                   advanced=True)],
            outputs=_outputs())

    @classmethod
    def execute(cls, lora: str, format: str, output_name: str, save_dtype: str) -> io.NodeOutput:
        src = load_lora(lora, "lora")
        path, sd = _save(src, output_name, format, _dtype(save_dtype, [src]))
        alphas = sorted({f"{'-' if d.alpha is None else f'{d.alpha:g}'}/{d.rank}" for d in src.layers.values()})
        kind = "" if src.adapter == "lora" else f"{lora_formats.ADAPTER_NAMES[src.adapter]} "
        report = (f"{src.name}: read as {kind}{src.source_format}, {len(src.layers)} layers, {len(src.diffs)} diff "
                  f"tensors, alpha/rank {', '.join(alphas[:6])}{' ...' if len(alphas) > 6 else ''}; written as {format}")
        return io.NodeOutput(path, sd, report)


class KleinLoRABake(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLoRABake", display_name="Klein LoRA Bake Into Model", category=CATEGORY, is_output_node=True,
            description="Adds LoRAs (with weights) into a diffusion model's weights and saves a new model file in "
                        "models/diffusion_models that Load Diffusion Model (UNETLoader) loads; exact for LoRA, LoKr, "
                        "LoHa and DoRA (as the stock loader applies each). Needs RAM for the model.",
            inputs=[io.Combo.Input("unet_name", options=folder_paths.get_filename_list("diffusion_models"),
                                   tooltip="The base model file in models/diffusion_models (bf16/fp16/fp32; not fp8)."),
                    lora_slots("loras", 1, "The LoRAs to bake in, each from a Klein LoRA File node (file + "
                                           "weight); a slot appears when the last is connected."),
                    io.String.Input("output_name", default="klein_baked",
                                    tooltip="File name in models/diffusion_models (no folders); an existing name gets _2...")],
            outputs=[io.String.Output(display_name="model_path", tooltip="The written model file."),
                     io.String.Output(display_name="report", tooltip="What was baked.")])

    @classmethod
    def execute(cls, unet_name: str, loras: dict[str, LoraPick], output_name: str) -> io.NodeOutput:
        sources, weights = read_picks(loras, "loras")
        if not sources:
            raise ValueError("Klein LoRA Bake: no LoRA connected; connect a Klein LoRA File node to loras.lora_1.")
        src = folder_paths.get_full_path("diffusion_models", unet_name)
        if src is None:
            raise ValueError(f"unet_name: '{unet_name}' is not in models/diffusion_models.")
        out = lora_merge.bake_file(src, sources, weights, _out_path("diffusion_models", output_name))
        report = f"baked into {unet_name}: " + ", ".join(f"{lo.name} x {w:g}" for lo, w in
                                                          zip(sources, weights, strict=True)) + f" -> {out.name}"
        return io.NodeOutput(str(out), report)


MERGE_NODES = [KleinLoRAMerge, KleinLoRAResize, KleinLoRAConvert, KleinLoRABake]
