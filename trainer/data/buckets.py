"""Aspect-ratio buckets, repeats and caption variation: train on whole images, not centre crops.

Every image goes to the bucket whose aspect ratio is nearest its own (compared in log space, so
2:1 and 1:2 are equally far from 1:1). Buckets hold about the training area (resolution^2) with
sides in multiples of 16 px (klein's latent is 16x smaller than the image). A batch holds one
bucket only, since latents of different shapes cannot be stacked.

Batches are drawn from (seed, epoch) alone, so a run is reproducible and resumes bit-exact.
"""
from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence

import torch
from PIL import Image

STEP = 16
# Width:height ratios offered by default: square, the common photo and screen formats, both orientations.
DEFAULT_RATIOS: tuple[tuple[int, int], ...] = (
    (1, 1), (5, 4), (4, 5), (4, 3), (3, 4), (3, 2), (2, 3), (16, 9), (9, 16), (2, 1), (1, 2),
)
Bucket = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(resolution: int, ratios: Sequence[tuple[int, int]] = DEFAULT_RATIOS, step: int = STEP) -> list[Bucket]:
    """One (width, height) per ratio, sides multiples of `step`, area as close to resolution^2 as the grid allows."""
    if resolution % step:
        raise ValueError(f"resolution {resolution} is not a multiple of {step}: use {resolution // step * step} "
                         f"or {resolution // step * step + step}.")
    area = resolution * resolution
    out: list[Bucket] = []
    for rw, rh in ratios:
        r = rw / rh
        size = (_snap(math.sqrt(area * r), step), _snap(math.sqrt(area / r), step))
        if size not in out:
            out.append(size)
    return out


def _snap(x: float, step: int) -> int:
    return max(step, int(math.floor(x / step + 0.5)) * step)


def nearest_bucket(size: tuple[int, int], buckets: Sequence[Bucket]) -> Bucket:
    """The bucket whose aspect ratio is nearest the image's (log distance; ties go to the larger area)."""
    w, h = size
    if w <= 0 or h <= 0:
        raise ValueError(f"image size {w}x{h} has no area")
    a = math.log(w / h)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - a), -b[0] * b[1]))


def assign_buckets(sizes: Sequence[tuple[int, int]], buckets: Sequence[Bucket]) -> dict[Bucket, list[int]]:
    """Bucket -> indices of the images in it (only non-empty buckets, in the order of `buckets`)."""
    found: dict[Bucket, list[int]] = {}
    for i, s in enumerate(sizes):
        found.setdefault(nearest_bucket(s, buckets), []).append(i)
    return {b: found[b] for b in buckets if b in found}


def resize_to_bucket(im: Image.Image, bucket: Bucket) -> Image.Image:
    """Scale to cover the bucket, keeping the aspect ratio, then centre-crop the small excess."""
    bw, bh = bucket
    w, h = im.size
    scale = max(bw / w, bh / h)
    nw, nh = max(bw, round(w * scale)), max(bh, round(h * scale))
    im = im.resize((nw, nh), Image.Resampling.LANCZOS)
    left, top = (nw - bw) // 2, (nh - bh) // 2
    return im.crop((left, top, left + bw, top + bh))


def histogram(assignment: dict[Bucket, list[int]], names: Sequence[str] | None = None, width: int = 30) -> str:
    """A text histogram of the buckets: size, ratio, count and a bar; names the images of thin buckets."""
    total = sum(len(v) for v in assignment.values()) or 1
    most = max((len(v) for v in assignment.values()), default=1)
    lines = [f"{len(assignment)} bucket(s) for {total} image(s):"]
    for (w, h), idx in sorted(assignment.items(), key=lambda kv: -len(kv[1])):
        g = math.gcd(w, h)
        bar = "#" * max(1, round(width * len(idx) / most))
        line = f"  {w:>5}x{h:<5} ({w // g}:{h // g}) {len(idx):>4}  {bar}"
        if names is not None and len(idx) <= 2:
            line += "  " + ", ".join(names[i] for i in idx)
        lines.append(line)
    return "\n".join(lines)


def with_repeats(indices: Sequence[int], repeats: int | Sequence[int]) -> list[int]:
    """Each index `repeats` times (or `repeats[index]` times): a 2x image is seen twice per epoch."""
    if isinstance(repeats, int):
        if repeats < 1:
            raise ValueError(f"repeats {repeats} must be 1 or more")
        return [i for i in indices for _ in range(repeats)]
    bad = [i for i in indices if repeats[i] < 0]
    if bad:
        raise ValueError(f"repeats must not be negative (image indices {bad})")
    return [i for i in indices for _ in range(repeats[i])]


class BucketBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of dataset indices that never mix buckets; reshuffled every epoch from (seed, epoch).

    Within an epoch every image appears `repeats` times; the order of images within a bucket and the
    order of the batches across buckets are shuffled. The last short batch of a bucket is kept
    unless `drop_last`.
    """

    def __init__(self, assignment: dict[Bucket, list[int]], batch_size: int, seed: int = 0,
                 repeats: int | Sequence[int] = 1, drop_last: bool = False) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size {batch_size} must be 1 or more")
        self.assignment = {b: list(v) for b, v in assignment.items()}
        self.batch_size, self.seed, self.repeats, self.drop_last = batch_size, seed, repeats, drop_last
        self.epoch = 0

    def batches(self, epoch: int) -> list[list[int]]:
        rng = random.Random(f"{self.seed}:{epoch}")  # str seeds hash deterministically (sha512), across runs
        out: list[list[int]] = []
        for b in self.assignment:
            idx = with_repeats(self.assignment[b], self.repeats)
            rng.shuffle(idx)
            chunks = [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
            if self.drop_last and chunks and len(chunks[-1]) < self.batch_size:
                chunks.pop()
            out += chunks
        rng.shuffle(out)
        return out

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches(self.epoch)
        self.epoch += 1
        return iter(batches)

    def __len__(self) -> int:
        return len(self.batches(self.epoch))
