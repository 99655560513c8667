"""Synthetic datasets with a concept strong enough to learn in a few hundred tiny-model steps."""
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


def gloo_gradient_worker(rank: int, world: int, port: int, out) -> None:
    """A spawned rank of tests/test_distributed.py (here: spawn children import it by its package name)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from klein_lora_studio.trainer.training.distributed import Ranks

    ranks = Ranks(rank, world)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # a global batch of 3 over 2 ranks: 2 + 1 rows
    part = ranks.shard(3)
    loss = ((x[part] @ w) ** 2).mean()
    loss.backward()
    total = ranks.average_gradients([w], part.stop - part.start, 3, loss.detach())
    out.put((rank, w.grad.tolist(), float(total)))
    dist.destroy_process_group()
