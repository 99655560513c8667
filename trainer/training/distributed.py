"""Data parallelism for the training loop: which share of each batch this process trains, and one all-reduce.

The process group comes from accelerate (`accelerate launch`, or torchrun on CPU with gloo); this
module only needs rank and world size from it. The loop stays the one-process loop: every process
draws the SAME global batch (indices, captions, sigmas and noise, from the run's own generators, so
the RNG streams do not depend on the process count), trains its slice of it, and the LoRA gradients
are averaged, weighted by slice size, in one flat all-reduce before clipping and the optimizer step.
The parameters then stay identical on every rank without ever being broadcast: same init (seeded),
same averaged gradient, same clip, same AdamW update.

Why not torch DDP: DDP wraps the module and synchronises from hooks on the wrapper's forward, but the
forward here is ComfyUI's diffusion model called inside its patcher with transformer_options
(compiled or checkpointed blocks), and only the LoRA parameters (a few MB) train; DDP's buckets over
a module of billions of frozen parameters buy nothing. One all-reduce after backward is the same
arithmetic, needs no wrapper, and weights uneven slices exactly. (It does not overlap communication
with backward: for a few MB of LoRA gradients that is a millisecond or two per step.)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Ranks:
    """This process's place in a data-parallel run; the default is the single-process run."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def check_batch(self, batch_size: int) -> None:
        if batch_size < self.world:
            raise ValueError(f"batch_size {batch_size} is below the number of processes ({self.world}): every "
                             f"process trains at least one image per step. Raise batch_size to {self.world} or more "
                             "(a multiple of the process count splits evenly) or run fewer processes.")
        if batch_size % self.world:
            logging.warning("Klein LoRA: batch_size %d does not split evenly over %d processes; the gradients are "
                            "weighted by each process's share, so the result is the same, but some processes idle.",
                            batch_size, self.world)

    def shard(self, n: int) -> slice:
        """This rank's contiguous slice of a global batch of `n` items (sizes differ by at most one)."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (1 if self.rank < extra else 0))

    def average_gradients(self, params: list[torch.nn.Parameter], local: int, total: int,
                          loss: torch.Tensor) -> torch.Tensor:
        """Sum over ranks of (local/total) x gradient in place (= the global batch's mean-loss gradient);
        returns the global batch's loss the same way. One flat buffer, one all_reduce."""
        if not self.distributed:
            return loss
        import torch.distributed as dist

        weight = local / total
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0].dtype)]) * weight
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset:offset + n].view_as(g).to(g.dtype)
            offset += n
        return flat[offset].detach()

    def barrier(self) -> None:
        if self.distributed:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (a small picklable object, e.g. the run name)."""
        if not self.distributed:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]


BARRIER_TIMEOUT_S = 3600  # rank 0 samples the prompt suite at each checkpoint while the others wait


def from_accelerate(cpu: bool = False) -> Ranks:
    """Ranks of the current launch: accelerate's PartialState sets up the process group (NCCL on GPUs, gloo on
    the CPU) and the device (torch.cuda.set_device(local rank)); a plain `python` run is one process.

    Call it before ComfyUI's model management is imported: ComfyUI takes torch.cuda.current_device() as its device.
    """
    import datetime

    from accelerate import PartialState

    state = PartialState(cpu=cpu, timeout=datetime.timedelta(seconds=BARRIER_TIMEOUT_S))
    return Ranks(state.process_index, state.num_processes)
