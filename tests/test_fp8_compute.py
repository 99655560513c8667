"""fp8 products of the frozen base (trainer/model/fp8_compute.py), on the CPU through the emulation: the same
row-wise scaling as torch._scaled_mm with float products. The step's loss and LoRA gradients against the plain
step on the tiny klein, the quantisation maths, tracing without graph breaks, and that the model is put back."""
from __future__ import annotations

import pytest
import torch
from klein_lora_studio.tests.helpers import TRIGGER, write_concept_dataset
from klein_lora_studio.trainer.data import dataset as ds
from klein_lora_studio.trainer.lora.layers import lora_layers
from klein_lora_studio.trainer.model import fp8_compute as fp8
from klein_lora_studio.trainer.model import targets as tg
from klein_lora_studio.trainer.model.checkpointing import block_options, inplace_safe_norms
from klein_lora_studio.trainer.training import loop

# fp8 vs plain step on the tiny klein (fp32 CPU, same LoRA init, noise and sigma). e4m3 keeps 3 mantissa bits
# (rounding <= 6.25% per element), so a product is off by ~3.6% RMS (measured on random data below); the loss,
# dominated by the sampled noise, moves far less. Measured (bf16-or-wider base / fp8-stored base): loss
# 2.5e-4 / 5.8e-5 relative; LoRA gradients, the worst single tensor 9.5% / 5.5%, all of them together 4.6% / 2.8%.
LOSS_RTOL = 3e-3
GRAD_RTOL = 0.15
GRAD_ALL_RTOL = 0.08
# the loss per step over a 3-step run (updates from the fp8 gradients feed the later steps): measured 5.1e-4 at most
LOSS_CURVE_RTOL = 1e-2


def _linear(k: int, n: int, bias: bool = False) -> torch.nn.Linear:
    """A frozen Linear marked the way ComfyUI's ops mark theirs (what apply_base_compute looks for)."""
    import comfy.ops

    lin = comfy.ops.disable_weight_init.Linear(k, n, bias=bias)
    torch.nn.init.normal_(lin.weight, 0, k ** -0.5)
    if bias:
        torch.nn.init.normal_(lin.bias, 0, 0.1)
    return lin.requires_grad_(False)


def test_quantise_rows_scales_each_row_to_e4m3s_top_and_rounds_within_its_mantissa():
    t = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * torch.logspace(-3, 3, 64)[:, None]
    q, s = fp8.quantise_rows(t)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (64, 1)
    assert torch.equal(q.float().abs().amax(-1), torch.full((64,), 448.0))
    normal = q.float().abs() >= 2 ** -6  # e4m3's normal range: 3 mantissa bits, half an ulp is 2^-4 relative
    err = (q.float() * s - t).abs()
    assert (err[normal] <= 2 ** -4 * t.abs()[normal] + 1e-12).all()
    assert (err[~normal] <= 2 ** -10 * s.expand_as(t)[~normal]).all()  # subnormals: absolute steps of 2^-9


@pytest.mark.comfy
@pytest.mark.parametrize("bias", [False, True])
def test_fp8_linear_matches_the_float_product(comfy, bias):
    lin = _linear(256, 768, bias)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 40, 256, generator=g, requires_grad=True)
    out_grad = torch.randn(2, 40, 768, generator=g)
    y0 = lin(x)
    (gx0,) = torch.autograd.grad(y0, x, out_grad)
    y = fp8.Fp8Linear(lin, keep_transpose=True)(x)
    (gx,) = torch.autograd.grad(y, x, out_grad)
    assert (y - y0).norm() <= 0.05 * y0.norm()  # measured 3.6%
    assert (gx - gx0).norm() <= 0.05 * gx0.norm()  # measured 3.7%
    y_t = fp8.Fp8Linear(lin, keep_transpose=False)(x)  # transposed per backward (fp8-stored bases)
    (gx_t,) = torch.autograd.grad(y_t, x, out_grad)
    assert torch.equal(y_t, y) and torch.equal(gx_t, gx)


@pytest.mark.comfy
def test_fp8_linear_traces_into_one_graph_forward_and_backward(comfy):
    """Compile-friendly: dynamo takes the autograd function, the quantisation and the product without a break."""
    layer = fp8.Fp8Linear(_linear(256, 512), keep_transpose=True)
    x = torch.randn(3, 17, 256, requires_grad=True)
    eager = layer(x)
    (g_eager,) = torch.autograd.grad(eager.square().sum(), x)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    (g_compiled,) = torch.autograd.grad(compiled.square().sum(), x)
    assert torch.equal(compiled, eager) and torch.equal(g_compiled, g_eager)


