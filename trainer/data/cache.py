"""Latent and text caches on disk: the next run re-encodes only what changed.

A latent is keyed by the image file's content (sha256), the VAE's identity, the training
resolution and the crop/bucket size; a text conditioning by the caption and the text encoder's
identity. A model's identity is a fingerprint of its weights (names, shapes, dtypes and a strided
sample of values of every tensor, plus any patches such as a LoRA on the text encoder), so the same
files loaded again hit the cache and different weights miss it, without hashing gigabytes.

Entries are single safetensors files written atomically (paths.atomic_save_safetensors); an entry
that cannot be read is re-encoded and overwritten, never trusted.
"""
from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import paths
from . import dataset

CACHE_FOLDER = "klein_lora_cache"  # under ComfyUI's output directory
FORMAT = "1"  # bump when what an entry holds changes: old entries then miss instead of misleading
SAMPLES_PER_TENSOR = 64


def file_digest(path: Path) -> str:
    """sha256 of the file's bytes: renaming or touching a file keeps its cache entry, editing it does not."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _tensor_fingerprint(h, name: str, t: torch.Tensor) -> None:
    h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
    if t.device.type == "meta" or t.numel() == 0:
        return
    flat = t.detach().reshape(-1)
    # evenly spaced indices in integers: a float32 linspace rounds the last index of a large tensor up past its end
    # (Qwen3-4B's 151,936 x 2,560 embedding: index 388,956,160 of 388,956,160, the first real-size run)
    n = min(SAMPLES_PER_TENSOR, flat.numel())
    idx = torch.arange(n, device=flat.device) * (flat.numel() - 1) // max(n - 1, 1)
    h.update(flat[idx].to("cpu", torch.float64).numpy().tobytes())


def module_identity(module: torch.nn.Module, patches: dict | None = None) -> str:
    """A fingerprint of a module's weights (and of patches applied on top, such as a LoRA)."""
    h = hashlib.sha256(FORMAT.encode())
    for name, t in sorted(module.state_dict().items()):
        _tensor_fingerprint(h, name, t)
    for key in sorted(patches or {}):
        for i, p in enumerate(patches[key]):
            h.update(f"patch|{key}|{i}|{p[0]}|{p[2] if len(p) > 2 else ''}|".encode())
            value = p[1]
            if isinstance(value, torch.Tensor):
                _tensor_fingerprint(h, f"{key}.{i}", value)
            elif isinstance(value, (tuple, list)):
                for j, v in enumerate(value):
                    if isinstance(v, torch.Tensor):
                        _tensor_fingerprint(h, f"{key}.{i}.{j}", v)
            else:
                for j, v in enumerate(getattr(value, "weights", ()) or ()):
                    if isinstance(v, torch.Tensor):
                        _tensor_fingerprint(h, f"{key}.{i}.{j}", v)
    return h.hexdigest()[:32]


def vae_identity(vae) -> str:
    """Identity of a ComfyUI VAE (comfy.sd.VAE)."""
    return module_identity(vae.first_stage_model)


def clip_identity(clip) -> str:
    """Identity of a ComfyUI CLIP (comfy.sd.CLIP), including LoRA patches on it."""
    return module_identity(clip.cond_stage_model, getattr(clip.patcher, "patches", None))


def default_cache_dir() -> Path:
    """<ComfyUI output>/klein_lora_cache (needs ComfyUI's folder_paths)."""
    import folder_paths

    return Path(folder_paths.get_output_directory()) / CACHE_FOLDER


@dataclass
class CacheStats:
    latent_hits: int = 0
    latent_misses: int = 0
    text_hits: int = 0
    text_misses: int = 0

    def describe(self) -> str:
        return (f"cache: {self.latent_hits} latent(s) reused, {self.latent_misses} encoded; "
                f"{self.text_hits} caption(s) reused, {self.text_misses} encoded")


class EncodeCache:
    """Look up or compute-and-store latents and text conditionings under `root`."""

    def __init__(self, root: Path, vae_id: str, clip_id: str) -> None:
        self.root, self.vae_id, self.clip_id = Path(root), vae_id, clip_id
        self.stats = CacheStats()

    def latent_key(self, image: Path, resolution: int, size: tuple[int, int] | None = None) -> str:
        crop = f"{size[0]}x{size[1]}" if size else "square"
        return hashlib.sha256(f"{FORMAT}|{file_digest(image)}|{self.vae_id}|{resolution}|{crop}".encode()).hexdigest()

    def text_key(self, caption: str) -> str:
        return hashlib.sha256(f"{FORMAT}|{self.clip_id}|".encode() + caption.encode("utf-8")).hexdigest()

    def _get(self, path: Path) -> torch.Tensor | None:
        if not path.is_file():
            return None
        try:
            import safetensors.torch

            return safetensors.torch.load_file(str(path))["value"]
        except Exception as e:  # noqa: BLE001 - any unreadable entry is a miss, re-encoded and overwritten
            logging.warning("Klein cache: %s is unreadable (%s); encoding again", path, e)
            return None

    def _lookup(self, kind: str, key: str, encode: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
        path = self.root / kind / key[:2] / f"{key}.safetensors"
        found = self._get(path)
        if found is not None:
            return found, True
        value = encode().detach().to("cpu").contiguous()
        paths.atomic_save_safetensors({"value": value}, path, metadata={"format": FORMAT, "kind": kind})
        return value, False

    def latent(self, image: Path, resolution: int, encode: Callable[[], torch.Tensor],
               size: tuple[int, int] | None = None) -> torch.Tensor:
        """The cached latent of `image` at this resolution (and bucket `size`), else `encode()` stored."""
        value, hit = self._lookup("latents", self.latent_key(image, resolution, size), encode)
        if hit:
            self.stats.latent_hits += 1
        else:
            self.stats.latent_misses += 1
        return value

    def text(self, caption: str, encode: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The cached conditioning of `caption`, else `encode()` stored."""
        value, hit = self._lookup("text", self.text_key(caption), encode)
        if hit:
            self.stats.text_hits += 1
        else:
            self.stats.text_misses += 1
        return value


def encode_folder_cached(folder: Path, vae, clip, resolution: int, trigger: str, cache_dir: Path,
                         progress=None, **options) -> dataset.KleinDataset:
    """dataset.encode_folder with the disk cache: images and captions already encoded are read, not encoded.

    Images are only decoded when their latent is missing (a cache hit costs one file hash). `options`
    are encode_folder's (control_folder, bucketing, repeats, caption_dropout, shuffle_tags).
    """
    cache = EncodeCache(cache_dir, vae_identity(vae), clip_identity(clip))
    return dataset.encode_folder(folder, vae, clip, resolution, trigger, progress, cache=cache, **options)
