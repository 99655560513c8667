"""Merging, resizing and baking: exact merge == the weighted LoRAs applied together, compact/resize error ==
the discarded singular values, a baked model file loads through UNETLoader and equals model + LoRAs."""
from __future__ import annotations

import logging
import math
from pathlib import Path

import pytest
import safetensors
import torch
from klein_lora_studio.tests import lora_kit as kit
from klein_lora_studio.trainer.lora import formats as lf
from klein_lora_studio.trainer.lora import merge as lm

pytestmark = pytest.mark.comfy

L1 = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mlp.0", "single_blocks.0.linear1"]
L2 = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_mlp.2", "single_blocks.1.linear2"]
W1, W2 = 0.7, -0.5


@pytest.fixture(scope="module")
def files(tiny):
    """Two LoRAs in different layouts, ranks, alphas and target sets (overlapping on img_attn.qkv)."""
    import folder_paths

    loras = Path(folder_paths.get_folder_paths("loras")[0])
    diff = torch.randn(128, generator=torch.Generator().manual_seed(4)) * 0.3
    w1, w2 = kit.random_lora(10, 4, L1), kit.random_lora(11, 6, L2)
    kit.save(kit.comfy_native_sd(w1, 1.0, diff), loras / "m1.safetensors", {"a": "1"})  # ComfyUI trainer: alpha 1
    kit.save(kit.kohya_sd(w2, 3.0), loras / "m2.safetensors")
    sd1, sd2 = kit.comfy_native_sd(w1, 1.0, diff), kit.kohya_sd(w2, 3.0)
    unet = tiny.unet()
    both = kit.apply(kit.apply(unet, sd1, W1), sd2, W2)
    return {"unet": unet, "sd1": sd1, "sd2": sd2, "both": kit.forward(both), "base": kit.forward(unet),
            "loras": loras}


def _hand_delta(sd1, sd2, layer):
    """w1 * alpha1/r1 * B1 A1 + w2 * alpha2/r2 * B2 A2, spelled out from the files' tensors."""
    d = 0
    k1, k2 = f"diffusion_model.{layer}", kit.KOHYA[layer]
    if f"{k1}.lora_up.weight" in sd1:
        a = sd1[f"{k1}.lora_down.weight"]
        d = d + W1 * sd1[f"{k1}.alpha"] / a.shape[0] * sd1[f"{k1}.lora_up.weight"] @ a
    if f"{k2}.lora_up.weight" in sd2:
        a = sd2[f"{k2}.lora_down.weight"]
        d = d + W2 * sd2[f"{k2}.alpha"] / a.shape[0] * sd2[f"{k2}.lora_up.weight"] @ a
    return d


def test_exact_merge_equals_the_weighted_loras(comfy, files, caplog):
    from klein_lora_studio.nodes.merge import KleinLoRAMerge

    caplog.set_level(logging.WARNING)
    out = KleinLoRAMerge.execute(mode="exact", target_rank=8, output_name="exact", format="comfyui",
                                 save_dtype="fp32", loras=kit.lora_slots(("m1.safetensors", W1), ("m2.safetensors", W2)))
    path, lora_sd, report = out.result
    file_sd = safetensors.torch.load_file(path)
    merged_out = kit.forward(kit.apply(files["unet"], file_sd))
    assert not kit.not_loaded(caplog)
    assert (files["both"] - files["base"]).norm() > 0.01 * files["base"].norm()
    assert torch.allclose(merged_out, files["both"], rtol=1e-4, atol=1e-5), (merged_out - files["both"]).abs().max()
    merged = lf.from_state_dict(file_sd)
    assert set(merged.layers) == set(L1) | set(L2)  # the union of targets
    assert merged.layers["double_blocks.0.img_attn.qkv"].rank == 4 + 6
    for layer in merged.layers:
        hand = _hand_delta(files["sd1"], files["sd2"], layer)
        assert torch.allclose(merged.layers[layer].delta(), hand, atol=1e-6)
    assert torch.allclose(file_sd[f"diffusion_model.{kit.NORM}.diff"], W1 * files["sd1"][f"diffusion_model.{kit.NORM}.diff"])
    assert "m1.safetensors (comfyui-native) x 0.7" in report and "m2.safetensors (kohya) x -0.5" in report
    assert set(lora_sd) == set(file_sd)


