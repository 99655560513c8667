"""Every foreign LoRA layout reads into the same deltas: the converted file, applied by ComfyUI's stock
loader, moves the tiny klein model exactly as the original does (at the strength it was trained at)."""
from __future__ import annotations

import json
import logging

import pytest
import safetensors
import torch
from klein_lora_studio.tests import lora_kit as kit
from klein_lora_studio.trainer.lora import formats as lf

pytestmark = pytest.mark.comfy

RANK, ALPHA = 4, 2.0  # alpha != rank on purpose: scale 0.5
META = {"ss_network_dim": "4", "trainer_note": "hand-written"}


@pytest.fixture(scope="module")
def setup(tiny):
    unet = tiny.unet()
    w = kit.random_lora(0, RANK)
    diff = torch.randn(128, generator=torch.Generator().manual_seed(3)) * 0.3
    ref_sd = kit.bfl_sd(w, ALPHA, diff)  # ComfyUI reads this layout natively: the reference
    base = kit.forward(unet)
    ref = kit.forward(kit.apply(unet, ref_sd))
    assert (ref - base).norm() > 0.05 * base.norm(), "the LoRA must visibly change the output"
    return {"unet": unet, "w": w, "diff": diff, "ref": ref, "base": base}


def _roundtrip(tmp_path, sd, metadata, name):
    src = kit.save(sd, tmp_path / f"{name}.safetensors", metadata)
    lora = lf.load_lora_file(src)
    out = lf.save_lora(lora, tmp_path / f"{name}-comfy.safetensors")
    with safetensors.safe_open(str(out), "pt") as f:
        meta = f.metadata()
    return lora, safetensors.torch.load_file(str(out)), meta


@pytest.mark.parametrize("fmt", ["bfl", "comfy_native", "ai_toolkit", "kohya"])
def test_converted_file_applies_like_the_original(setup, tmp_path, caplog, fmt):
    w, unet = setup["w"], setup["unet"]
    diff = setup["diff"] if fmt in ("bfl", "comfy_native") else None
    sd = {"bfl": lambda: kit.bfl_sd(w, ALPHA, diff), "comfy_native": lambda: kit.comfy_native_sd(w, ALPHA, diff),
          "ai_toolkit": lambda: kit.ai_toolkit_sd(w, ALPHA), "kohya": lambda: kit.kohya_sd(w, ALPHA)}[fmt]()
    caplog.set_level(logging.WARNING)
    lora, converted, meta = _roundtrip(tmp_path, sd, META, fmt)
    out_orig = kit.forward(kit.apply(unet, sd))
    out_conv = kit.forward(kit.apply(unet, converted))
    assert not kit.not_loaded(caplog)
    assert set(lora.layers) == set(kit.LAYERS)
    assert torch.allclose(out_conv, out_orig, rtol=1e-4, atol=1e-5), (out_conv - out_orig).abs().max()
    if diff is not None:
        assert torch.allclose(out_conv, setup["ref"], rtol=1e-4, atol=1e-5)
        assert torch.equal(converted[f"diffusion_model.{kit.NORM}.diff"], diff)
    assert meta["trainer_note"] == "hand-written" and meta["ss_network_dim"] == "4"


def test_diffusers_split_qkv_with_alpha_in_metadata(setup, tmp_path, caplog):
    """lora_alpha 2 at rank 4 lives only in the metadata; stock ComfyUI ignores it (scale 1), we apply 0.5."""
    w, unet = setup["w"], setup["unet"]
    parts = kit.qkv_parts(5, RANK)
    sd = kit.diffusers_sd(w, parts)
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": RANK, "transformer.lora_alpha": ALPHA})}
    caplog.set_level(logging.WARNING)
    lora, converted, out_meta = _roundtrip(tmp_path, sd, meta, "diffusers")
    # the reference, by hand: qkv parts fused block-diagonally, every layer at scale alpha/rank
    ref_w = {k: v for k, v in w.items() if k in kit.DIFFUSERS}
    ref_sd = kit.bfl_sd(ref_w, ALPHA)
    for layer, p in parts.items():
        a, b = kit.fused_from_parts(p)
        ref_sd.update({f"diffusion_model.{layer}.lora_A.weight": a, f"diffusion_model.{layer}.lora_B.weight": b,
                       f"diffusion_model.{layer}.alpha": torch.tensor(3 * ALPHA)})
    ref = kit.forward(kit.apply(unet, ref_sd))
    out_conv = kit.forward(kit.apply(unet, converted))
    out_stock = kit.forward(kit.apply(unet, sd))
    assert not kit.not_loaded(caplog)
    assert lora.source_format == "diffusers"
    assert torch.allclose(out_conv, ref, rtol=1e-4, atol=1e-5), (out_conv - ref).abs().max()
    # stock ComfyUI applies this file at twice its trained strength: the conversion is what fixes it
    assert (out_stock - ref).norm() > 0.1 * (ref - setup["base"]).norm()
    assert "lora_adapter_metadata" in out_meta


