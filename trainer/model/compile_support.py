"""Whether torch.compile can run on the training device, asked before the first step instead of failing in it.

On a GPU torch.compile generates Triton kernels: the Windows portable ComfyUI (what most users run) ships
no Triton, and Triton needs CUDA compute capability 7.0 or newer. The probe uses what inductor itself
checks (the Triton package, then torch's device interface), so 'auto' trains eagerly where inductor would
fail, and 'on' is refused with the reason.
"""
from __future__ import annotations

import importlib.util
import logging

import torch

NO_TRITON = ("Triton is not installed, and torch.compile needs it on the GPU (the Windows portable ComfyUI has "
             "none: `python_embeded\\python.exe -m pip install triton-windows` adds it)")


def _has_triton_package() -> bool:
    try:
        return importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError):  # a module hidden or broken in sys.modules
        return False


def compile_problem(device: torch.device) -> str | None:
    """Why torch.compile cannot run on `device`, or None when it can (the CPU: inductor's C++ backend)."""
    if device.type == "cpu":
        return None
    if not _has_triton_package():
        return NO_TRITON
    from torch._dynamo.device_interface import get_interface_for_device

    try:
        interface = get_interface_for_device(device)
    except NotImplementedError:
        return f"torch.compile has no backend for {device.type} devices"
    if not interface.is_triton_capable(device):
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        return f"the GPU ({name}) is older than Triton supports (CUDA compute capability 7.0 or newer)"
    try:
        interface.raise_if_triton_unavailable(device)
    except Exception as e:  # noqa: BLE001 - TritonUnavailableError and kin: any of them means no compile
        return f"Triton cannot run on {device}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
    return None


def usable(choice: str, device: torch.device, wanted: bool) -> bool:
    """`wanted` (the compile decision for the model) where torch.compile can run; else 'auto' trains eagerly
    with a one-line notice and 'on' is a clear error."""
    if not wanted:
        return False
    problem = compile_problem(device)
    if problem is None:
        return True
    if choice == "on":
        raise ValueError(f"compile_blocks 'on': {problem}. Set compile_blocks to 'auto' (trains uncompiled here) "
                         "or 'off'.")
    logging.warning("Klein LoRA: %s; training uncompiled (compile_blocks 'auto').", problem)
    return False
