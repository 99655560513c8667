"""An encoded dataset as one safetensors file: what a run config trains on outside the ComfyUI process.

The trainer node exports the KleinDataset it was given (latents, caption encodings, references,
tag-shuffled variants, the empty caption) so a job trains on exactly the same tensors without
loading the VAE or the text encoder in every process. The descriptive fields go in the file's
metadata as JSON; loading runs no code (safetensors).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..paths import atomic_save_safetensors
from .dataset import KleinDataset

FORMAT = "klein-lora-encoded-dataset"
VERSION = 1
_FIELDS = ("captions", "files", "resolution", "trigger", "folder", "notes", "control_folder", "caption_dropout",
           "repeats", "bucketing", "warnings")


def save_dataset(data: KleinDataset, path: Path) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for i in range(len(data)):
        tensors[f"latent.{i}"] = data.latents[i]
        tensors[f"context.{i}"] = data.contexts[i]
        if data.references:
            tensors[f"reference.{i}"] = data.references[i]
        for j, v in enumerate((data.context_variants or [[]] * len(data))[i]):
            tensors[f"variant.{i}.{j}"] = v
    if data.empty_context is not None:
        tensors["empty_context"] = data.empty_context
    fields = {k: getattr(data, k) for k in _FIELDS}
    fields.update(items=len(data), references=bool(data.references), variants=bool(data.context_variants))
    meta = {"format": FORMAT, "version": str(VERSION), "dataset": json.dumps(fields)}
    # cloned: safetensors refuses tensors that share memory, and a variant may be the caption's own encoding
    return atomic_save_safetensors({k: v.detach().to("cpu").clone() for k, v in tensors.items()}, path, meta)


def load_dataset(path: Path) -> KleinDataset:
    """The dataset `save_dataset` wrote; a clear error for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"dataset.encoded: {path} does not exist. Export the run again from the trainer node "
                         "(export_config), or give dataset.folder with the vae and clip files to encode it.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"dataset.encoded: {path} is not a readable safetensors file ({e}): export it again.") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"dataset.encoded: {path} is not an encoded Klein dataset (no '{FORMAT}' marker).")
    if int(meta.get("version", "0")) > VERSION:
        raise ValueError(f"dataset.encoded: {path} was written by a newer Klein LoRA Studio: update the pack.")
    fields = json.loads(meta["dataset"])
    n = fields.pop("items")
    refs, variants = fields.pop("references"), fields.pop("variants")
    return KleinDataset(
        latents=[tensors[f"latent.{i}"] for i in range(n)], contexts=[tensors[f"context.{i}"] for i in range(n)],
        references=[tensors[f"reference.{i}"] for i in range(n)] if refs else None,
        context_variants=[_variants(tensors, i) for i in range(n)] if variants else None,
        empty_context=tensors.get("empty_context"), **fields)


def _variants(tensors: dict[str, torch.Tensor], i: int) -> list[torch.Tensor]:
    out, j = [], 0
    while f"variant.{i}.{j}" in tensors:
        out.append(tensors[f"variant.{i}.{j}"])
        j += 1
    return out
