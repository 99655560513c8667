"""Read a caption folder once and encode it once: training never runs the VAE or the text encoder.

A dataset folder holds images (png, jpg, jpeg, webp) with same-name `.txt` captions. The trigger word
is put first in any caption that lacks it; an image without a caption trains on the trigger alone,
and the report names those files.

Image-to-image: a second, control folder holds the inputs, matched to the target images by file
name without extension (`pimpmyride_control/001.png` -> `pimpmyride/001.jpg`); the caption is the
target's `.txt`. Each control is encoded at its target's size and trained as FLUX.2 reference
conditioning (the `ref_latents` of ComfyUI's flux model, what the stock ReferenceLatent node feeds).

With bucketing on, images keep their aspect ratio (trainer/data/buckets.py) instead of a square centre crop.
"""
from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import captions, images
from .buckets import assign_buckets, bucket_sizes, histogram, resize_to_bucket

CONTEXT_TOKENS = 512  # Flux2 pads text conditioning to at least 512 tokens (comfy.model_base.Flux2.extra_conds)
PAIR_RATIO_TOLERANCE = 0.02  # control and target aspect ratios may differ by 2% (rounding of exports)

Size = images.Size


@dataclass
class CaptionedImage:
    image: Path
    caption: str
    caption_file: Path | None
    control: Path | None = None  # image-to-image: the input image this target is made from


@dataclass
class KleinDataset:
    """Encoded training data: one latent and one text conditioning per image, on the CPU.

    Optional parts: `references` (image-to-image: the control latent of each item, same shape as its
    latent), `context_variants` (tag-shuffled encodings of each caption, one is picked per step),
    `empty_context` with `caption_dropout` (share of steps that train on the empty caption) and
    `repeats` (times each image is seen per epoch).
    """

    latents: list[torch.Tensor]
    contexts: list[torch.Tensor]
    captions: list[str]
    files: list[str]
    resolution: int
    trigger: str
    folder: str
    notes: list[str] = field(default_factory=list)
    references: list[torch.Tensor] | None = None
    control_folder: str = ""
    context_variants: list[list[torch.Tensor]] | None = None
    empty_context: torch.Tensor | None = None
    caption_dropout: float = 0.0
    repeats: int = 1
    bucketing: bool = False
    warnings: list[str] = field(default_factory=list)  # the Dataset Doctor's findings, shown first

    def __len__(self) -> int:
        return len(self.latents)

    def size_of(self, i: int) -> Size:
        """The pixel (width, height) item `i` was encoded at."""
        lat = self.latents[i]
        return lat.shape[-1] * 16, lat.shape[-2] * 16

    def bucket_assignment(self) -> dict[Size, list[int]]:
        """Size -> item indices: batches are drawn from one size only (latents of different shapes cannot stack)."""
        out: dict[Size, list[int]] = {}
        for i in range(len(self)):
            out.setdefault(self.size_of(i), []).append(i)
        return out

    def context_for(self, i: int, rng: random.Random) -> torch.Tensor:
        """The text conditioning item `i` trains on this step: empty with `caption_dropout`, else one variant."""
        if self.caption_dropout > 0 and self.empty_context is not None and rng.random() < self.caption_dropout:
            return self.empty_context
        variants = self.context_variants[i] if self.context_variants else None
        if variants and len(variants) > 1:
            return variants[rng.randrange(len(variants))]
        return self.contexts[i]

    def report(self) -> str:
        kind = f"{len(self)} image-to-image pairs ({self.control_folder} -> {self.folder})" if self.references \
            else f"{len(self)} images from {self.folder}"
        head = (f"{kind} at {self.resolution}px, trigger '{self.trigger}', "
                f"latent {tuple(self.latents[0].shape)}, text {tuple(self.contexts[0].shape)}")
        lines = []
        if self.warnings:
            lines += [f"Dataset Doctor: {len(self.warnings)} warning(s):", *(f"- {w}" for w in self.warnings), ""]
        lines.append(head)
        if self.bucketing:
            lines.append(histogram(self.bucket_assignment(), self.files))
        else:
            lines.append(f"square centre crops, {self.resolution}x{self.resolution}")
        extras = []
        if self.repeats > 1:
            extras.append(f"repeats {self.repeats}")
        if self.caption_dropout > 0:
            extras.append(f"caption dropout {self.caption_dropout:g}")
        if self.context_variants:
            n = sum(len(v) for v in self.context_variants) / max(1, len(self.context_variants))
            extras.append(f"tag shuffle ({n:.1f} encoded variants per caption)")
        if extras:
            lines.append(", ".join(extras))
        return "\n".join([*lines, *self.notes])


def _caption_file(listing: images.FolderListing, img: Path, trigger: str) -> CaptionedImage:
    cap_file = listing.caption_of(img)
    caption = captions.read_caption(cap_file) if cap_file is not None else ""
    return CaptionedImage(img, captions.with_trigger(caption, trigger), cap_file)