def test_diffusers_alpha_equal_rank_matches_stock_comfy(setup, tmp_path, caplog):
    w, unet = setup["w"], setup["unet"]
    sd = kit.diffusers_sd(w, kit.qkv_parts(6, RANK))
    caplog.set_level(logging.WARNING)
    _, converted, _ = _roundtrip(tmp_path, sd, None, "diffusers-plain")
    out_stock = kit.forward(kit.apply(unet, sd))
    out_conv = kit.forward(kit.apply(unet, converted))
    assert not kit.not_loaded(caplog)
    assert torch.allclose(out_conv, out_stock, rtol=1e-4, atol=1e-5), (out_conv - out_stock).abs().max()


def test_diffusers_export_loads_in_comfy_and_reads_back(setup, tmp_path, caplog):
    """Our diffusers export (qkv split, scale folded into B): ComfyUI's own diffusers mapping applies it
    like the reference, and reading it back gives the same deltas (shared A: rank stays 4)."""
    w, unet = setup["w"], setup["unet"]
    lora = lf.from_state_dict(kit.bfl_sd(w, ALPHA), {"trainer_note": "x"})
    path = lf.save_lora(lora, tmp_path / "export-diffusers.safetensors", "diffusers")
    sd = safetensors.torch.load_file(str(path))
    assert "transformer.transformer_blocks.0.attn.to_k.lora_B.weight" in sd
    assert not any(k.endswith(".alpha") for k in sd)
    caplog.set_level(logging.WARNING)
    ref = kit.forward(kit.apply(unet, kit.bfl_sd(w, ALPHA)))
    out = kit.forward(kit.apply(unet, sd))
    assert not kit.not_loaded(caplog)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-5), (out - ref).abs().max()
    back = lf.load_lora_file(path)
    assert back.metadata["trainer_note"] == "x"
    for k, d in lora.layers.items():
        assert back.layers[k].rank == RANK
        assert torch.allclose(back.layers[k].delta(), d.delta(), atol=1e-6)


def test_unknown_keys_and_broken_files_are_clear_errors():
    with pytest.raises(ValueError, match="not klein layers"):
        lf.from_state_dict({"transformer.foo.bar.lora_A.weight": torch.zeros(2, 4),
                            "transformer.foo.bar.lora_B.weight": torch.zeros(4, 2)}, name="x.safetensors")
    with pytest.raises(ValueError, match="no up"):
        lf.from_state_dict({"diffusion_model.img_in.lora_A.weight": torch.zeros(2, 4)})
    with pytest.raises(ValueError, match="LoKr"):
        lf.from_state_dict({"diffusion_model.img_in.lokr_w1": torch.zeros(2, 4)})


def _diffusers_forward(model, inputs):
    """The same call as ComfyUI's Flux forward: tokens h-major, image ids (0, h, w, 0), text ids (0, 0, 0, l)."""
    x, t, ctx = inputs
    _, c, h, w = x.shape
    img_ids = torch.zeros(h * w, 4)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
    txt_ids = torch.zeros(ctx.shape[1], 4)
    txt_ids[:, 3] = torch.arange(ctx.shape[1])
    with torch.no_grad():
        out = model(x.flatten(2).transpose(1, 2), ctx, t, img_ids, txt_ids, return_dict=False)[0]
    return out.transpose(1, 2).reshape(1, c, h, w)


