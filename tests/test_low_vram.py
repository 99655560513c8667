"""Low-VRAM mode: fp8-stored base weights (ComfyUI's own UNETLoader weight_dtype), gradient checkpointing and
torchao's 8-bit AdamW train the same LoRA as the full-precision run, within a stated tolerance."""
from __future__ import annotations

import pytest
import safetensors
import torch
from klein_lora_studio.trainer.model import targets as tg
from klein_lora_studio.trainer.training import loop, resume

pytestmark = pytest.mark.comfy
pytest.importorskip("torchao")

STEPS = 12
# Loss per step, fp8 base + 8-bit moments vs fp32 base + AdamW, same seed: the per-step loss is dominated by
# the sampled noise and sigma (identical in both), so the curves differ only by the base's quantisation error
# and the moments' rounding. Measured on the tiny model: max relative difference 0.42%.
LOSS_RTOL = 0.03


@pytest.fixture(scope="module")
def setup(encoded):
    """The encoded set-up; its targets (checked against the tiny model's linears) name the fp8 model's too."""
    return encoded("lowvram", n=4, size=64, groups=tg.GROUPS, layers="attention", all_linears=True)


def _train(unet, setup, base_dir, name: str, low_vram: bool, steps: int = STEPS, save_every: int = 0,
           resume_from: str = ""):
    # rank 16 on the tiny model's 256-wide layers: 4096-element A matrices, large enough for 8-bit moments
    cfg = loop.TrainConfig(rank=16, alpha=16, learning_rate=1e-3, steps=steps, seed=4, output_name=name,
                           low_vram=low_vram, save_every=save_every, resume_from=resume_from, save_dtype="fp32")
    with torch.inference_mode():
        return loop.train_lora(unet, setup.data, setup.targets, cfg, base_dir / "models" / "loras")


@pytest.fixture(scope="module")
def runs(comfy, setup, base_dir):
    fp8 = comfy.UNETLoader().load_unet("klein-tiny.safetensors", "fp8_e4m3fn")[0]
    before = {k: v.clone() for k, v in fp8.model.diffusion_model.state_dict().items()}
    low = _train(fp8, setup, base_dir, "lowvram", True, save_every=6)
    full = _train(setup.unet, setup, base_dir, "fullvram", False)
    return dict(fp8=fp8, before=before, low=low, full=full)


def test_fp8_weights_stay_fp8_and_unchanged(runs):
    after = runs["fp8"].model.diffusion_model.state_dict()
    linear = "single_blocks.0.linear1.weight"
    assert after[linear].dtype == torch.float8_e4m3fn, "the base must be stored in fp8 for the memory saving"
    for k, v in runs["before"].items():
        assert torch.equal(after[k].float(), v.float()), f"{k} changed"


def test_low_vram_run_records_its_settings(runs):
    low = runs["low"]
    with safetensors.safe_open(str(low.lora_path), "pt") as f:
        meta = f.metadata()
    assert meta["low_vram"] == "true" and meta["optimizer"] == "AdamW8bit"
    assert meta["gradient_checkpointing"] == "true" and meta["base_weight_dtype"] == "float8_e4m3fn"
    state = resume.load_state(resume.list_states(low.lora_path.parent / f"{low.run_name}_checkpoints",
                                                 low.run_name)[-1])
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert any(type(m).__name__ == "OptimState8bit" for m in moments), "low_vram must keep 8-bit AdamW moments"


def test_loss_curve_matches_full_precision(runs):
    low, full = runs["low"].losses, runs["full"].losses
    assert len(low) == len(full) == STEPS
    rel = [abs(a - b) / b for a, b in zip(low, full, strict=True)]
    assert max(rel) < LOSS_RTOL, f"fp8 + 8-bit vs fp32 loss differs by up to {max(rel):.3%}"
    assert low[0] != full[0], "the fp8 base must actually differ from the fp32 one"


def test_lora_learns_like_full_precision(runs):
    low, full = runs["low"].lora, runs["full"].lora
    ups = [k for k in full if k.endswith("lora_up.weight") or k.endswith("lora_B.weight")]
    assert ups, sorted(full)[:4]
    for k in ups:
        a, b = low[k].float(), full[k].float()
        assert b.norm() > 0, f"{k} did not train"
        cos = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
        assert cos > 0.9, f"{k}: the low-VRAM update points elsewhere (cosine {cos:.3f})"


def test_low_vram_resumes_exactly(comfy, setup, base_dir, runs):
    """8-bit optimizer states survive the training-state file: 6 + resume + 6 == the 12-step run."""
    fp8 = comfy.UNETLoader().load_unet("klein-tiny.safetensors", "fp8_e4m3fn")[0]
    ckpt = runs["low"].checkpoints[0].name
    resumed = _train(fp8, setup, base_dir, "lowvram", True, save_every=6, resume_from=ckpt)
    assert resumed.losses == runs["low"].losses
    for k, v in runs["low"].lora.items():
        assert torch.equal(resumed.lora[k], v), k


def test_switching_low_vram_on_resume_is_a_clear_error(tiny, setup, base_dir, runs):
    ckpt = runs["low"].checkpoints[0].name
    with pytest.raises(ValueError, match="low_vram"):
        _train(tiny.unet(), setup, base_dir, "lowvram", False, save_every=6, resume_from=ckpt)


def test_fp8_matmul_models_train_uncompiled_with_the_reason(comfy, caplog):
    """fp8_e4m3fn_fast models (ComfyUI's fp8 matmul ops) fail inside torch.compile with gradients (measured on
    an H200, bench/check_fp8_fast.py): 'auto' trains them uncompiled and says why; 'on' is a clear error."""
    import comfy.ops

    fast = torch.nn.Sequential(comfy.ops.fp8_ops.Linear(16, 16))
    plain = torch.nn.Sequential(comfy.ops.manual_cast.Linear(16, 16))
    assert loop.uses_fp8_matmuls(fast) and not loop.uses_fp8_matmuls(plain)
    assert loop.resolve_compile("auto", "cuda", True, False) is True
    assert loop.resolve_compile("auto", "cpu", True, False) is False
    with caplog.at_level("WARNING"):
        assert loop.resolve_compile("auto", "cuda", True, True) is False
    assert "fp8_e4m3fn_fast" in caplog.text
    with pytest.raises(ValueError, match="fp8_e4m3fn_fast"):
        loop.resolve_compile("on", "cuda", True, True)
    assert loop.resolve_compile("off", "cuda", True, True) is False
