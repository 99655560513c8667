"""Test helpers; the synthetic concept datasets live in devtools/datasets.py (the demo uses them too)."""
from __future__ import annotations

from ..devtools.datasets import TRIGGER, concept_image, write_concept_dataset  # noqa: F401 - the tests' import


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
