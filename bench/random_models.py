"""Real-size random model files in the formats ComfyUI's stock loaders take, for benches of the whole user graph.

  diffusion model  FLUX.2 [klein] 4B/9B in BFL key names, bf16 (UNETLoader detects flux2 from the keys; the
                   low-VRAM workflow loads it with weight_dtype fp8_e4m3fn, as a user loads the released file)
  text encoder     Qwen3-4B / Qwen3-8B in the released files' key names (`model.layers.N...`): CLIPLoader type
                   flux2 picks Qwen3-4B or 8B from the width of `model.layers.0.post_attention_layernorm.weight`
                   (comfy/sd.py detect_te_model) and builds the full hard-coded size (comfy/text_encoders/llama.py
                   Qwen3_4BConfig / Qwen3_8BConfig). `fp8_e4m3fn` writes ComfyUI's mixed-precision layout (each
                   decoder linear in float8_e4m3fn with a `weight_scale` and a `comfy_quant` entry, embeddings and
                   norms in bf16: comfy.utils.detect_layer_quantization, comfy/ops.py), so the weights stay fp8 on
                   the card as with Comfy-Org's fp8 text encoders; `bf16` is the plain release layout.
  VAE              the FLUX.2 VAE: ComfyUI's AutoencoderKL with 32 latent channels and the batch-norm latent
                   (`bn.running_mean`, comfy/sd.py VAE: 128 channels at 16x after the 2x2 packing)

The key names and shapes come from ComfyUI's own modules built on the meta device, so a file holds exactly
what the loader expects. Tensors are made one at a time (on the GPU when there is one) and streamed into the
safetensors layout (8-byte header length, JSON header, raw little-endian data), so host memory stays at one
tensor whatever the file's size. Needs ComfyUI importable (trainer/jobs/comfy_library.boot).
"""
from __future__ import annotations

import json
import logging
import math
import os
import struct
import time
import types
from dataclasses import dataclass
from pathlib import Path

import torch

ST_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float8_e4m3fn: "F8_E4M3",
             torch.uint8: "U8", torch.int64: "I64"}
TE_KINDS = {"klein4b": "qwen3_4b", "klein9b": "qwen3_8b"}
TE_DTYPES = {"bf16": torch.bfloat16, "fp8_e4m3fn": torch.float8_e4m3fn}
FP8_MAX = 448.0


@dataclass
class Spec:
    """One tensor of a file: how to make it (`fill`: normal with `std`, a constant `value`, or raw `data`)."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    fill: str = "normal"
    std: float = 0.02
    value: float = 0.0
    data: bytes = b""

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _make(s: Spec, device: torch.device, g: torch.Generator) -> torch.Tensor:
    if s.fill == "data":
        return torch.frombuffer(bytearray(s.data), dtype=torch.uint8)
    if s.fill == "const":
        return torch.full(s.shape, s.value, dtype=s.dtype, device=device)
    made = torch.bfloat16 if s.dtype == torch.float8_e4m3fn else s.dtype
    t = torch.empty(s.shape, dtype=made, device=device).normal_(0.0, s.std, generator=g)
    return t.clamp_(-FP8_MAX, FP8_MAX).to(s.dtype) if s.dtype == torch.float8_e4m3fn else t


def write_safetensors(path: Path, specs: list[Spec], device: torch.device | str = "cpu", seed: int = 0) -> dict:
    """Stream `specs` into a safetensors file at `path` (written beside it, then renamed); its size and seconds."""
    from klein_lora_studio.trainer import paths

    header, offset = {}, 0
    for s in specs:
        header[s.name] = {"dtype": ST_DTYPES[s.dtype], "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    device = torch.device(device)
    t0 = time.perf_counter()

    def write(tmp: Path) -> None:
        g = torch.Generator(device=device).manual_seed(seed)
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for s in specs:
                t = _make(s, device, g).to("cpu").contiguous().reshape(-1)
                f.write(t.view(torch.uint8).numpy().data)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = paths.temp_name(path)
    try:  # a temp name, then renamed in one step; no fsync: a bench's scratch file, and fsync of 17 GB costs minutes
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    seconds = time.perf_counter() - t0
    logging.info("random file %s: %.2f GiB in %.1f s", Path(path).name, (offset + len(raw) + 8) / 2**30, seconds)
    return {"bytes": offset + len(raw) + 8, "write_s": seconds}


def unet_specs(hidden: int, double: int, single: int, context: int) -> list[Spec]:
    """The klein diffusion model in BFL names (norm scales as `.scale`), bf16, std 0.02 (as the step benches)."""
    from klein_lora_studio.devtools.tiny_models import flux2_module

    meta = flux2_module(hidden, double, single, context, device="meta")
    out = []
    for k, v in meta.state_dict().items():
        name = (k[:-7] + ".scale") if k.endswith("_norm.weight") else k
        norm = k.endswith("norm.weight")
        out.append(Spec(name, tuple(v.shape), torch.bfloat16, "const" if norm else "normal", value=1.0))
    return out


def _qwen3_meta(kind: str) -> torch.nn.Module:
    import comfy.ops
    from comfy.text_encoders import llama

    cls = {"qwen3_4b": llama.Qwen3_4B, "qwen3_8b": llama.Qwen3_8B}[kind]
    return cls({}, dtype=torch.bfloat16, device="meta", operations=comfy.ops.disable_weight_init)


def te_specs(kind: str, dtype: torch.dtype, module: torch.nn.Module | None = None) -> list[Spec]:
    """A Qwen3 text encoder (`kind` qwen3_4b/qwen3_8b at ComfyUI's sizes, or the given module's); with fp8 its
    decoder linears in ComfyUI's mixed fp8 layout (values of std 1, the layer's 1/sqrt(fan_in) as weight_scale)."""
    module = module if module is not None else _qwen3_meta(kind)
    quant = json.dumps({"format": "float8_e4m3fn"}).encode()
    out = []
    for k, v in module.state_dict().items():
        shape = tuple(v.shape)
        if k.endswith("norm.weight"):
            out.append(Spec(k, shape, torch.bfloat16, "const", value=1.0))
        elif "embed_tokens" in k:
            out.append(Spec(k, shape, torch.bfloat16))
        elif dtype == torch.float8_e4m3fn and ".layers." in k and len(shape) == 2:
            layer = k[: -len(".weight")]
            out += [Spec(k, shape, dtype, std=1.0),
                    Spec(f"{layer}.weight_scale", (), torch.float32, "const", value=shape[1] ** -0.5),
                    Spec(f"{layer}.comfy_quant", (len(quant),), torch.uint8, "data", data=quant)]
        else:
            out.append(Spec(k, shape, torch.bfloat16, std=(shape[-1] if len(shape) > 1 else 1) ** -0.5))
    return out


FLUX2_VAE_CONFIG = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
                    "batch_norm_latent": True}


def vae_specs() -> list[Spec]:
    """The FLUX.2 VAE as ComfyUI builds it from the file (comfy/sd.py: the KL autoencoder, 32 channels, batch-norm
    latent, quant convs), fp32; norms 1, biases 0, convolutions 1/sqrt(fan_in), the latent statistics 0 and 1."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    with torch.device("meta"):
        meta = AutoencoderKL(ddconfig=dict(FLUX2_VAE_CONFIG), embed_dim=FLUX2_VAE_CONFIG["z_channels"])
    out = []
    for k, v in meta.state_dict().items():
        shape = tuple(v.shape)
        if k.endswith("num_batches_tracked"):
            out.append(Spec(k, shape, torch.int64, "const"))
        elif k.endswith("running_var") or (len(shape) == 1 and "norm" in k and k.endswith("weight")):
            out.append(Spec(k, shape, torch.float32, "const", value=1.0))
        elif len(shape) == 1:
            out.append(Spec(k, shape, torch.float32, "const"))
        else:
            out.append(Spec(k, shape, torch.float32, std=math.prod(shape[1:]) ** -0.5))
    return out