def test_compact_merge_error_is_the_discarded_singular_values(files):
    l1 = lf.from_state_dict(files["sd1"], name="m1")
    l2 = lf.from_state_dict(files["sd2"], name="m2")
    compact, report = lm.compact_merge([l1, l2], [W1, W2], 3)
    reps = {r.layer: r for r in report.layers}
    tot = dropped = 0.0
    for layer, d in compact.layers.items():
        full = _hand_delta(files["sd1"], files["sd2"], layer).double()
        s = torch.linalg.svdvals(full)
        expect = math.sqrt(float((s[3:] ** 2).sum() / (s ** 2).sum()))
        tot, dropped = tot + float((s ** 2).sum()), dropped + float((s[3:] ** 2).sum())
        assert d.rank == 3
        assert reps[layer].rel_error == pytest.approx(expect, rel=1e-6, abs=1e-9)
        actual = float((full - d.delta(torch.float64)).norm() / full.norm())
        assert actual == pytest.approx(expect, rel=1e-4, abs=1e-7)
        assert reps[layer].energy_kept == pytest.approx(1 - expect ** 2, abs=1e-9)
    assert reps["double_blocks.0.img_attn.qkv"].rel_error > 0.05  # rank 10 -> 3 loses something
    assert report.overall_error == pytest.approx(math.sqrt(dropped / tot), rel=1e-6)
    assert "overall relative Frobenius error" in report.text()


def test_resize_node_lowers_rank_with_the_svd_error(comfy, files):
    from klein_lora_studio.nodes.merge import KleinLoRAResize

    path, _, report = KleinLoRAResize.execute(lora="m2.safetensors", target_rank=2, output_name="small",
                                              format="comfyui", save_dtype="auto").result
    small = lf.load_lora_file(path)
    src = lf.from_state_dict(files["sd2"])
    for layer, d in small.layers.items():
        assert d.rank == 2
        full = src.layers[layer].delta(torch.float64)
        s = torch.linalg.svdvals(full)
        best = full.norm() ** 2 - (s[:2] ** 2).sum()  # Eckart-Young: nothing of rank 2 does better
        assert float((full - d.delta(torch.float64)).norm() ** 2) == pytest.approx(float(best), rel=1e-4)
    assert "rank 6 -> 2" in report
    assert small.metadata.get("klein_lora_studio.merge")


