"""Tiny, randomly initialised models of the real FLUX.2 [klein] architecture, for tests and the demo.

No weights can be downloaded, so the tests and the headless demo build these and load them through
ComfyUI's own loaders: a diffusion model in BFL key names (UNETLoader detects it as Flux2), a tiny
Qwen3 text encoder in klein's layout (built through comfy.sd.CLIP: CLIPLoader would build the full
4B size from the key widths), and random taef2 encoder/decoder files for VAELoader("taef2").
Needs ComfyUI importable (library mode or a running server's process).
"""
from __future__ import annotations

import types
from pathlib import Path

import torch

# hidden 256 (2 heads of 128), 1 double + 2 single blocks, context 3 x 64 (three Qwen3 layers of width 64)
TINY = dict(hidden=256, double=1, single=2, context=192)
TE_WIDTH, TE_LAYERS = 64, 28
UNET_FILE = "klein-tiny.safetensors"
TE_FILE = "klein-tiny-te.safetensors"


def flux2_module(hidden: int, double: int, single: int, context: int, device="cpu", dtype=None):
    import comfy.ldm.flux.model as fm

    ops = types.SimpleNamespace(Linear=torch.nn.Linear, LayerNorm=torch.nn.LayerNorm, RMSNorm=torch.nn.RMSNorm)
    with torch.device(device):
        return fm.Flux(image_model="flux2", operations=ops, in_channels=128, out_channels=128, vec_in_dim=None,
                       context_in_dim=context, hidden_size=hidden, mlp_ratio=3.0, num_heads=hidden // 128,
                       depth=double, depth_single_blocks=single, axes_dim=[32] * 4, theta=2000, patch_size=1,
                       qkv_bias=False, guidance_embed=False, txt_ids_dims=[3], global_modulation=True,
                       mlp_silu_act=True, ops_bias=False, dtype=dtype)


def flux2_state_dict(hidden: int, double: int, single: int, context: int, seed: int = 0,
                     dtype=torch.float32, device="cpu") -> dict[str, torch.Tensor]:
    """Random weights in BFL key names (norm scales as `.scale`, as the released files have them)."""
    with torch.device("meta"):
        meta = flux2_module(hidden, double, single, context, device="meta")
    g = torch.Generator(device=device).manual_seed(seed)
    sd = {}
    for k, v in meta.state_dict().items():
        t = torch.empty(v.shape, dtype=dtype, device=device)
        if k.endswith("norm.weight"):
            t.fill_(1.0)
        else:
            fan_in = v.shape[-1] if v.ndim > 1 else 1
            t.normal_(0, fan_in ** -0.5, generator=g)
        sd[(k[:-7] + ".scale") if k.endswith("_norm.weight") else k] = t
    return sd


def flux1_state_dict(hidden: int = 256, double: int = 1, single: int = 1, context: int = 64) -> dict[str, torch.Tensor]:
    """Zero weights of a tiny FLUX.1 [schnell]-layout model (BFL names): a model that is NOT klein, for the
    tests of the queue-time model check (ComfyUI detects it as FluxSchnell)."""
    import comfy.ldm.flux.model as fm

    ops = types.SimpleNamespace(Linear=torch.nn.Linear, LayerNorm=torch.nn.LayerNorm, RMSNorm=torch.nn.RMSNorm)
    with torch.device("meta"):
        meta = fm.Flux(image_model="flux", operations=ops, in_channels=16, out_channels=16, vec_in_dim=64,
                       context_in_dim=context, hidden_size=hidden, mlp_ratio=4.0, num_heads=hidden // 128, depth=double,
                       depth_single_blocks=single, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True,
                       guidance_embed=False, txt_ids_dims=[])
    return {(k[:-7] + ".scale") if k.endswith("_norm.weight") else k: torch.zeros(v.shape)
            for k, v in meta.state_dict().items()}


def tiny_te_config() -> dict:
    return {"hidden_size": TE_WIDTH, "intermediate_size": 2 * TE_WIDTH, "num_hidden_layers": TE_LAYERS,
            "num_attention_heads": 2, "num_key_value_heads": 1}


TE_PREFIX = "qwen3_4b.transformer."


def _klein_clip(**kwargs):
    import comfy.sd
    from comfy.text_encoders.flux import KleinTokenizer, klein_te

    target = types.SimpleNamespace(clip=klein_te(model_type="qwen3_4b"), tokenizer=KleinTokenizer, params={})
    return comfy.sd.CLIP(target, state_dict=[], model_options={"qwen3_4b_model_config": tiny_te_config()},
                         disable_dynamic=True, **kwargs)


def tiny_te_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random Qwen3 weights in the released files' key names (`model.layers.0...`)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in _klein_clip().cond_stage_model.state_dict().items():
        t = torch.empty(v.shape, dtype=torch.float32)
        if "norm" in k:
            t.fill_(1.0)
        else:
            t.normal_(0, 0.02 if "embed" in k else (v.shape[-1] if v.ndim > 1 else 1) ** -0.5, generator=g)
        sd[k[len(TE_PREFIX):] if k.startswith(TE_PREFIX) else k] = t
    return sd


def tiny_clip(te_path: str | Path | None = None, seed: int = 0):
    """A klein text encoder (Qwen3 layout, hidden layers 9/18/27 stacked) of width 64."""
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(te_path)) if te_path is not None else tiny_te_state_dict(seed)
    clip = _klein_clip()
    missing, unexpected = clip.load_sd(sd)
    unexpected = [k for k in unexpected if not k.endswith("logit_scale")]  # ComfyUI adds it to every TE
    if missing or unexpected:
        raise RuntimeError(f"tiny text encoder keys did not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return clip


def taef2_state_dicts(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """Random taef2 encoder and decoder weights with the shapes ComfyUI's TAESD loader expects."""
    from comfy.taesd.taesd import TAESD

    g = torch.Generator().manual_seed(seed)
    model = TAESD(latent_channels=128)
    out = {}
    for part in ("encoder", "decoder"):
        sd = {}
        for k, v in getattr(model, f"taesd_{part}").state_dict().items():
            t = torch.empty(v.shape, dtype=torch.float32)
            fan_in = v[0].numel() if v.ndim > 1 else 1
            t.normal_(0, fan_in ** -0.5, generator=g) if v.ndim > 1 else t.zero_()
            sd[k] = t
        out[part] = sd
    return out


def write_tiny_models(models_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    """Write the tiny diffusion model, text encoder and taef2 VAE into a ComfyUI models/ folder."""
    import comfy.utils

    models_dir = Path(models_dir)
    paths = {"unet": models_dir / "diffusion_models" / UNET_FILE,
             "te": models_dir / "text_encoders" / TE_FILE,
             "taef2_encoder": models_dir / "vae_approx" / "taef2_encoder.safetensors",
             "taef2_decoder": models_dir / "vae_approx" / "taef2_decoder.safetensors"}
    for p in paths.values():
        p.parent.mkdir(parents=True, exist_ok=True)
    if not paths["unet"].exists():
        comfy.utils.save_torch_file(flux2_state_dict(**TINY, seed=seed), str(paths["unet"]))
    if not paths["te"].exists():
        comfy.utils.save_torch_file(tiny_te_state_dict(seed), str(paths["te"]))
    if not paths["taef2_encoder"].exists():
        for part, sd in taef2_state_dicts(seed).items():
            comfy.utils.save_torch_file(sd, str(paths[f"taef2_{part}"]))
    return paths
