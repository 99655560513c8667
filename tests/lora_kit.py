"""Hand-written LoRA files in each foreign layout, and a ComfyUI forward pass, for the merge/format tests.

The writers here do not use trainer/lora/formats.py: they spell each layout out by hand so that a
converter bug cannot hide in both the writer and the reader.
"""
from __future__ import annotations

import torch

PREFIX = "diffusion_model."
# (layer, out, in) on the tiny klein model (hidden 256, mlp 768, context 192)
LAYERS = {"double_blocks.0.img_attn.qkv": (768, 256), "double_blocks.0.txt_attn.qkv": (768, 256),
          "double_blocks.0.img_attn.proj": (256, 256), "double_blocks.0.img_mlp.0": (1536, 256),
          "double_blocks.0.txt_mlp.2": (256, 768), "single_blocks.0.linear1": (2304, 256),
          "single_blocks.1.linear2": (256, 1024)}
NORM = "double_blocks.0.img_attn.norm.query_norm"  # 128 wide (head dim)
KOHYA = {k: "lora_unet_" + k.replace(".", "_") for k in LAYERS}
DIFFUSERS = {"double_blocks.0.img_attn.proj": "transformer_blocks.0.attn.to_out.0",
             "double_blocks.0.img_mlp.0": "transformer_blocks.0.ff.linear_in",
             "double_blocks.0.txt_mlp.2": "transformer_blocks.0.ff_context.linear_out",
             "single_blocks.0.linear1": "single_transformer_blocks.0.attn.to_qkv_mlp_proj",
             "single_blocks.1.linear2": "single_transformer_blocks.1.attn.to_out"}
DIFFUSERS_QKV = {"double_blocks.0.img_attn.qkv": ("to_q", "to_k", "to_v"),
                 "double_blocks.0.txt_attn.qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def random_lora(seed: int, rank: int = 4, layers=None, std: float = 0.15) -> dict[str, tuple]:
    """layer -> (A [r, in], B [out, r]) with a visible effect on the tiny model."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name in layers or LAYERS:
        o, i = LAYERS[name]
        out[name] = (torch.randn(rank, i, generator=g) * i ** -0.5,
                     torch.randn(o, rank, generator=g) * std)
    return out


def bfl_sd(w: dict, alpha: float | None, diff: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    sd = {}
    for k, (a, b) in w.items():
        sd[f"{PREFIX}{k}.lora_A.weight"], sd[f"{PREFIX}{k}.lora_B.weight"] = a, b
        if alpha is not None:
            sd[f"{PREFIX}{k}.alpha"] = torch.tensor(alpha)
    if diff is not None:
        sd[f"{PREFIX}{NORM}.diff"] = diff
    return sd


def comfy_native_sd(w: dict, alpha: float, diff: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    sd = {}
    for k, (a, b) in w.items():
        sd[f"{PREFIX}{k}.lora_down.weight"], sd[f"{PREFIX}{k}.lora_up.weight"] = a, b
        sd[f"{PREFIX}{k}.alpha"] = torch.tensor(alpha)
    if diff is not None:
        sd[f"{PREFIX}{NORM}.diff"] = diff
    return sd


def ai_toolkit_sd(w: dict, alpha: float) -> dict[str, torch.Tensor]:
    """ai-toolkit writes no alpha key: its alpha equals rank. Same delta: the scale goes into B."""
    return {key: t for k, (a, b) in w.items()
            for key, t in ((f"{PREFIX}{k}.lora_A.weight", a), (f"{PREFIX}{k}.lora_B.weight", b * alpha / a.shape[0]))}


def kohya_sd(w: dict, alpha: float) -> dict[str, torch.Tensor]:
    sd = {}
    for k, (a, b) in w.items():
        sd[f"{KOHYA[k]}.lora_down.weight"], sd[f"{KOHYA[k]}.lora_up.weight"] = a, b
        sd[f"{KOHYA[k]}.alpha"] = torch.tensor(alpha)
    return sd


def diffusers_sd(w: dict, qkv_parts: dict) -> dict[str, torch.Tensor]:
    """`transformer.*` names; qkv_parts: layer -> [(A, B) for q, k, v] with their own A matrices."""
    sd = {}
    for k, (a, b) in w.items():
        if k in DIFFUSERS:
            sd[f"transformer.{DIFFUSERS[k]}.lora_A.weight"], sd[f"transformer.{DIFFUSERS[k]}.lora_B.weight"] = a, b
    for k, parts in qkv_parts.items():
        for name, (a, b) in zip(DIFFUSERS_QKV[k], parts, strict=True):
            sd[f"transformer.transformer_blocks.0.attn.{name}.lora_A.weight"] = a
            sd[f"transformer.transformer_blocks.0.attn.{name}.lora_B.weight"] = b
    return sd


def qkv_parts(seed: int, rank: int = 4) -> dict[str, list[tuple]]:
    g = torch.Generator().manual_seed(seed)
    return {k: [(torch.randn(rank, 256, generator=g) / 16, torch.randn(256, rank, generator=g) * 0.15)
                for _ in range(3)] for k in DIFFUSERS_QKV}


def fused_from_parts(parts: list[tuple]) -> tuple[torch.Tensor, torch.Tensor]:
    """What the split q/k/v mean for the fused layer, by hand: A stacked, B block-diagonal."""
    a = torch.cat([p[0] for p in parts], 0)
    b = torch.block_diag(*[p[1] for p in parts])
    return a, b


def probe(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 128, 4, 4, generator=g), torch.tensor([0.6]), torch.randn(1, 8, 192, generator=g)


def forward(patcher, inputs=None):
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    with torch.no_grad():
        return patcher.model.diffusion_model(*(inputs or probe())).clone()


def apply(unet, sd: dict, strength: float = 1.0):
    """ComfyUI's stock path (what LoraLoaderModelOnly runs)."""
    import comfy.sd

    return comfy.sd.load_lora_for_models(unet, None, sd, strength, 0)[0]


def not_loaded(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "lora key not loaded" in r.getMessage()]


def save(sd: dict, path, metadata: dict | None = None):
    import safetensors.torch

    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path



def lora_slots(*picks: tuple[str, float]) -> dict:
    """A merge/bake node's `loras` value as ComfyUI hands it over: {"lora_1": <Klein LoRA File output>, ...}, each
    made by running the Klein LoRA File node on (file name, weight)."""
    from klein_lora_studio.nodes.lora_files import KleinLoRAFile

    return {f"lora_{i}": KleinLoRAFile.execute(lora_name=name, weight=weight).result[0]
            for i, (name, weight) in enumerate(picks, start=1)}