def test_modes_resolve_and_bad_names_are_refused():
    cpu = torch.device("cpu")
    assert fp8.resolve_mode("bf16", cpu) == "bf16"
    assert fp8.resolve_mode("auto", cpu) == ("fp8" if fp8.AUTO_USES_FP8 else "bf16")
    assert fp8.resolve_mode("fp8", cpu) == "fp8"  # the emulation
    with pytest.raises(ValueError, match="base_compute 'fp16' is not one of"):
        fp8.resolve_mode("fp16", cpu)


# ------------------------------------------------------------------ the step on the tiny klein

def _step(unet, data, targets, mode: str):
    """(loss, LoRA grads, fp8 layers swapped in) of one checkpointed step with base_compute `mode`."""
    with torch.inference_mode(False), torch.enable_grad():
        work = loop._training_model(unet)
        dm = work.model.diffusion_model
        with lora_layers(dm, targets.modules, 4, 4, seed=0) as lora, inplace_safe_norms(dm), \
                loop.comfy_training_mode(), fp8.apply_base_compute(dm, mode, work.load_device) as base:
            with torch.no_grad():
                for p in lora.parameters():
                    p.normal_(0, 0.05, generator=torch.Generator().manual_seed(5))  # B is zero at init
            x0, ctx = torch.stack(data.latents[:2]), torch.stack(data.contexts[:2])
            loss = loop.train_step(dm, work, x0, ctx, torch.Generator().manual_seed(9), work.load_device,
                                   work.model.get_dtype_inference(), block_options(dm, True, False),
                                   torch.autocast("cpu", enabled=False))
            return float(loss), [p.grad.clone() for p in lora.parameters()], len(base.swapped)


@pytest.fixture(scope="module")
def data(tiny, base_dir):
    folder = write_concept_dataset(base_dir / "input" / "fp8", n=2, size=64)
    with torch.inference_mode():
        return ds.encode_folder(folder, tiny.vae, tiny.clip, 64, TRIGGER)


def _targets(unet):
    return tg.resolve_targets(tg.GROUPS, "attention", tg.BlockCounts.of_model(unet.model.diffusion_model))


@pytest.mark.comfy
@pytest.mark.parametrize("weight_dtype", ["default", "fp8_e4m3fn"])
def test_fp8_step_matches_the_plain_step(comfy, tiny, data, weight_dtype):
    """bf16-or-wider base (quantised once) and the low-VRAM base ComfyUI stored as fp8 (used as stored)."""
    unet = comfy.UNETLoader().load_unet("klein-tiny.safetensors", weight_dtype)[0]
    targets = _targets(unet)
    before = {k: v.clone() for k, v in unet.model.diffusion_model.state_dict().items()}
    loss0, grads0, none = _step(unet, data, targets, "bf16")
    loss, grads, swapped = _step(unet, data, targets, "fp8")
    dm = unet.model.diffusion_model
    assert none == 0 and swapped == 8 * len(dm.double_blocks) + 2 * len(dm.single_blocks)  # every block linear
    assert loss == pytest.approx(loss0, rel=LOSS_RTOL)
    for a, b in zip(grads, grads0, strict=True):
        assert (a - b).norm() <= GRAD_RTOL * b.norm() + 1e-8
    flat, flat0 = torch.cat([g.flatten() for g in grads]), torch.cat([g.flatten() for g in grads0])
    assert (flat - flat0).norm() <= GRAD_ALL_RTOL * flat0.norm()
    assert any(g.abs().sum() > 0 for g in grads0[0::2]), "A must get a gradient for the comparison to mean anything"
    after = dm.state_dict()
    assert after.keys() == before.keys()
    for k, v in before.items():
        assert after[k].dtype == v.dtype and torch.equal(after[k], v), f"{k} changed"
    assert not any(isinstance(m, fp8.Fp8Linear) for m in dm.modules()), "undo must put ComfyUI's layers back"