def scan_folder(folder: Path, trigger: str, roots: Sequence[Path] | None = None
                ) -> tuple[list[CaptionedImage], list[str], list[str]]:
    """The folder's images with their captions (trigger added), the names of images with no caption, and
    warnings for files the folder holds that are not used (subfolders, orphan captions).

    `roots`: where the files may really live after resolving links (default: the folder itself).
    """
    listing = images.list_folder(folder, roots)
    if (refused := listing.outside_error()) is not None:
        raise ValueError(refused)
    if not listing.images:
        raise ValueError(images.no_images_error(listing))
    items = [_caption_file(listing, img, trigger) for img in listing.images]
    return items, [it.image.name for it in items if it.caption_file is None], listing.warnings()


def _names(paths: list[Path], limit: int = 10) -> str:
    shown = ", ".join(p.name for p in paths[:limit])
    return shown + (f" (+{len(paths) - limit} more)" if len(paths) > limit else "")


def _check_unique_stems(folder: Path, files: list[Path]) -> None:
    clash = images.stem_clashes(files)
    if clash:
        raise ValueError(f"{folder} has several images with one name: "
                         + "; ".join(" and ".join(p.name for p in v) for v in clash)
                         + ". Pairs are matched by file name without extension: keep one of each.")


def scan_pairs(folder: Path, control_folder: Path, trigger: str, roots: Sequence[Path] | None = None
               ) -> tuple[list[CaptionedImage], list[str], list[str]]:
    """Target images (with captions) of `folder`, each with its same-name control from `control_folder`.

    Every target needs a control and every control a target: a lone file is almost always a naming
    mistake, and training on half a pair is impossible.
    """
    items, missing, warnings = scan_folder(folder, trigger, roots)
    listing = images.list_folder(control_folder, roots or [control_folder])
    if (refused := listing.outside_error()) is not None:
        raise ValueError(refused)
    controls = listing.images
    if not controls:
        raise ValueError(images.no_images_error(listing, "control folder", "put the input images there, named like "
                                                f"their targets in {folder}."))
    targets = [it.image for it in items]
    _check_unique_stems(folder, targets)
    _check_unique_stems(control_folder, controls)
    pairs, lone_targets, lone_controls = images.pair_by_stem(targets, controls)
    if not pairs:
        raise ValueError(f"control folder {control_folder} matches none of the {len(targets)} images of {folder} by "
                         f"file name (targets: {_names(targets, 5)}; controls: {_names(controls, 5)}). "
                         "Name each control image after its target (001.png -> 001.png; the extension may differ).")
    if lone_targets or lone_controls:
        parts = []
        if lone_targets:
            parts.append(f"{len(lone_targets)} target(s) in {folder} have no control image: {_names(lone_targets)}")
        if lone_controls:
            parts.append(f"{len(lone_controls)} control(s) in {control_folder} have no target: "
                         f"{_names(lone_controls)}")
        raise ValueError("; ".join(parts) + ". Pairs are matched by file name without extension: add the partner, "
                         "fix the name, or move the file out of the folder.")
    control_of = dict(pairs)
    for it in items:
        it.control = control_of[it.image]
    return items, missing, warnings


def _to_tensor(im) -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


def load_image_sized(path: Path, size: Size) -> tuple[torch.Tensor, str | None]:
    """RGB float image (H, W, 3) in [0, 1] scaled to cover `size` (width, height), then centre-cropped to it."""
    im, note, (w, h) = images.open_rgb(path)
    if w < size[0] or h < size[1]:
        note = (note + "; " if note else "") + f"{path.name}: {w}x{h} is below {size[0]}x{size[1]} and was upscaled"
    return _to_tensor(resize_to_bucket(im, size)), note


def pad_context(ctx: torch.Tensor, length: int) -> torch.Tensor:
    """Left-pad a (tokens, dim) conditioning with zeros, as comfy.model_base.Flux2.extra_conds does."""
    if ctx.shape[0] >= length:
        return ctx
    return torch.nn.functional.pad(ctx, (0, 0, length - ctx.shape[0], 0))


def stack_contexts(contexts: list[torch.Tensor]) -> torch.Tensor:
    """A batch of conditionings, left-padded to the longest (a caption over 512 tokens is longer)."""
    longest = max(c.shape[0] for c in contexts)
    return torch.stack([pad_context(c, longest) for c in contexts])


def encode_caption(clip, caption: str) -> torch.Tensor:
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
    return pad_context(cond[0][0][0].detach().to("cpu"), CONTEXT_TOKENS)


def _pair_size_check(target: Path, control: Path, ts: Size, cs: Size) -> str | None:
    """An error for pairs of different aspect ratio; a note for the same ratio at another resolution."""
    if abs(math.log((ts[0] / ts[1]) / (cs[0] / cs[1]))) > PAIR_RATIO_TOLERANCE:
        raise ValueError(f"pair {target.name}: target {target} is {ts[0]}x{ts[1]} but control {control} is "
                         f"{cs[0]}x{cs[1]} (aspect {ts[0] / ts[1]:.3f} vs {cs[0] / cs[1]:.3f}): the two would not "
                         "line up. Export the control at the target's size (or at least its aspect ratio).")
    if ts != cs:
        return f"{target.name}: control {cs[0]}x{cs[1]} resized to the target's {ts[0]}x{ts[1]} framing"
    return None


