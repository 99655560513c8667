"""One SDPA backend for a whole run: the fastest that can run klein's attention on the card, the same in the
forward and in the recompute of gradient checkpointing.

ComfyUI calls SDPA through `comfy.ops.scaled_dot_product_attention`, which enters
`sdpa_kernel(comfy.ops.SDPA_BACKEND_PRIORITY, set_priority=True)` on every call (large inputs) and reads
that module-level list when it does: the list is ComfyUI's own switch for the backend order, and it puts
FLASH_ATTENTION before CUDNN_ATTENTION. Measured on an H200 at klein 4B 1024² (4,608 tokens, 24 heads x 128):
cuDNN 654 TFLOP/s forward / 566 forward+backward, FlashAttention-2 298 / 292 (CUDNN first: 0.206 -> 0.173
s/step). On an H100 at 512² a checkpointed forward ran on cuDNN and its recompute on flash (saved logsumexp
[B,H,L,1] vs [B,H,L]: CheckpointError), so a priority list with several fused backends is not enough.

`pinned_attention` sets that list to the one chosen backend (math behind it for inputs it cannot take) for the
run and enables only those in torch's global SDPA flags, which also cover ComfyUI's small-input path (it calls
SDPA outside its own context). The flags are process-wide, so backward's recompute (inside loss.backward(),
inside the context) sees the same choice. Nothing of ComfyUI's attention code is replaced.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

# sm90+ (Hopper, Blackwell): cuDNN first (measured above); older cards keep ComfyUI's flash-first order
ORDER_SM90 = (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
ORDER_OLDER = (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION)
PROBE_TOKENS = (1536, 4608)  # klein at 512² and 1024² with 512 text tokens (1536: the H100 CheckpointError case)


def _usable(backend: SDPBackend, params) -> bool:
    check = {SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.can_use_cudnn_attention,
             SDPBackend.FLASH_ATTENTION: torch.backends.cuda.can_use_flash_attention,
             SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.can_use_efficient_attention}[backend]
    try:
        return bool(check(params, False))
    except RuntimeError:
        return False


@cache
def choose_backend(device: torch.device, dtype: torch.dtype, heads: int, head_dim: int = 128,
                   tokens: tuple[int, ...] = PROBE_TOKENS) -> SDPBackend:
    """The fastest fused backend torch's own checks accept for these shapes, with and without gradients (so the
    choice cannot depend on whether a call records a graph), at every probed length; MATH on the CPU."""
    if device.type != "cuda":
        return SDPBackend.MATH
    order = ORDER_SM90 if torch.cuda.get_device_capability(device)[0] >= 9 else ORDER_OLDER
    with torch.no_grad():
        probes = [torch.empty(1, heads, n, head_dim, device=device, dtype=dtype) for n in tokens]
    for backend in order:
        ok = True
        for q in probes:
            for grad in (True, False):
                t = q.detach().requires_grad_(grad)
                ok = ok and _usable(backend, torch.backends.cuda.SDPAParams(t, t, t, None, 0.0, False, False))
        if ok:
            return backend
    return SDPBackend.MATH


def model_heads(diffusion_model: torch.nn.Module) -> tuple[int, int]:
    """(heads, head dim) of a ComfyUI flux model."""
    heads = int(diffusion_model.num_heads)
    return heads, int(diffusion_model.hidden_size) // heads


@contextmanager
def pinned_attention(backend: SDPBackend) -> Iterator[SDPBackend]:
    """Every SDPA call inside runs on `backend` (MATH where it cannot take the inputs); reset on exit."""
    import comfy.ops

    allowed = [backend] if backend == SDPBackend.MATH else [backend, SDPBackend.MATH]
    priority = getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None)  # only defined on CUDA builds of torch
    saved = list(priority) if priority is not None else None
    if priority is not None:
        priority[:] = allowed
    try:
        with sdpa_kernel(allowed, set_priority=True):
            yield backend
    finally:
        if saved is not None:
            priority[:] = saved


def run_attention(diffusion_model: torch.nn.Module, device: torch.device, dtype: torch.dtype):
    """The entry point for training and sampling: the context pinning this model's best backend on `device`."""
    heads, head_dim = model_heads(diffusion_model)
    backend = choose_backend(device, dtype, heads, head_dim)
    logging.info("Klein LoRA: attention on %s for the run (%d heads x %d)", backend.name, heads, head_dim)
    return pinned_attention(backend)
