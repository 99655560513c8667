"""Read a caption folder once and encode it once: training never runs the VAE or the text encoder.

A dataset folder holds images (png, jpg, jpeg, webp) with same-name `.txt` captions. The trigger word
is put first in any caption that lacks it; an image without a caption trains on the trigger alone,
and the report names those files.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CONTEXT_TOKENS = 512  # Flux2 pads text conditioning to at least 512 tokens (comfy.model_base.Flux2.extra_conds)


@dataclass
class CaptionedImage:
    image: Path
    caption: str
    caption_file: Path | None


@dataclass
class KleinDataset:
    """Encoded training data: one latent and one text conditioning per image, on the CPU."""

    latents: list[torch.Tensor]
    contexts: list[torch.Tensor]
    captions: list[str]
    files: list[str]
    resolution: int
    trigger: str
    folder: str
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.latents)

    def report(self) -> str:
        head = (f"{len(self)} images from {self.folder} at {self.resolution}px, trigger '{self.trigger}', "
                f"latent {tuple(self.latents[0].shape)}, text {tuple(self.contexts[0].shape)}")
        return "\n".join([head, *self.notes])


def has_trigger(caption: str, trigger: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, flags=re.IGNORECASE) is not None


def with_trigger(caption: str, trigger: str) -> str:
    caption = caption.strip()
    if not trigger or has_trigger(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {path} is not UTF-8 text ({e.reason} at byte {e.start}): re-save it as UTF-8.") from e


def scan_folder(folder: Path, trigger: str) -> tuple[list[CaptionedImage], list[str]]:
    """The folder's images with their captions (trigger added), and the names of images with no caption."""
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"dataset folder {folder} has no images ({', '.join(IMAGE_SUFFIXES)}): put the training "
                         "images there with same-name .txt captions.")
    items, missing = [], []
    for img in images:
        cap_file = img.with_suffix(".txt")
        if cap_file.is_file():
            caption = read_caption(cap_file)
        else:
            caption, cap_file = "", None
            missing.append(img.name)
        items.append(CaptionedImage(img, with_trigger(caption, trigger), cap_file))
    return items, missing


def load_image(path: Path, resolution: int) -> tuple[torch.Tensor, str | None]:
    """RGB float image (H, W, 3) in [0, 1], resized to cover `resolution` and centre-cropped square.

    Returns the image and a note when it had to be converted or upscaled.
    """
    import numpy as np
    from PIL import Image, ImageOps, UnidentifiedImageError

    if path.stat().st_size == 0:
        raise ValueError(f"image {path} is an empty (zero-byte) file: remove it or replace it with the real image.")
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            note = None
            if im.mode != "RGB":
                note = f"{path.name}: converted from {im.mode} to RGB"
                if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
                    bg = Image.new("RGB", im.size, (255, 255, 255))
                    bg.paste(im.convert("RGBA"), mask=im.convert("RGBA").getchannel("A"))
                    im, note = bg, f"{path.name}: transparency flattened onto white"
                elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                    arr = np.asarray(im, dtype=np.float32)
                    im = Image.fromarray((arr / max(float(arr.max()), 1.0) * 255).astype("uint8")).convert("RGB")
                    note = f"{path.name}: 16-bit image scaled to 8-bit RGB"
                else:
                    im = im.convert("RGB")
            w, h = im.size
            if min(w, h) < resolution:
                note = (note + "; " if note else "") + f"{path.name}: {w}x{h} is below {resolution}px and was upscaled"
            scale = resolution / min(w, h)
            nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
            im = im.resize((nw, nh), Image.Resampling.LANCZOS)
            left, top = (nw - resolution) // 2, (nh - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
            arr = np.asarray(im, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"image {path} cannot be read ({e}): the file is corrupt or not an image; "
                         "re-export it or remove it from the folder.") from e
    return torch.from_numpy(arr), note


def pad_context(ctx: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad a (tokens, dim) conditioning with zeros, as comfy.model_base.Flux2.extra_conds does."""
    if ctx.shape[0] >= length:
        return ctx
    return torch.nn.functional.pad(ctx, (0, 0, length - ctx.shape[0], 0))


def encode_caption(clip, caption: str) -> torch.Tensor:
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
    return pad_context(cond[0][0][0].detach().to("cpu"), CONTEXT_TOKENS)


def encode_folder(folder: Path, vae, clip, resolution: int, trigger: str, progress=None) -> KleinDataset:
    """Load, crop and encode every image and caption of `folder` once."""
    if resolution % 16:
        raise ValueError(f"resolution {resolution} is not a multiple of 16 (klein's latent is 16x smaller): "
                         f"use {max(16, resolution // 16 * 16)} or {resolution // 16 * 16 + 16}.")
    items, missing = scan_folder(folder, trigger)
    notes: list[str] = []
    if missing:
        notes.append(f"{len(missing)} image(s) without a .txt caption train on the trigger alone: "
                     + ", ".join(missing))
    latents, contexts, cache = [], [], {}
    for i, item in enumerate(items):
        pixels, note = load_image(item.image, resolution)
        if note:
            notes.append(note)
        latents.append(vae.encode(pixels[None]).detach().to("cpu", torch.float32)[0])
        if item.caption not in cache:
            cache[item.caption] = encode_caption(clip, item.caption)
        contexts.append(cache[item.caption])
        if progress is not None:
            progress(i + 1, len(items))
    for n in notes:
        logging.info("Klein dataset: %s", n)
    return KleinDataset(latents, contexts, [it.caption for it in items], [it.image.name for it in items],
                        resolution, trigger, str(folder), notes)
