"""fp8 products for the frozen base: the forward and activation-gradient GEMMs of the blocks' linears in
float8 e4m3, row-wise scaled, through `torch._scaled_mm`; the LoRA layers stay in bf16/fp32 beside them.

Measured on an H200 at klein's shapes: bf16 GEMMs 745-822 TFLOP/s, the same products in fp8 (row-wise scaled,
operands already quantised) 1,195-1,375; quantising the activation in separate unfused kernels lost most of
it (381-1,025), so the quantisation here is plain torch code that the compiled blocks fuse into the
neighbouring kernels (uncompiled on CUDA it runs through a small torch.compile'd function instead).

Why not torchao's float8 training (0.18, `convert_to_float8_training`): its `Float8Linear` always computes the
weight gradient (a third GEMM per linear that a frozen base does not need), saves the bf16 input and weight for
backward, re-quantises the weight on every forward and again for grad_input, and needs bf16 weights (it cannot
take a base ComfyUI stored as fp8). Here the weight is quantised once per run (or used as ComfyUI stored it),
backward computes only grad_input, and nothing but the quantised weight is kept for it.

Scaling: x ≈ x8 * sx (one scale per token row), W ≈ W8 * sw (one per output row), so y = (x8 @ W8ᵀ) * sx * swᵀ
is exactly what `_scaled_mm`'s row-wise mode computes. For grad_input = g @ W the weight's row scales lie
along the contraction, so they are folded into g first (g * swᵀ, fused), which is then quantised per row; W8
is used unscaled. Gradients are quantised to e4m3 too: with a scale per row the largest value of each row sits
at 448, so e5m2's extra exponent range buys nothing and its 2-bit mantissa would double the rounding error
(torchao's row-wise recipe makes the same choice); the product accumulates in fp32 (no fast accumulation).

`torch._scaled_mm` runs on CUDA only (compute capability 8.9+); elsewhere `scaled_mm` does the same
scaling with a float matmul (the emulation the CPU tests check against the plain step).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cache

import torch

from ..training.config import BASE_COMPUTE_CHOICES as MODES

E4M3 = torch.float8_e4m3fn
# 'auto' stays bf16 until the micro-world quality check of issue 17 holds for fp8 (loss curves within 1% per
# step on the GPU and the fp8 LoRA's score within run-to-run noise of the bf16 one); then: fp8 where supported.
AUTO_USES_FP8 = False


def quantise_rows(t: torch.Tensor, dtype: torch.dtype = E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """(t8, scale [rows, 1] fp32) with t ≈ t8 * scale, one scale per row of the 2-D `t`."""
    top = torch.finfo(dtype).max
    amax = t.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12)
    scale = amax / top
    return (t.float() / scale).clamp(-top, top).to(dtype), scale


@cache
def _compiled_quantise():
    return torch.compile(quantise_rows, dynamic=True)


def _quantise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantise_rows, fused: traced into the compiled blocks, else through its own compiled kernel on CUDA."""
    if t.is_cuda and not torch.compiler.is_compiling() and _fused_quantise_ok():
        return _compiled_quantise()(t)
    return quantise_rows(t)


@cache
def _fused_quantise_ok() -> bool:
    from .compile_support import compile_problem

    return compile_problem(torch.device("cuda")) is None


def scaled_mm(a8: torch.Tensor, scale_a: torch.Tensor, b8: torch.Tensor, scale_b: torch.Tensor,
              out_dtype: torch.dtype, fast_accum: bool = False) -> torch.Tensor:
    """(a8 * scale_a) @ (b8 * scale_b) for a8 [M, K] (scale [M, 1]) and a column-major b8 [K, N] (scale [1, N])."""
    if a8.is_cuda:
        return torch._scaled_mm(a8, b8, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype,
                                use_fast_accum=fast_accum)
    return ((a8.float() * scale_a) @ (b8.float() * scale_b)).to(out_dtype)


class _Fp8Product(torch.autograd.Function):
    """y = x @ Wᵀ with W given as (w8 [N, K], w_scale [1, N], w8_t [K, N] row-major or None); no weight gradient."""

    @staticmethod
    def forward(ctx, x2, w8, w_scale, w8_t, out_dtype):
        x8, sx = _quantise(x2)
        ctx.save_for_backward(w8, w_scale, w8_t)
        ctx.out_dtype = x2.dtype
        return scaled_mm(x8, sx, w8.t(), w_scale, out_dtype, fast_accum=True)

    @staticmethod
    def backward(ctx, g):
        w8, w_scale, w8_t = ctx.saved_tensors
        g8, sg = _quantise(g.float() * w_scale)
        mat2 = (w8_t if w8_t is not None else w8.t().contiguous()).t()  # W8 [N, K] in column-major layout
        ones = torch.ones(1, w8.shape[1], device=g.device, dtype=torch.float32)
        return scaled_mm(g8, sg, mat2, ones, ctx.out_dtype), None, None, None, None


