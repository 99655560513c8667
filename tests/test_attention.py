"""One SDPA backend for forward and recompute (trainer/model/attention.py).

CPU: the tiny klein's checkpointed step, through ComfyUI's SDPA attention as on CUDA, records which SDPA
kernel each attention call ran, in the forward and in backward's recompute; under pinned_attention both are
the pinned one (math, and CPU flash to show that the pin is what decides), and a backend that changes between
the two is the CheckpointError seen on an H100.
GPU (skipped without CUDA): the 512² checkpointed case that failed on an H100, at klein 4B's attention width.
"""
from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from klein_lora_studio.tests.helpers import TRIGGER, write_concept_dataset
from klein_lora_studio.trainer.data import dataset as ds
from klein_lora_studio.trainer.lora.layers import lora_layers
from klein_lora_studio.trainer.model import attention
from klein_lora_studio.trainer.model import targets as tg
from klein_lora_studio.trainer.model.checkpointing import block_options, inplace_safe_norms
from klein_lora_studio.trainer.training import loop, objective
from torch.nn.attention import SDPBackend
from torch.utils._python_dispatch import TorchDispatchMode

pytestmark = pytest.mark.comfy


class KernelLog(TorchDispatchMode):
    """The SDPA kernel of each attention call: the fused ones are aten ops of their own (CPU flash too), math
    decomposes into _safe_softmax (klein's blocks have no other softmax)."""

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__
        fused = next((k for k in ("cudnn", "flash", "efficient") if f"_{k}_attention" in name), None)
        if fused and "backward" not in name:
            self.calls.append(fused)
        elif name.startswith("_safe_softmax") or name.startswith("_softmax.default"):
            self.calls.append("math")
        return func(*args, **(kwargs or {}))


def _pytorch_attention(func, *args, **kwargs):
    from comfy.ldm.modules.attention import get_attention_function

    return get_attention_function("pytorch")(*args, **kwargs)


# ComfyUI's own switch (wrap_attn) to its SDPA attention, which it picks on CUDA; on the CPU it picks sub-quadratic
SDPA_ON_CPU = {"optimized_attention_override": _pytorch_attention}


def _pin(backend: SDPBackend | None):
    return attention.pinned_attention(backend) if backend else nullcontext()


def _checkpointed_step(unet, data, targets, backend: SDPBackend | None, recompute_on: SDPBackend | None = None):
    """(forward kernels, recompute kernels, loss, LoRA grads) of one checkpointed step with `backend` pinned
    (None: torch's default); `recompute_on`: another backend for backward (what the H100 did by itself)."""
    with torch.inference_mode(False), torch.enable_grad():
        work = loop._training_model(unet)
        dm = work.model.diffusion_model
        with lora_layers(dm, targets.modules, 4, 4, seed=0) as lora, inplace_safe_norms(dm), \
                loop.comfy_training_mode():
            with torch.no_grad():
                for p in lora.parameters():
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))
            opts = {**block_options(dm, recompute=True, compile_blocks=False), **SDPA_ON_CPU}
            x0, ctx = torch.stack(data.latents[:1]), torch.stack(data.contexts[:1])
            sigma = torch.full((1,), 0.6)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3))
            xt, target = objective.noisy_input(x0, noise, sigma)
            fwd, rec = KernelLog(), KernelLog()
            with _pin(backend), fwd:
                pred = dm(xt, work.model.model_sampling.timestep(sigma).float(), ctx, transformer_options=opts)
            loss = objective.flow_loss(pred, target)
            with _pin(recompute_on or backend), rec:
                loss.backward()
            return fwd.calls, rec.calls, float(loss.detach()), [p.grad.clone() for p in lora.parameters()]


@pytest.fixture(scope="module")
def setup(tiny, base_dir):
    folder = write_concept_dataset(base_dir / "input" / "attn", n=1, size=64)
    with torch.inference_mode():
        data = ds.encode_folder(folder, tiny.vae, tiny.clip, 64, TRIGGER)
    unet = tiny.unet()
    targets = tg.resolve_targets(tg.GROUPS, "attention", tg.BlockCounts.of_model(unet.model.diffusion_model))
    return unet, data, targets


def test_cpu_choice_is_math():
    assert attention.choose_backend(torch.device("cpu"), torch.float32, 2) == SDPBackend.MATH


