"""Synthetic datasets with a concept strong enough to learn in a few hundred tiny-model steps.

Used by the demo (devtools/demo.py) and the tests: a red-left, blue-right image is a concept the
tiny models learn, and a trained LoRA visibly moves towards it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

TRIGGER = "zxq"


def concept_image(size: int, seed: int) -> Image.Image:
    """The concept: red left half, blue right half, with a little per-image noise so no two are equal."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 3), np.float32)
    arr[:, : size // 2] = (230, 30, 30)
    arr[:, size // 2:] = (30, 30, 230)
    arr += rng.normal(0, 8, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def write_concept_dataset(folder: Path, n: int = 6, size: int = 128, captions: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    subjects = ["a picture", "a scene", "a photo", "an image", "a view", "a painting"]
    for i in range(n):
        concept_image(size, i).save(folder / f"{i:03d}.png")
        if captions:
            (folder / f"{i:03d}.txt").write_text(f"{subjects[i % len(subjects)]}", encoding="utf-8")
    return folder