def _check_options(resolution: int, repeats: int, caption_dropout: float) -> None:
    if resolution % 16:
        raise ValueError(f"resolution {resolution} is not a multiple of 16 (klein's latent is 16x smaller): "
                         f"use {max(16, resolution // 16 * 16)} or {resolution // 16 * 16 + 16}.")
    if repeats < 1:
        raise ValueError(f"repeats is {repeats}: use 1 or more (each image is seen that many times per epoch).")
    if not 0.0 <= caption_dropout < 1.0:
        raise ValueError(f"caption_dropout is {caption_dropout}: use a share from 0 (off) to below 1 "
                         "(0.05-0.1 is common).")


def _item_sizes(items: list[CaptionedImage], resolution: int, bucketing: bool, notes: list[str]) -> list[Size | None]:
    """Each item's encode size: None for the square crop (the cache's "square" key), else its bucket."""
    sizes: list[Size | None] = [None] * len(items)
    pairs = any(it.control is not None for it in items)
    if not (bucketing or pairs):
        return sizes
    dims = [images.image_size(it.image) for it in items]
    if pairs:
        for it, d in zip(items, dims, strict=True):
            if (note := _pair_size_check(it.image, it.control, d, images.image_size(it.control))):
                notes.append(note)
    if bucketing:
        for b, idx in assign_buckets(dims, bucket_sizes(resolution)).items():
            for i in idx:
                sizes[i] = b
    return sizes


def _fit_captions(items: list[CaptionedImage], clip, notes: list[str]) -> None:
    """Cut captions longer than the text encoder takes, naming their files."""
    tokenizer = captions.encoder_tokenizer(clip)
    for it in items:
        it.caption, tokens = captions.fit_caption(it.caption, tokenizer)
        if tokens > captions.MAX_TOKENS:
            notes.append(captions.cut_note((it.caption_file or it.image).name, tokens))


def encode_folder(folder: Path, vae, clip, resolution: int, trigger: str, progress=None, *,
                  control_folder: Path | None = None, bucketing: bool = False, repeats: int = 1,
                  caption_dropout: float = 0.0, shuffle_tags: bool = False, cache=None,
                  roots: Sequence[Path] | None = None) -> KleinDataset:
    """Load, size and encode every image (and control) and caption of `folder` once.

    `cache` is a trainer.data.cache.EncodeCache (or None): with it, latents and captions already on disk are
    read instead of encoded, and images are only decoded when their latent is missing. `roots`: where
    the folder's files may really live once links are resolved (default: inside the folder itself).
    """
    _check_options(resolution, repeats, caption_dropout)
    if control_folder is not None:
        items, missing, notes = scan_pairs(folder, control_folder, trigger, roots)
    else:
        items, missing, notes = scan_folder(folder, trigger, roots)
    if missing:
        notes.append(f"{len(missing)} image(s) without a .txt caption train on the trigger alone: "
                     + ", ".join(missing))
    _fit_captions(items, clip, notes)
    sizes = _item_sizes(items, resolution, bucketing, notes)
    text_memo: dict[str, torch.Tensor] = {}

    def text(caption: str) -> torch.Tensor:
        if caption not in text_memo:
            text_memo[caption] = (cache.text(caption, lambda: encode_caption(clip, caption)) if cache is not None
                                  else encode_caption(clip, caption))
        return text_memo[caption]

    def latent(path: Path, size: Size | None) -> torch.Tensor:
        def encode() -> torch.Tensor:
            pixels, note = load_image_sized(path, size or (resolution, resolution))
            if note:
                notes.append(note)
            return vae.encode(pixels[None]).detach().to("cpu", torch.float32)[0]

        return cache.latent(path, resolution, encode, size) if cache is not None else encode()

    latents, contexts, references, variants = [], [], [], []
    for i, item in enumerate(items):
        latents.append(latent(item.image, sizes[i]))
        if item.control is not None:
            # the control is framed like its target: same crop / bucket, so the two latents line up token for token
            references.append(latent(item.control, sizes[i]))
        contexts.append(text(item.caption))
        if shuffle_tags:
            variants.append([text(c) for c in captions.caption_variants(item.caption, trigger)])
        if progress is not None:
            progress(i + 1, len(items))
    empty = text("") if caption_dropout > 0 else None
    if cache is not None:
        notes.append(cache.stats.describe())
    for n in notes:
        logging.info("Klein dataset: %s", n)
    return KleinDataset(latents, contexts, [it.caption for it in items], [it.image.name for it in items],
                        resolution, trigger, str(folder), notes,
                        references=references or None, control_folder=str(control_folder or ""),
                        context_variants=variants or None, empty_context=empty, caption_dropout=caption_dropout,
                        repeats=repeats, bucketing=bucketing)
