"""The fast paths compute the same step: checkpointing and compiled blocks give the plain step's loss and
gradients within bf16 tolerance (all under bf16 autocast on the CPU, the GPU's mixed precision)."""
from __future__ import annotations

import pytest
import torch
from klein_lora_studio.trainer.lora.layers import lora_layers
from klein_lora_studio.trainer.model import targets as tg
from klein_lora_studio.trainer.model.checkpointing import block_options, inplace_safe_norms
from klein_lora_studio.trainer.training import loop

pytestmark = pytest.mark.comfy


def _step(unet, data, targets, recompute: bool, compiled: bool):
    with torch.inference_mode(False), torch.enable_grad():
        work = loop._training_model(unet)
        dm = work.model.diffusion_model
        with lora_layers(dm, targets.modules, 4, 4, seed=0) as lora, \
                inplace_safe_norms(dm), \
                loop.comfy_training_mode(), loop._dynamo_limits(compiled):
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in lora.parameters():
                    p.normal_(0, 0.05, generator=g)  # B is zero at init: give A a gradient too
            opts = block_options(dm, recompute, compiled)
            x0 = torch.stack(data.latents[:2])
            ctx = torch.stack(data.contexts[:2])
            loss = loop.train_step(dm, work, x0, ctx, torch.Generator().manual_seed(9), work.load_device,
                                   work.model.get_dtype(), opts, torch.autocast("cpu", dtype=torch.bfloat16))
            return float(loss), [p.grad.clone() for p in lora.parameters()]


@pytest.fixture(scope="module")
def setup(encoded):
    enc = encoded("fast", n=2, size=64, groups=tg.GROUPS, layers="attention_mlp")
    return enc.unet, enc.data, enc.targets, _step(enc.unet, enc.data, enc.targets, False, False)


CPU_AUTOCAST_NORMS = ("CPU autocast keeps LayerNorm inputs in bf16, so the traced in-place residual add fails there; "
                      "CUDA autocast saves an fp32 copy. Checked on the GPU: bench/RESULTS.md, compiled vs eager.")


@pytest.mark.parametrize("recompute,compiled", [
    (True, False), (True, True), pytest.param(False, True, marks=pytest.mark.skip(reason=CPU_AUTOCAST_NORMS))])
def test_fast_paths_match_the_plain_step(setup, recompute, compiled):
    unet, data, targets, (loss0, grads0) = setup
    loss, grads = _step(unet, data, targets, recompute, compiled)
    assert loss == pytest.approx(loss0, rel=1e-2)  # bf16 autocast, as on the GPU
    for a, b in zip(grads, grads0, strict=True):
        assert (a - b).norm() <= 3e-2 * b.norm() + 1e-6
    assert any(g.abs().sum() > 0 for g in grads0[0::2]), "A must get a gradient for the comparison to mean anything"
