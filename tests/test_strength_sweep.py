"""The strength sweep: a grid of weight pairs whose cells are what the exact merge at those weights gives."""
from __future__ import annotations

import pytest
import safetensors.torch
import torch
from klein_lora_studio.tests import lora_kit
from klein_lora_studio.trainer.evaluation import sampling as sp
from klein_lora_studio.trainer.lora import formats as lora_formats
from klein_lora_studio.trainer.lora import merge as lora_merge

pytestmark = pytest.mark.comfy


@pytest.fixture(scope="module")
def two_loras(tiny, base_dir):
    folder = base_dir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in (("sweep_a", 11), ("sweep_b", 12)):
        safetensors.torch.save_file(lora_kit.bfl_sd(lora_kit.random_lora(seed), alpha=4.0), str(folder / f"{name}.safetensors"))
    return folder


def test_parse_strengths():
    assert sp.parse_strengths("0.25, 0.5;1") == [0.25, 0.5, 1.0]
    with pytest.raises(ValueError, match="'x' is not a number"):
        sp.parse_strengths("0.5, x")
    with pytest.raises(ValueError, match="strengths is empty"):
        sp.parse_strengths(" , ")


def test_sweep_cell_equals_the_exact_merge_at_those_weights(comfy, tiny, two_loras):
    import comfy.sd as comfy_sd

    torch.set_num_threads(1)
    unet = tiny.unet()
    settings = sp.SampleSettings(steps=2, cfg=4.0, seed=3, width=64, height=64)
    a = lora_formats.load_lora_file(two_loras / "sweep_a.safetensors")
    b = lora_formats.load_lora_file(two_loras / "sweep_b.safetensors")
    sd_a, sd_b = lora_formats.to_comfy_state_dict(a), lora_formats.to_comfy_state_dict(b)
    conds = sp.encode_prompts(tiny.clip, [sp.SuitePrompt("p", "p", "kln_style, a woman", True)])
    with torch.inference_mode():
        both, _ = comfy_sd.load_lora_for_models(unet, None, sd_a, 0.5, 0)
        both, _ = comfy_sd.load_lora_for_models(both, None, sd_b, 1.0, 0)
        cell = sp.sample_latents(both, *conds, settings)[0]
        merged = lora_formats.to_comfy_state_dict(lora_merge.exact_merge([a, b], [0.5, 1.0]))
        via_merge = sp.sample_latents(comfy_sd.load_lora_for_models(unet, None, merged, 1.0, 0)[0], *conds, settings)[0]
        base = sp.sample_latents(unet, *conds, settings)[0]
    assert (cell - base).abs().max() > 1e-2, "the LoRAs must change the sample"
    assert torch.allclose(cell, via_merge, atol=1e-4, rtol=1e-4), (cell - via_merge).abs().max()


def test_sweep_node_draws_rows_by_a_and_columns_by_b(comfy, tiny, two_loras):
    from klein_lora_studio.nodes.strength_sweep import KleinStrengthSweep

    with torch.inference_mode():
        out = KleinStrengthSweep.execute(tiny.unet(), tiny.clip, tiny.vae, "sweep_a.safetensors", "sweep_b.safetensors",
                                         "0, 1", "kln_style, a woman", 1, 4.0, 0, 64)
        one = KleinStrengthSweep.execute(tiny.unet(), tiny.clip, tiny.vae, "sweep_a.safetensors", "None",
                                         "0, 0.5, 1", "kln_style, a woman", 1, 4.0, 0, 64)
    grid, single = out.args[0], one.args[0]
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert single.shape[1] > grid.shape[1]  # three rows against two
    assert single.shape[2] < grid.shape[2]  # one column against two