def test_mismatched_bases_are_a_clear_error():
    small = lf.from_state_dict(kit.bfl_sd(kit.random_lora(1, 2, ["single_blocks.0.linear1"]), None), name="4b.safetensors")
    g = torch.Generator().manual_seed(0)
    wide = lf.from_state_dict({"diffusion_model.double_blocks.0.img_mlp.2.lora_A.weight": torch.randn(2, 1152, generator=g),
                               "diffusion_model.double_blocks.0.img_mlp.2.lora_B.weight": torch.randn(384, 2, generator=g)},
                              name="9b.safetensors")
    with pytest.raises(ValueError, match=r"different base models: '4b.safetensors' width 256.*'9b.safetensors' width 384"):
        lm.exact_merge([small, wide], [1.0, 1.0])
    clash = lf.from_state_dict({"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.randn(2, 384),
                                "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.randn(2304, 2)}, name="c")
    with pytest.raises(ValueError, match="different base"):
        lm.compact_merge([small, clash], [1.0, 1.0], 2)


def test_baked_model_loads_through_unetloader_and_equals_model_plus_loras(comfy, tiny, files):
    from klein_lora_studio.devtools import tiny_models
    from klein_lora_studio.nodes.merge import KleinLoRABake

    path, report = KleinLoRABake.execute(unet_name=tiny_models.UNET_FILE, output_name="klein-baked",
                                         loras=kit.lora_slots(("m1.safetensors", W1), ("m2.safetensors", W2))).result
    assert Path(path).parent == tiny.files["unet"].parent
    baked = comfy.UNETLoader().load_unet(Path(path).name, "default")[0]
    out = kit.forward(baked)
    assert torch.allclose(out, files["both"], rtol=1e-4, atol=1e-5), (out - files["both"]).abs().max()
    with safetensors.safe_open(path, "pt") as fb, safetensors.safe_open(str(tiny.files["unet"]), "pt") as fo:
        assert set(fb.keys()) == set(fo.keys())
        assert all(fb.get_slice(k).get_dtype() == fo.get_slice(k).get_dtype() for k in fo.keys())
        assert "m1.safetensors" in fb.metadata()["klein_lora_studio.baked"]


def test_bake_keeps_bf16_and_refuses_a_foreign_base():
    from klein_lora_studio.devtools import tiny_models

    sd = {k: v.to(torch.bfloat16) for k, v in tiny_models.flux2_state_dict(**tiny_models.TINY).items()}
    lora = lf.from_state_dict(kit.bfl_sd(kit.random_lora(2, 4, L1), 4.0), name="x")
    baked = lm.bake_state_dict(sd, [lora], [1.0])
    key = "double_blocks.0.img_attn.qkv.weight"
    assert baked[key].dtype == torch.bfloat16 and not torch.equal(baked[key], sd[key])
    expect = (sd[key].float() + lora.layers["double_blocks.0.img_attn.qkv"].delta()).to(torch.bfloat16)
    assert torch.equal(baked[key], expect)
    wide = lf.from_state_dict({"diffusion_model.single_blocks.0.linear1.lora_A.weight": torch.randn(2, 384),
                               "diffusion_model.single_blocks.0.linear1.lora_B.weight": torch.randn(3456, 2)}, name="w")
    with pytest.raises(ValueError, match="3456x384 but model 'model' has 2304x256"):
        lm.bake_state_dict(sd, [wide], [1.0])


def test_convert_node_reports_the_source_layout(comfy, files):
    from klein_lora_studio.nodes.merge import KleinLoRAConvert

    path, lora_sd, report = KleinLoRAConvert.execute(lora="m2.safetensors", format="diffusers",
                                                     output_name="m2-diffusers", save_dtype="auto").result
    assert "read as kohya" in report and "3/6" in report
    sd = safetensors.torch.load_file(path)
    assert all(k.startswith("transformer.") for k in sd)
    assert any(k.endswith(".alpha") for k in lora_sd)  # the LORA_MODEL output is ComfyUI form


def test_merge_node_compact_mode_and_registration(comfy, files):
    from klein_lora_studio.nodes.merge import KleinLoRAMerge

    for node in ("KleinLoRAMerge", "KleinLoRAResize", "KleinLoRAConvert", "KleinLoRABake"):
        assert node in comfy.NODE_CLASS_MAPPINGS
    path, lora_sd, report = KleinLoRAMerge.execute(mode="compact", target_rank=2, output_name="compact",
                                                   format="comfyui", save_dtype="bf16",
                                                   loras=kit.lora_slots(("m1.safetensors", W1),
                                                                        ("m2.safetensors", W2))).result
    sd = safetensors.torch.load_file(path)
    assert sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"].shape == (2, 256)
    assert sd["diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight"].dtype == torch.bfloat16
    assert "double_blocks.0.img_attn.qkv: rank 10 -> 2, error" in report
    assert "overall relative Frobenius error" in report
    with pytest.raises(ValueError, match="at least two LoRAs, got 1: connect a Klein LoRA File node to loras.lora_1"):
        KleinLoRAMerge.execute(mode="exact", target_rank=2, output_name="x", format="comfyui", save_dtype="auto",
                               loras=kit.lora_slots(("m1.safetensors", 1.0)))
    with pytest.raises(ValueError, match="not a plain file name"):
        KleinLoRAMerge.execute(mode="exact", target_rank=2, output_name="../evil", format="comfyui",
                               save_dtype="auto", loras=kit.lora_slots(("m1.safetensors", 1.0), ("m2.safetensors", 1.0)))