def _blocks_of(*linears: torch.nn.Module) -> torch.nn.Module:
    """A stand-in diffusion model holding `linears` in one block (apply_base_compute walks the blocks)."""
    dm = torch.nn.Module()
    dm.double_blocks, dm.single_blocks = torch.nn.ModuleList([torch.nn.Sequential(*linears)]), torch.nn.ModuleList()
    return dm


CUDA_FP8 = pytest.mark.skipif(not torch.cuda.is_available() or fp8.fp8_problem(torch.device("cuda")) is not None,
                              reason="needs a CUDA GPU with fp8 (compute capability 8.9+)")


@pytest.mark.comfy
@CUDA_FP8
def test_gpu_scaled_mm_matches_the_emulation(comfy):
    lin = _linear(3072, 9216).cuda().bfloat16()
    x = torch.randn(4608, 3072, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(4608, 9216, device="cuda", dtype=torch.bfloat16)
    layer = fp8.Fp8Linear(lin, keep_transpose=True)
    y = layer(x)
    (gx,) = torch.autograd.grad(y, x, g)
    cpu = fp8.Fp8Linear(lin.cpu().float(), keep_transpose=True)  # the same quantisation, emulated
    xc = x.detach().cpu().float().requires_grad_(True)
    yc = cpu(xc)
    (gxc,) = torch.autograd.grad(yc, xc, g.cpu().float())
    assert (y.float().cpu() - yc).norm() <= 1e-2 * yc.norm()  # fast accumulation and a bf16 output
    assert (gx.float().cpu() - gxc).norm() <= 1e-2 * gxc.norm()


@pytest.mark.comfy
@CUDA_FP8
def test_gpu_parked_originals_leave_the_card_and_come_back(comfy):
    lin = _linear(3072, 9216).cuda().bfloat16()
    weight, values = lin.weight, lin.weight.detach().clone()
    dm = _blocks_of(lin)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    handle = fp8.apply_base_compute(dm, "fp8", torch.device("cuda"))
    during = torch.cuda.memory_allocated()
    # fp8 weight + its transpose (2 x 28.3 MB) replace the parked bf16 weight (56.6 MB); what is left over is the
    # per-row scales (9216 x 4 B) and the allocator's: measured on an H200 +1,085,440 B (scales + 1 MiB); 4 MiB
    # still tells it from an unparked run (+56.6 MB)
    assert during <= before + 4 * 2**20, f"the bf16 weight was not parked: {during - before} B more on the card"
    handle.undo()
    assert dm.double_blocks[0][0] is lin and lin.weight is weight and lin.weight.is_cuda
    assert torch.equal(lin.weight, values)


@pytest.mark.comfy
def test_train_lora_runs_base_compute_fp8_and_records_it(comfy, tiny, data, base_dir):
    """The loop's wiring: TrainConfig.base_compute 'fp8' trains through the fp8 layers (CPU: the emulation), the
    loss curve stays within LOSS_CURVE_RTOL of bf16 on the same seed, the header says fp8, the model is as before."""
    import safetensors

    unet = tiny.unet()
    dm = unet.model.diffusion_model
    targets = _targets(unet)
    before = {k: v.clone() for k, v in dm.state_dict().items()}
    runs = {}
    for mode in ("bf16", "fp8"):
        cfg = loop.TrainConfig(rank=4, alpha=4, learning_rate=1e-3, steps=3, seed=2, output_name=f"fp8wire_{mode}",
                               base_compute=mode, save_dtype="fp32")
        with torch.inference_mode():
            runs[mode] = loop.train_lora(unet, data, targets, cfg, base_dir / "models" / "loras")
    for a, b in zip(runs["fp8"].losses, runs["bf16"].losses, strict=True):
        assert a == pytest.approx(b, rel=LOSS_CURVE_RTOL)
    with safetensors.safe_open(runs["fp8"].lora_path, "pt") as f:
        assert f.metadata()["base_compute"] == "fp8"
    with safetensors.safe_open(runs["bf16"].lora_path, "pt") as f:
        assert f.metadata()["base_compute"] == "bf16"
    assert not any(isinstance(m, fp8.Fp8Linear) for m in dm.modules())
    for k, v in dm.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"


def test_base_compute_is_checked_with_the_other_settings():
    with pytest.raises(ValueError, match="base_compute 'int8' is not one of"):
        loop.TrainConfig(rank=4, alpha=4, learning_rate=1e-4, steps=1, base_compute="int8").validate()
