"""Shard the frozen base weights over the data-parallel processes (FSDP), for a model too big for one card.

Plain data parallel (trainer/training/distributed.py) keeps the whole frozen model on every card: 9B in bf16 is
~17 GiB before any activation. With `shard_base` each of N processes keeps 1/N of it instead: torch's
FSDP2 (`fully_shard`, the engine accelerate's FSDP plugin drives) on every double/single block and then on
the model itself (embedders, shared modulation, final layer). A block's weights are all-gathered just
before it runs, forward and again in backward, and freed after it, so a card holds its shard plus about
one block whole.

Only the base is sharded. The LoRA layers are injected after `fully_shard`, so FSDP does not manage them:
they stay whole on every card and trainer/training/distributed.py averages their gradients as before, so the
update is exactly the data-parallel one (tested against one process on the CPU with gloo).

Why `fully_shard` and not `accelerator.prepare` with accelerate's FSDP plugin: prepare wraps the model
whose parameters it trains, and its forward; here the forward is ComfyUI's diffusion model inside its
patcher (block-replace hooks, compiled or checkpointed blocks) and nothing FSDP holds trains. The same
torch API, called per block, is all of FSDP this needs. accelerate still sets up the process group.
"""
from __future__ import annotations

import logging

import torch

from .config import SHARD_CHOICES

# auto shards when the frozen weights alone would take more than this share of a card: the rest has to hold
# a training step (measured, 9B at 1024^2 checkpointed, one image per card: 3.6 GiB above the weights;
# uncheckpointed or at larger batches, several times that)
AUTO_SHARE = 0.5


def should_shard(choice: str, world: int, weight_bytes: int, card_bytes: int | None) -> bool:
    """Whether to shard: 'on'/'off' as asked with several processes; 'auto' when the weights exceed
    AUTO_SHARE of the card (never on the CPU, where all processes share one memory anyway)."""
    if choice not in SHARD_CHOICES:
        raise ValueError(f"shard_base '{choice}' is not one of {list(SHARD_CHOICES)}.")
    if world < 2 or choice == "off":
        if choice == "on" and world < 2:
            logging.warning("Klein LoRA: shard_base 'on' with one process: there is nothing to shard over; "
                            "training with the whole model on this device.")
        return False
    if choice == "on":
        return True
    return card_bytes is not None and weight_bytes > AUTO_SHARE * card_bytes


def weight_bytes(diffusion_model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in diffusion_model.parameters())


def card_bytes(device: torch.device) -> int | None:
    """The memory this process may use on its card (a torch.cuda.set_per_process_memory_fraction cap counts)."""
    if device.type != "cuda":
        return None
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    return int(torch.cuda.get_device_properties(device).total_memory * fraction)


def decide(choice: str, diffusion_model: torch.nn.Module, device: torch.device, ranks) -> bool:
    """should_shard for this launch, as rank 0 sees it, on every rank (all ranks must call it)."""
    wanted = should_shard(choice, ranks.world, weight_bytes(diffusion_model), card_bytes(device))
    return bool(ranks.broadcast(wanted))


def shard_model(diffusion_model: torch.nn.Module, device: torch.device, world: int) -> None:
    """fully_shard every block, then the model (its remaining weights), over a 1-D mesh of all processes.

    The weights may start on the CPU (ComfyUI's loaders leave a model there when it does not fit the card):
    fully_shard moves one block at a time to `device` and keeps this process's shard of it.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fp8 = sorted({str(p.dtype) for p in diffusion_model.parameters() if p.element_size() == 1})
    if fp8 and device.type != "cuda":  # measured: gloo's all-gather stops with "Invalid scalar type" on fp8
        raise ValueError(f"shard_base: the base is loaded as {fp8[0]}, which CPU processes (gloo) cannot all-gather; "
                         "load it with weight_dtype 'default' for CPU runs, or set shard_base to 'off'.")
    mesh = init_device_mesh(device.type, (world,))
    for blocks in (diffusion_model.double_blocks, diffusion_model.single_blocks):
        for block in blocks:
            fully_shard(block, mesh=mesh, reshard_after_forward=True)
            block.register_forward_pre_hook(_private_streams, with_kwargs=True)  # runs after FSDP's own pre-hook
    fully_shard(diffusion_model, mesh=mesh, reshard_after_forward=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    logging.info("Klein LoRA: base weights sharded over %d processes: %.2f GiB of %.2f GiB on this one",
                 world, local_bytes(diffusion_model) / 2**30, weight_bytes(diffusion_model) / 2**30)


def _private_streams(module, args, kwargs):
    """Clones of the residual streams a block receives: ComfyUI's blocks add into them in place (`x += ...`), and
    FSDP's pre-forward hands the block its inputs as views returned by an autograd Function (its post-backward
    hook), which autograd forbids modifying in place."""
    args = tuple(a.clone() if i == 0 and isinstance(a, torch.Tensor) else a for i, a in enumerate(args))
    kwargs = {k: v.clone() if k in ("img", "txt") and isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    return args, kwargs


def local_bytes(diffusion_model: torch.nn.Module) -> int:
    """Bytes of base weights this process holds (its shards, or whole tensors where nothing is sharded)."""
    total = 0
    for p in diffusion_model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size()
    return total