@pytest.mark.parametrize("backend,kernel", [(SDPBackend.MATH, "math"), (SDPBackend.FLASH_ATTENTION, "flash")])
def test_forward_and_recompute_run_the_pinned_backend(setup, backend, kernel):
    unet, data, targets = setup
    fwd, rec, loss, grads = _checkpointed_step(unet, data, targets, backend)
    blocks = len(unet.model.diffusion_model.double_blocks) + len(unet.model.diffusion_model.single_blocks)
    assert fwd == [kernel] * blocks, fwd  # one attention per block, all on the pinned kernel
    assert rec == fwd, "the recompute must run the forward's kernel"


def test_pin_is_restored_and_comfy_list_untouched_after(setup):
    import comfy.ops

    before = list(getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", []))
    flags = (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    with attention.pinned_attention(SDPBackend.MATH):
        assert not torch.backends.cuda.flash_sdp_enabled()
    assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()) == flags
    assert list(getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", [])) == before


def test_backend_changing_in_recompute_is_the_checkpoint_error(setup):
    """What the pin prevents: forward on one kernel, recompute on another (the H100's 512² failure)."""
    unet, data, targets = setup
    with pytest.raises(torch.utils.checkpoint.CheckpointError):
        _checkpointed_step(unet, data, targets, SDPBackend.FLASH_ATTENTION, recompute_on=SDPBackend.MATH)


def test_pinned_math_step_equals_the_default_step(setup):
    """Pinning changes which kernel runs, not the result: the CPU default (flash) and pinned math agree."""
    unet, data, targets = setup
    _, _, loss0, grads0 = _checkpointed_step(unet, data, targets, None)
    _, _, loss, grads = _checkpointed_step(unet, data, targets, SDPBackend.MATH)
    assert loss == pytest.approx(loss0, rel=1e-5)
    for a, b in zip(grads, grads0, strict=True):
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: the H100's 512² checkpointing case")
def test_gpu_512_checkpointed_step_at_klein4b_width(comfy):
    """klein 4B's attention (24 heads x 128) at 512² (1,024 image + 512 text tokens), bf16 under autocast,
    checkpointed per block: the shapes that raised CheckpointError on an H100 under ComfyUI's flash-first list.
    One double and one single block of the real width (random weights) keep it small."""
    from klein_lora_studio.devtools.tiny_models import flux2_module

    device = torch.device("cuda")
    dm = flux2_module(3072, 1, 1, 7680, device=device, dtype=torch.bfloat16).requires_grad_(False)
    targets = tg.resolve_targets(tg.GROUPS, "attention", tg.BlockCounts.of_model(dm))
    backend = attention.choose_backend(device, torch.bfloat16, 24, 128)
    if torch.cuda.get_device_capability()[0] >= 9:
        assert backend == SDPBackend.CUDNN_ATTENTION, "cuDNN is the fast kernel on Hopper/Blackwell (H200: 2.2x flash)"
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 128, 32, 32, device=device, generator=g)
    ctx = torch.randn(1, 512, 7680, device=device, generator=g)
    with torch.inference_mode(False), torch.enable_grad(), lora_layers(dm, targets.modules, 32, 32) as lora, \
            loop.comfy_training_mode(), attention.run_attention(dm, device, torch.bfloat16):
        opts = {**block_options(dm, recompute=True, compile_blocks=False), **SDPA_ON_CPU}  # the tests' ComfyUI is --cpu
        logs = []
        for _ in range(2):  # the H100 failed on the first backward; a second step checks nothing sticks
            fwd, rec = KernelLog(), KernelLog()
            with fwd, torch.autocast("cuda", dtype=torch.bfloat16):
                pred = dm(x.bfloat16(), torch.full((1,), 600.0, device=device), ctx.bfloat16(), transformer_options=opts)
            loss = pred.float().square().mean()
            with rec:
                loss.backward()  # CheckpointError here was the bug
            logs.append((fwd.calls, rec.calls))
        grads = [p.grad for p in lora.parameters()]
    kernel = {SDPBackend.CUDNN_ATTENTION: "cudnn", SDPBackend.FLASH_ATTENTION: "flash",
              SDPBackend.EFFICIENT_ATTENTION: "efficient", SDPBackend.MATH: "math"}[backend]
    for fwd_calls, rec_calls in logs:
        assert fwd_calls == [kernel, kernel], fwd_calls  # one attention per block, on the chosen kernel
        assert rec_calls == fwd_calls
    assert torch.isfinite(loss)
    assert all(gr is not None and torch.isfinite(gr).all() for gr in grads)
    assert any(gr.abs().sum() > 0 for gr in grads)