def test_diffusers_export_loads_in_diffusers_flux2_with_the_same_deltas(setup, tiny, tmp_path):
    """diffusers' own loader (Flux2LoraLoaderMixin.lora_state_dict + load_lora_adapter, as load_lora_weights
    runs it) accepts the export of a mixed-rank merge; a diffusers Flux2 model with the tiny model's weights
    (diffusers' own single-file converter) then gives ComfyUI's output, and its fused weights move by exactly
    what ComfyUI applies, layer by layer (ComfyUI's flux_to_diffusers gives the row slices)."""
    pytest.importorskip("diffusers")
    import comfy.utils
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.lora_pipeline import Flux2LoraLoaderMixin
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from klein_lora_studio.trainer.lora import merge as lora_merge

    unet = setup["unet"]
    a = lf.from_state_dict(kit.bfl_sd(setup["w"], ALPHA), {"trainer_note": "x"}, name="a")
    b = lf.from_state_dict(kit.bfl_sd(kit.random_lora(9, 6, ["double_blocks.0.img_attn.qkv"]), 3.0), name="b")
    merged = lora_merge.exact_merge([a, b], [1.0, 0.5])  # qkv rank 10, the rest rank 4: rank_pattern needed
    path = lf.save_lora(merged, tmp_path / "merged-diffusers.safetensors", "diffusers")
    sd, meta = Flux2LoraLoaderMixin.lora_state_dict(str(path), return_lora_metadata=True)
    model = Flux2Transformer2DModel(in_channels=128, num_layers=1, num_single_layers=2, attention_head_dim=128,
                                    num_attention_heads=2, joint_attention_dim=192, mlp_ratio=3.0, guidance_embeds=False)
    base_sd = convert_flux2_transformer_checkpoint_to_diffusers(safetensors.torch.load_file(str(tiny.files["unet"])))
    missing, unexpected = model.load_state_dict(base_sd, strict=False)
    assert not missing and not unexpected
    assert torch.allclose(_diffusers_forward(model, kit.probe()), setup["base"], atol=1e-5)  # same model both sides
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora_adapter(sd, prefix="transformer", metadata=meta, adapter_name="klein")
    out_diffusers = _diffusers_forward(model, kit.probe())
    model.fuse_lora(lora_scale=1.0)
    model.unload_lora()
    d_delta = {k: v - before[k] for k, v in model.state_dict().items()}

    kit.forward(unet)  # the plain model loaded (unpatched) before its weights are read
    base_w = {k: v.clone() for k, v in unet.model.diffusion_model.state_dict().items()}
    patched = kit.apply(unet, lf.to_comfy_state_dict(merged))
    out_comfy = kit.forward(patched)
    c_delta = {k: v - base_w[k] for k, v in patched.model.diffusion_model.state_dict().items()}
    kit.forward(unet)
    assert (out_comfy - setup["base"]).norm() > 0.05 * setup["base"].norm()
    assert torch.allclose(out_diffusers, out_comfy, rtol=1e-4, atol=1e-5), (out_diffusers - out_comfy).abs().max()
    mapping = comfy.utils.flux_to_diffusers({"depth": 1, "depth_single_blocks": 2, "hidden_size": 256})
    checked = 0
    for dkey, delta in d_delta.items():
        if dkey not in mapping:
            assert delta.abs().max() == 0, dkey
            continue
        target = mapping[dkey]
        bfl, sl = (target, None) if isinstance(target, str) else target[:2]
        expect = c_delta[bfl] if sl is None else c_delta[bfl].narrow(sl[0], sl[1], sl[2])
        assert torch.allclose(delta, expect, atol=1e-6), dkey
        checked += delta.abs().max() > 0
    assert checked == 11  # 3 + 3 q/k/v, proj, img_mlp.0, txt_mlp.2, linear1, linear2
    back = lf.load_lora_file(path)  # and our reader takes the mixed-rank export back (alpha_pattern)
    assert back.layers["double_blocks.0.img_attn.qkv"].rank == 10
    for k, d in merged.layers.items():
        assert torch.allclose(back.layers[k].delta(), d.delta(), atol=1e-6), k


def test_partial_qkv_parts_leave_the_other_thirds_zero():
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(2, 256, generator=g), torch.randn(256, 2, generator=g))
    v = (torch.randn(3, 256, generator=g), torch.randn(256, 3, generator=g))
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": q[0],
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": q[1],
          "transformer.transformer_blocks.0.attn.to_v.lora_A.weight": v[0],
          "transformer.transformer_blocks.0.attn.to_v.lora_B.weight": v[1]}
    meta = {"lora_adapter_metadata": json.dumps({"transformer.r": 2, "transformer.lora_alpha": 4,
                                                 "transformer.alpha_pattern": {"transformer_blocks.0.attn.to_v": 6}})}
    d = lf.from_state_dict(sd, meta).layers["double_blocks.0.img_attn.qkv"].delta()
    assert d.shape == (768, 256) and d[256:512].abs().max() == 0
    assert torch.allclose(d[:256], 4 / 2 * q[1] @ q[0], atol=1e-6)
    assert torch.allclose(d[512:], 6 / 3 * v[1] @ v[0], atol=1e-6)