class Fp8Linear(torch.nn.Module):
    """Stands in for one frozen ComfyUI Linear during a run: its weight quantised once, its product in fp8."""

    def __init__(self, base: torch.nn.Linear, keep_transpose: bool):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        w = base.weight.detach()
        if type(w) is not torch.Tensor:  # ComfyUI's QuantizedTensor (scaled fp8 checkpoints): its true values
            w = w.dequantize()
        if w.dtype == E4M3:  # ComfyUI's weight_dtype fp8_e4m3fn: the stored values, unscaled (W = W8 exactly)
            w8, scale = w, torch.ones(w.shape[0], 1, device=w.device, dtype=torch.float32)
        else:
            w8, scale = quantise_rows(w)
        self.register_buffer("w8", w8, persistent=False)
        self.register_buffer("w_scale", scale.reshape(1, -1).contiguous(), persistent=False)
        self.register_buffer("w8_t", w8.t().contiguous() if keep_transpose else None, persistent=False)
        bias = base.bias.detach() if base.bias is not None else None
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        if not dtype.is_floating_point or dtype.itemsize == 1:
            dtype = torch.bfloat16
        x2 = x.reshape(-1, x.shape[-1]).to(dtype)
        w8, w_scale, w8_t, bias = self.w8, self.w_scale, self.w8_t, self.bias
        if w8.device != x.device:  # a streamed block between its uses (offload_blocks): copied for this call alone
            w8, w_scale, w8_t, bias = (t.to(x.device) if t is not None else None for t in (w8, w_scale, w8_t, bias))
        y = _Fp8Product.apply(x2, w8, w_scale, w8_t, dtype)
        if bias is not None:
            y = y + bias.to(dtype)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 row-wise"


def fp8_problem(device: torch.device) -> str | None:
    """Why fp8 products cannot run on `device` (None: they can; the CPU runs the emulation)."""
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"fp8 products need an NVIDIA GPU; this run is on {device.type}"
    if torch.cuda.get_device_capability(device) < (8, 9):
        return (f"fp8 products need an NVIDIA GPU of compute capability 8.9 or newer (Ada, Hopper, Blackwell); "
                f"{torch.cuda.get_device_name(device)} is {'.'.join(map(str, torch.cuda.get_device_capability(device)))}")
    try:  # the row-wise mode itself, on a small product: some builds lack it on some cards
        a8, sa = quantise_rows(torch.ones(16, 32, device=device))
        b8, sb = quantise_rows(torch.ones(16, 32, device=device))
        scaled_mm(a8, sa, b8.t(), sb.reshape(1, -1), torch.bfloat16)
    except RuntimeError as e:
        return f"torch._scaled_mm (row-wise) fails on this GPU: {str(e).splitlines()[0] if str(e) else e!r}"
    return None


def resolve_mode(mode: str, device: torch.device) -> str:
    """'bf16' or 'fp8' for `base_compute` `mode` on `device`: 'fp8' where it cannot run is a clear error."""
    if mode not in MODES:
        raise ValueError(f"base_compute '{mode}' is not one of {list(MODES)}.")
    if mode == "bf16" or (mode == "auto" and not AUTO_USES_FP8):
        return "bf16"
    problem = fp8_problem(device)
    if problem is None:
        return "fp8"
    if mode == "fp8":
        raise ValueError(f"base_compute 'fp8': {problem}. Set base_compute to 'auto' or 'bf16'.")
    return "bf16"


def _eligible(module: torch.nn.Module) -> bool:
    """A ComfyUI Linear whose frozen product fp8 can take: sizes _scaled_mm accepts, no patches to apply."""
    return (isinstance(module, torch.nn.Linear) and hasattr(module, "comfy_cast_weights")
            and module.weight is not None and not module.weight.requires_grad
            and module.in_features % 16 == 0 and module.out_features % 16 == 0
            and not getattr(module, "weight_function", None) and not getattr(module, "bias_function", None))


@dataclass
class BaseCompute:
    """What `apply_base_compute` changed, to put back: (parent, attribute, original Linear) per swapped layer."""

    mode: str
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Module]] = field(default_factory=list)
    parked: list[tuple[torch.nn.Parameter, torch.device]] = field(default_factory=list)

    def undo(self) -> None:
        for p, device in self.parked:
            p.data = p.data.to(device)
        for parent, name, original in reversed(self.swapped):
            setattr(parent, name, original)
        self.swapped, self.parked = [], []

    def __enter__(self) -> BaseCompute:
        return self

    def __exit__(self, *exc) -> None:
        self.undo()


def apply_base_compute(diffusion_model: torch.nn.Module, mode: str, device: torch.device,
                       park_originals: bool | None = None) -> BaseCompute:
    """Run the frozen linears of the blocks in `mode` ('auto' | 'bf16' | 'fp8') until `undo()`.

    Call it after the LoRA layers are injected (it swaps the layer peft wraps, `base_layer`, and must be undone
    before peft unloads). `park_originals` (default: on CUDA, for weights of 2+ bytes) moves the original weights
    to CPU memory while the run needs only the fp8 copies, so fp8 costs no GPU memory over bf16.
    """
    handle = BaseCompute(resolve_mode(mode, device))
    if handle.mode != "fp8":
        return handle
    if device.type == "cpu":
        logging.info("Klein LoRA: base_compute fp8 on the CPU is an emulation (the same scaling, float products).")
    park = device.type == "cuda" if park_originals is None else park_originals
    blocks = [b for group in (diffusion_model.double_blocks, diffusion_model.single_blocks) for b in group]
    for block in blocks:
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if not _eligible(child):
                    continue
                stored_fp8 = child.weight.dtype.itemsize == 1
                setattr(parent, name, Fp8Linear(child, keep_transpose=not stored_fp8))
                handle.swapped.append((parent, name, child))
                if park and not stored_fp8 and child.weight.device.type != "cpu":
                    handle.parked.append((child.weight, child.weight.device))
                    child.weight.data = child.weight.data.to("cpu")
    logging.info("Klein LoRA: base products in fp8 (e4m3, row-wise scaled) for %d linears", len(handle.swapped))
    return handle