@dataclass
class ModelFiles:
    unet: str
    clip: str
    vae: str
    written: dict  # file name -> {"bytes", "write_s"}


def write_models(models_dir: Path, model: str, te_dtype: str, device: torch.device | str) -> ModelFiles:
    """The three files of `model` (klein4b / klein9b) in ComfyUI's models folder, under the workflow's names."""
    from klein_lora_studio.trainer.model import sizes

    size = {"klein4b": sizes.KLEIN_4B, "klein9b": sizes.KLEIN_9B}[model]
    tag = model.removeprefix("klein")
    kind = TE_KINDS[model]
    names = ModelFiles(f"flux-2-klein-base-{tag}.safetensors",
                       f"{kind.replace('qwen3', 'qwen_3')}{'_fp8' if te_dtype.startswith('fp8') else ''}.safetensors",
                       "flux2-vae.safetensors", {})
    jobs = ((models_dir / "diffusion_models" / names.unet, lambda: unet_specs(size.hidden, size.double, size.single,
                                                                              size.context)),
            (models_dir / "text_encoders" / names.clip, lambda: te_specs(kind, TE_DTYPES[te_dtype])),
            (models_dir / "vae" / names.vae, vae_specs))
    for path, specs in jobs:
        names.written[path.name] = write_safetensors(path, specs(), device)
    return names


def tiny_quantized_clip_check() -> dict:
    """The fp8 text-encoder layout at the tiny width, through ComfyUI's own CLIP with the quantisation metadata
    CLIPLoader derives from such a file (comfy.sd.llama_detect): does it load every key and encode?"""
    import comfy.sd
    import comfy.utils
    from comfy.text_encoders.flux import KleinTokenizer, klein_te
    from klein_lora_studio.devtools import tiny_models

    def clip(quant, sd=()):
        target = types.SimpleNamespace(clip=klein_te(model_type="qwen3_4b", llama_quantization_metadata=quant),
                                       tokenizer=KleinTokenizer, params={})
        return comfy.sd.CLIP(target, state_dict=list(sd), model_options={"qwen3_4b_model_config":
                                                                          tiny_models.tiny_te_config()},
                             disable_dynamic=True)

    plain = clip(None).cond_stage_model.qwen3_4b.transformer
    specs = te_specs("qwen3_4b", torch.float8_e4m3fn, plain)
    g = torch.Generator().manual_seed(0)
    sd = {s.name: _make(s, torch.device("cpu"), g).reshape(s.shape) for s in specs}
    quant = comfy.utils.detect_layer_quantization(sd, "")
    encoder = clip(quant, [dict(sd)])  # as CLIPLoader: the state dict given to the constructor (it pops comfy_quant)
    layers = [m for n, m in encoder.cond_stage_model.named_modules() if ".layers." in n and hasattr(m, "quant_format")]
    cond = encoder.encode_from_tokens_scheduled(encoder.tokenize("a red square"))[0][0]
    return {"quantization": quant, "fp8_layers": sum(getattr(m, "quant_format", None) == "float8_e4m3fn" for m in layers),
            "fp8_specs": sum(s.dtype == torch.float8_e4m3fn for s in specs), "cond_shape": list(cond.shape),
            "finite": bool(torch.isfinite(cond).all())}
