"""Read LoRA files from other trainers into one normalised form, and write ComfyUI/BFL or diffusers.

Klein LoRAs come in four layouts (see ../shared/KLEIN.md, "LoRA key formats"):

- ComfyUI/BFL (this pack, ai-toolkit): `diffusion_model.<layer>.lora_A.weight` / `.lora_B.weight`,
  optional `.alpha` (ai-toolkit writes none: alpha = rank, scale 1).
- ComfyUI's own trainer: `diffusion_model.<layer>.lora_down.weight` / `.lora_up.weight` + `.alpha`
  (it trains with alpha 1, so scale 1/rank), plus full `.diff` / `.diff_b` tensors for norm scales
  and biases.
- kohya: `lora_unet_<layer with . as _>.lora_down.weight` / `.lora_up.weight` + `.alpha`.
- diffusers: `transformer.<diffusers layer>.lora_A.weight` / `.lora_B.weight`, q/k/v of the double
  blocks split into `to_q/to_k/to_v` (`add_q_proj`... for text), alpha not in the tensors but in
  the `lora_adapter_metadata` JSON (`transformer.lora_alpha`, `transformer.alpha_pattern`).

Everything becomes a `KleinLora`: per BFL layer name (no `diffusion_model.` prefix) a `LoraDelta`
with down A [r, in], up B [out, r] and alpha (delta = alpha / r * B @ A, exactly what ComfyUI
applies at strength 1), plus full diff tensors. Split q/k/v become one fused qkv delta whose B is
block-diagonal over the three row slices (or, when the three share one A and one scale, as the
diffusers export of a fused LoRA does, A once and B stacked: the rank stays r).
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
KOHYA_PREFIX = "lora_unet_"
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
FORMATS = ("comfyui", "diffusers")
DIFFUSERS_LOADS = ("lora",)  # the adapters diffusers' FLUX.2 load_lora_weights reads from this pack's files

# BFL layer templates; {i} is the block index.
DOUBLE_LAYERS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj",
                 "txt_mlp.0", "txt_mlp.2", "img_mod.lin", "txt_mod.lin", "img_attn.norm.query_norm",
                 "img_attn.norm.key_norm", "txt_attn.norm.query_norm", "txt_attn.norm.key_norm")
SINGLE_LAYERS = ("linear1", "linear2", "modulation.lin", "norm.query_norm", "norm.key_norm")
GLOBAL_LAYERS = ("img_in", "txt_in", "time_in.in_layer", "time_in.out_layer", "guidance_in.in_layer",
                 "guidance_in.out_layer", "vector_in.in_layer", "vector_in.out_layer", "final_layer.linear",
                 "final_layer.adaLN_modulation.1", "double_stream_modulation_img.lin",
                 "double_stream_modulation_txt.lin", "single_stream_modulation.lin")

# BFL -> diffusers (Flux2Transformer2DModel), as diffusers' own _convert_non_diffusers_flux2_lora_to_diffusers.
_DIFF_DOUBLE = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out", "img_mlp.0": "ff.linear_in",
                "img_mlp.2": "ff.linear_out", "txt_mlp.0": "ff_context.linear_in",
                "txt_mlp.2": "ff_context.linear_out", "img_attn.norm.query_norm": "attn.norm_q",
                "img_attn.norm.key_norm": "attn.norm_k", "txt_attn.norm.query_norm": "attn.norm_added_q",
                "txt_attn.norm.key_norm": "attn.norm_added_k"}
_DIFF_QKV = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
             "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_DIFF_SINGLE = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out", "norm.query_norm": "attn.norm_q",
                "norm.key_norm": "attn.norm_k"}
_DIFF_GLOBAL = {"img_in": "x_embedder", "txt_in": "context_embedder",
                "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
                "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
                "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
                "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
                "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
                "single_stream_modulation.lin": "single_stream_modulation.linear",
                "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
                "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear"}

# key suffix -> (role, convention)
_SUFFIXES = ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
             (".lora_up.weight", "up"), (".alpha", "alpha"), (".diff_b", "diff_b"), (".diff", "diff"))


@dataclass
class LoraDelta:
    """One layer's low-rank update: delta W = alpha / rank * up @ down (ComfyUI's and peft's convention)."""

    down: torch.Tensor  # [r, in]
    up: torch.Tensor  # [out, r]
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.up.shape[0]), int(self.down.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.up.dtype

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))

    def folded(self, weight: float = 1.0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up * weight * scale): the same delta with the scale inside B (alpha = rank)."""
        return self.down.to(dtype), self.up.to(dtype) * (weight * self.scale)


# LyCORIS / DoRA parts ComfyUI's weight_adapter reads beside a layer's name (comfy/weight_adapter/lokr.py, loha.py,
# lora.py's dora_scale): the file keys of the adapters this pack trains, and of those it reads
LOKR_PARTS = ("lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2")
LOHA_PARTS = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2")
DORA_PARTS = ("lora_A.weight", "lora_B.weight", "lora_down.weight", "lora_up.weight", "dora_scale")
ADAPTER_NAMES = {"lora": "LoRA", "lokr": "LoKr", "loha": "LoHa", "dora": "DoRA"}


@dataclass
class AdapterDelta:
    """One layer of a LoKr, LoHa or DoRA file, in ComfyUI's convention (what its stock loader applies).

    - lokr: delta = kron(w1, w2) * s, each factor full (`lokr_w1`) or a product (`lokr_w1_a @ lokr_w1_b`);
      s = alpha / rank of the last product factor, 1 when both are full or alpha is absent.
    - loha: delta = (hada_w1_a @ hada_w1_b) * (hada_w2_a @ hada_w2_b) * alpha / rank.
    - dora: W' = (W + alpha / rank * up @ down) * dora_scale / (||W|| per output row + eps), dora_scale
      [out, 1] (ComfyUI's weight_decompose on the output axis normalises by the base's own row norms).
    """

    kind: str
    parts: dict[str, torch.Tensor]
    alpha: float | None = None

    def _mm(self, a: str, b: str, dtype: torch.dtype) -> torch.Tensor:
        return self.parts[a].to(dtype) @ self.parts[b].to(dtype)

    def _lokr_factors(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        if "lokr_t2" in self.parts:
            raise ValueError("LoKr with a Tucker core (lokr_t2) is for conv layers; klein's layers are linear.")
        p, dim = self.parts, None
        w1 = p["lokr_w1"].to(dtype) if "lokr_w1" in p else self._mm("lokr_w1_a", "lokr_w1_b", dtype)
        if "lokr_w1" not in p:
            dim = p["lokr_w1_b"].shape[0]
        w2 = p["lokr_w2"].to(dtype) if "lokr_w2" in p else self._mm("lokr_w2_a", "lokr_w2_b", dtype)
        if "lokr_w2" not in p:
            dim = p["lokr_w2_b"].shape[0]
        return w1, w2, (self.alpha / dim if self.alpha is not None and dim is not None else 1.0)

    @property
    def shape(self) -> tuple[int, int]:
        p = self.parts
        if self.kind == "dora":
            return int(p["up"].shape[0]), int(p["down"].shape[1])
        if self.kind == "loha":
            return int(p["hada_w1_a"].shape[0]), int(p["hada_w1_b"].shape[1])
        w1, w2, _ = self._lokr_factors(torch.float32)
        return int(w1.shape[0] * w2.shape[0]), int(w1.shape[1] * w2.shape[1])

    @property
    def rank(self) -> int:
        """The rank of the low-rank factors (LoKr: of the product factor; 0 when both are full)."""
        p = self.parts
        if self.kind == "dora":
            return int(p["down"].shape[0])
        if self.kind == "loha":
            return int(p["hada_w1_b"].shape[0])
        return int(p["lokr_w2_b"].shape[0]) if "lokr_w2_b" in p else int(p.get("lokr_w1_b", torch.empty(0)).shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.parts.values())).dtype

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The additive update (LoKr, LoHa); DoRA's depends on the base weight: `delta_on`."""
        if self.kind == "dora":
            raise ValueError("a DoRA layer's update depends on the base weight: use delta_on(weight).")
        if self.kind == "loha":
            scale = self.alpha / self.rank if self.alpha is not None else 1.0
            return (self._mm("hada_w1_a", "hada_w1_b", dtype) * self._mm("hada_w2_a", "hada_w2_b", dtype)) * scale
        w1, w2, scale = self._lokr_factors(dtype)
        return torch.kron(w1, w2) * scale

    def delta_on(self, weight: torch.Tensor) -> torch.Tensor:
        """W' - W for the base weight `weight` at strength 1, as ComfyUI computes it (float32)."""
        if self.kind != "dora":
            return self.delta(torch.float32).reshape(weight.shape)
        w = weight.float()
        scale = self.alpha / self.rank if self.alpha is not None else 1.0
        merged = w + scale * self._mm("up", "down", torch.float32)
        norm = w.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
        return merged * (self.parts["dora_scale"].float() / norm) - w

    def file_parts(self) -> dict[str, torch.Tensor]:
        """Part name -> tensor as ComfyUI's loader reads it (DoRA's up/down as lora_B/lora_A)."""
        if self.kind != "dora":
            return dict(self.parts)
        return {"lora_A.weight": self.parts["down"], "lora_B.weight": self.parts["up"],
                "dora_scale": self.parts["dora_scale"]}


def adapter_of(layers) -> str:
    """'lora', or the kind of the LoKr/LoHa/DoRA layers (a file holds one kind)."""
    kinds = {d.kind for d in layers.values() if isinstance(d, AdapterDelta)}
    return next(iter(kinds)) if kinds else "lora"


@dataclass
class KleinLora:
    """A LoRA in BFL layer names, whatever file it came from (LoKr/LoHa/DoRA layers as AdapterDelta)."""

    layers: dict[str, LoraDelta | AdapterDelta] = field(default_factory=dict)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)  # "<layer>.diff" / "<layer>.diff_b": full tensors
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "comfyui"
    name: str = "lora"

    def ranks(self) -> dict[str, int]:
        return {k: v.rank for k, v in self.layers.items()}

    @property
    def adapter(self) -> str:
        return adapter_of(self.layers)

    def require_lora(self, action: str) -> None:
        """A clear refusal for what only plain LoRA layers allow (SVD merges, the diffusers layout)."""
        if self.adapter != "lora":
            raise ValueError(f"{action}: '{self.name}' is a {ADAPTER_NAMES[self.adapter]} ({self.adapter}), not a "
                             f"plain LoRA. {_WHY_NOT[self.adapter]} Bake it into the base model instead (Klein LoRA "
                             "Bake Into Model, exact for every adapter), or load it with the stock LoRA loader.")


_WHY_NOT = {
    "lokr": "Its layers are Kronecker products: two of them do not add up into one LoKr, and as a LoRA each "
            "needs up to full rank.",
    "loha": "Its layers are Hadamard products of two low-rank matrices: two of them do not add up into one LoHa, "
            "and as a LoRA each needs up to rank^2.",
    "dora": "Its update rescales each output row of the base weight (a magnitude vector), which depends on the "
            "base and does not add across files.",
}


def _layer_names(n_double: int, n_single: int) -> list[str]:
    names = list(GLOBAL_LAYERS)
    names += [f"double_blocks.{i}.{t}" for i in range(n_double) for t in DOUBLE_LAYERS]
    names += [f"single_blocks.{i}.{t}" for i in range(n_single) for t in SINGLE_LAYERS]
    return names


def diffusers_layer_map(n_double: int, n_single: int) -> dict[str, tuple[str, int | None]]:
    """diffusers layer name -> (BFL layer name, index of the q/k/v row third or None)."""
    out: dict[str, tuple[str, int | None]] = {v: (k, None) for k, v in _DIFF_GLOBAL.items()}
    for i in range(n_double):
        for bfl, d in _DIFF_DOUBLE.items():
            out[f"transformer_blocks.{i}.{d}"] = (f"double_blocks.{i}.{bfl}", None)
        for bfl, parts in _DIFF_QKV.items():
            for j, d in enumerate(parts):
                out[f"transformer_blocks.{i}.{d}"] = (f"double_blocks.{i}.{bfl}", j)
    for i in range(n_single):
        for bfl, d in _DIFF_SINGLE.items():
            out[f"single_transformer_blocks.{i}.{d}"] = (f"single_blocks.{i}.{bfl}", None)
    return out


def _block_counts(modules: list[str]) -> tuple[int, int]:
    """Double and single block counts implied by the highest block index named (either naming)."""
    nd = ns = 0
    for m in modules:
        hit = re.search(r"single_(?:transformer_)?blocks[._](\d+)", m)
        if hit:
            ns = max(ns, int(hit.group(1)) + 1)
            continue
        hit = re.search(r"(?:double|transformer)_blocks[._](\d+)", m)
        if hit:
            nd = max(nd, int(hit.group(1)) + 1)
    return nd, ns


def _split_key(key: str) -> tuple[str, str]:
    for suffix, role in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return key, ""


def _diffusers_alphas(metadata: dict[str, str]) -> tuple[float | None, dict[str, float]]:
    """lora_alpha and alpha_pattern from diffusers' metadata (prefixed `transformer.` or not)."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return None, {}
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"safetensors metadata '{ADAPTER_METADATA_KEY}' is not JSON ({e}): the file is damaged; "
                         "re-export it from diffusers.") from e
    meta = {k[len(DIFFUSERS_PREFIX):] if k.startswith(DIFFUSERS_PREFIX) else k: v for k, v in meta.items()}
    alpha = meta.get("lora_alpha")
    pattern = {k: float(v) for k, v in (meta.get("alpha_pattern") or {}).items()}
    return (float(alpha) if alpha is not None else None), pattern


def _pattern_alpha(module: str, pattern: dict[str, float]) -> float | None:
    """peft's alpha_pattern: a key matches a module whose name ends with it (or as a regex)."""
    for key, alpha in pattern.items():
        if module == key or module.endswith("." + key) or re.fullmatch(rf"(.*\.)?{key}", module):
            return alpha
    return None


def _fuse_parts(parts: dict[int, LoraDelta], layer: str) -> LoraDelta:
    """q/k/v row thirds -> one delta of the fused qkv layer (a missing third stays zero)."""
    first = next(iter(parts.values()))
    rows, cols = first.shape
    for p in parts.values():
        if p.shape != (rows, cols):
            raise ValueError(f"{layer}: the split q/k/v LoRA parts have different shapes "
                             f"{[tuple(p.shape) for p in parts.values()]}: the file is inconsistent.")
    same_a = (len(parts) == 3 and all(torch.equal(p.down, first.down) and p.scale == first.scale
                                      for p in parts.values()))
    if same_a:  # the export of a fused LoRA: A repeated, B split by rows
        up = torch.cat([parts[j].up for j in range(3)], 0)
        return LoraDelta(first.down.clone(), up, first.alpha)
    dtype = torch.promote_types(first.down.dtype, torch.float32)
    downs = []
    r_total = sum(p.rank for p in parts.values())
    col = 0
    up = torch.zeros(3 * rows, r_total, dtype=dtype)
    for j in sorted(parts):
        d, u = parts[j].folded(dtype=dtype)
        downs.append(d)
        up[j * rows:(j + 1) * rows, col:col + d.shape[0]] = u
        col += d.shape[0]
    return LoraDelta(torch.cat(downs, 0), up, float(r_total))


def _resolve(module: str, names: dict[str, str], dmap: dict) -> tuple[str, int | None, str]:
    """A key's module part -> (BFL layer, q/k/v third or None, format)."""
    if module.startswith(KOHYA_PREFIX):
        if module in names:
            return names[module], None, "kohya"
        raise KeyError(module)
    if module.startswith(PREFIX):
        return module[len(PREFIX):], None, "comfyui"
    bare = module[len(DIFFUSERS_PREFIX):] if module.startswith(DIFFUSERS_PREFIX) else module
    if bare in dmap:
        layer, third = dmap[bare]
        return layer, third, "diffusers"
    if module.startswith(DIFFUSERS_PREFIX):
        raise KeyError(module)
    return module, None, "comfyui"  # bare BFL names (some ai-toolkit exports)


def _group_keys(sd: dict[str, torch.Tensor], name: str) -> dict[str, dict[str, torch.Tensor]]:
    """Keys grouped by module: {module: {role: tensor}} with role down/up/alpha/diff/diff_b."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        module, role = _split_key(key)
        if not role:
            raise ValueError(f"LoRA '{name}': key '{key}' is neither lora_A/B, lora_down/up, alpha nor diff: the file "
                             "is not a LoRA this pack reads (LoKr, LoHa and DoRA need their lokr_*/hada_*/dora_scale keys).")
        groups.setdefault(module, {})[role] = t
    return groups


def _layer_delta(module: str, parts: dict[str, torch.Tensor], fmt: str, name: str,
                 d_alpha: float | None, d_pattern) -> LoraDelta | None:
    """One module's down/up/alpha as a LoraDelta (None for a diff-only module), checked for shape and completeness."""
    if "down" not in parts and "up" not in parts:
        if "alpha" in parts and not any(r in parts for r in ("diff", "diff_b")):
            raise ValueError(f"LoRA '{name}': '{module}.alpha' has no lora_A/lora_B (down/up) weights beside it.")
        return None
    if "down" not in parts or "up" not in parts:
        missing = "up (lora_B/lora_up)" if "up" not in parts else "down (lora_A/lora_down)"
        raise ValueError(f"LoRA '{name}': layer '{module}' has no {missing} weight: the file is incomplete.")
    down, up = parts["down"], parts["up"]
    if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
        raise ValueError(f"LoRA '{name}': layer '{module}' has down {tuple(down.shape)} and up {tuple(up.shape)}, "
                         "which do not multiply (expected [r, in] and [out, r]); conv LoRAs are not supported.")
    rank = down.shape[0]
    if "alpha" in parts:
        alpha = float(parts["alpha"].float().item())
    elif fmt == "diffusers":
        bare = module[len(DIFFUSERS_PREFIX):] if module.startswith(DIFFUSERS_PREFIX) else module
        alpha = _pattern_alpha(bare, d_pattern)
        alpha = alpha if alpha is not None else (d_alpha if d_alpha is not None else float(rank))
    else:
        alpha = float(rank)  # ai-toolkit / no alpha key: ComfyUI applies scale 1
    return LoraDelta(down, up, alpha)


def _source_format(formats: dict[str, int], sd: dict[str, torch.Tensor]) -> str | None:
    """The layout most layers came in, with ComfyUI's native down/up and BFL-without-alpha told apart."""
    if not formats:
        return None
    fmt = max(formats, key=formats.get)
    if fmt == "comfyui" and any(k.endswith(".lora_up.weight") for k in sd):
        return "comfyui-native"
    if fmt == "comfyui" and not any(k.endswith(".alpha") for k in sd):
        return "bfl-no-alpha"
    return fmt


_ADAPTER_SUFFIXES = tuple((f".{p}", p) for p in (*LOKR_PARTS, *LOHA_PARTS, "dora_scale"))
_DORA_ROLES = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
               "dora_scale": "dora_scale"}


def _is_adapter_file(sd: dict[str, torch.Tensor]) -> bool:
    return any(k.endswith(suffix) for k in sd for suffix, _ in _ADAPTER_SUFFIXES)


def _adapter_split(key: str) -> tuple[str, str]:
    for suffix, part in (*_ADAPTER_SUFFIXES, *((f".{p}", p) for p in DORA_PARTS), (".alpha", "alpha"),
                         (".diff_b", "diff_b"), (".diff", "diff")):
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return key, ""


def _adapter_kind(module: str, parts: dict[str, torch.Tensor], name: str) -> str:
    kinds = [k for k, names in (("lokr", LOKR_PARTS), ("loha", LOHA_PARTS)) if any(p in parts for p in names)]
    if "dora_scale" in parts:
        kinds.append("dora")
    if len(kinds) != 1:
        raise ValueError(f"LoRA '{name}': layer '{module}' mixes {kinds} parts: the file is not one adapter's layout.")
    return kinds[0]


def _adapter_layer(module: str, parts: dict[str, torch.Tensor], name: str) -> AdapterDelta:
    """One LoKr/LoHa/DoRA layer, checked for completeness (the parts ComfyUI's loader needs)."""
    kind = _adapter_kind(module, parts, name)
    alpha = float(parts["alpha"].float().item()) if "alpha" in parts else None
    if kind == "dora":
        found = {_DORA_ROLES[k]: t for k, t in parts.items() if k in _DORA_ROLES}
        need = ("down", "up", "dora_scale")
    elif kind == "loha":
        found, need = {k: t for k, t in parts.items() if k in LOHA_PARTS}, LOHA_PARTS[:4]
    else:
        found = {k: t for k, t in parts.items() if k in LOKR_PARTS}
        need = ("lokr_w1" if "lokr_w1" in found else "lokr_w1_a", "lokr_w2" if "lokr_w2" in found else "lokr_w2_a")
        need += tuple(n.replace("_a", "_b") for n in need if n.endswith("_a"))
    missing = [n for n in need if n not in found]
    if missing:
        raise ValueError(f"LoRA '{name}': {ADAPTER_NAMES[kind]} layer '{module}' has no {missing}: the file is "
                         "incomplete.")
    layer = AdapterDelta(kind, found, alpha)
    if kind == "dora" and tuple(found["dora_scale"].shape) != (layer.shape[0], 1):
        raise ValueError(f"LoRA '{name}': DoRA layer '{module}' has dora_scale {tuple(found['dora_scale'].shape)}; "
                         f"this pack reads the output-axis form [{layer.shape[0]}, 1] that it writes.")
    return layer


def adapter_from_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str], name: str) -> KleinLora:
    """A LoKr, LoHa or DoRA file in ComfyUI/BFL (or kohya) names -> KleinLora with AdapterDelta layers."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in sd.items():
        module, part = _adapter_split(key)
        if not part:
            raise ValueError(f"LoRA '{name}': key '{key}' is not a part of a LoKr, LoHa or DoRA layer.")
        groups.setdefault(module, {})[part] = t
    nd, ns = _block_counts(list(groups))
    kohya = {KOHYA_PREFIX + n.replace(".", "_"): n for n in _layer_names(nd, ns)}
    out = KleinLora(metadata=metadata, name=name, source_format="comfyui")
    for module, parts in groups.items():
        try:
            layer, third, fmt = _resolve(module, kohya, {})
        except KeyError:
            raise ValueError(f"LoRA '{name}': '{module}' is not a klein layer name (expected diffusion_model.<BFL "
                             "name> or lora_unet_<BFL name>).") from None
        for role in ("diff", "diff_b"):
            if role in parts:
                out.diffs[f"{layer}.{role}"] = parts.pop(role)
        if parts:
            out.layers[layer] = _adapter_layer(module, parts, name)
    kinds = {d.kind for d in out.layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"LoRA '{name}' mixes adapters {sorted(kinds)} across its layers; this pack reads one kind "
                         "per file.")
    return out


def from_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                    name: str = "lora") -> KleinLora:
    """Any supported layout -> KleinLora, alpha folded into the per-layer scale as the trainer meant it."""
    metadata = dict(metadata or {})
    if _is_adapter_file(sd):
        return adapter_from_state_dict(sd, metadata, name)
    groups = _group_keys(sd, name)
    nd, ns = _block_counts(list(groups))
    kohya = {KOHYA_PREFIX + n.replace(".", "_"): n for n in _layer_names(nd, ns)}
    dmap = diffusers_layer_map(nd, ns)
    d_alpha, d_pattern = _diffusers_alphas(metadata)
    out = KleinLora(metadata=metadata, name=name)
    formats: dict[str, int] = {}
    qkv_parts: dict[str, dict[int, LoraDelta]] = {}
    unknown = []
    for module, parts in groups.items():
        try:
            layer, third, fmt = _resolve(module, kohya, dmap)
        except KeyError:
            unknown.append(module)
            continue
        formats[fmt] = formats.get(fmt, 0) + 1
        for role in ("diff", "diff_b"):
            if role in parts:
                out.diffs[f"{layer}.{role}"] = parts[role]
        delta = _layer_delta(module, parts, fmt, name, d_alpha, d_pattern)
        if delta is None:
            continue
        if third is not None:
            qkv_parts.setdefault(layer, {})[third] = delta
        elif layer in out.layers:
            raise ValueError(f"LoRA '{name}': layer '{layer}' appears twice (as '{module}' and another name).")
        else:
            out.layers[layer] = delta
    if unknown:
        raise ValueError(f"LoRA '{name}': {len(unknown)} layer names are not klein layers in any known format, e.g. "
                         f"{unknown[:3]}. Expected diffusion_model.<BFL name>, lora_unet_<BFL name>, or "
                         "transformer.<diffusers Flux2 name>.")
    for layer, parts in qkv_parts.items():
        out.layers[layer] = _fuse_parts(parts, layer)
    fmt = _source_format(formats, sd)
    if fmt is not None:
        out.source_format = fmt
    if not out.layers and not out.diffs:
        raise ValueError(f"LoRA '{name}' holds no LoRA layers.")
    return out


def read_lora_file(path: str | Path, field: str = "") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a LoRA file, read in one open; the error names the field and the file.

    safetensors raises several types (and messages like 'header too large') for a truncated or foreign
    file: every one becomes the same advice.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".safetensors", ".sft"):
            from safetensors import safe_open

            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        import comfy.utils  # .pt / .ckpt LoRAs: ComfyUI's loader, weights only

        return comfy.utils.load_torch_file(str(path), safe_load=True), {}
    except Exception as e:  # noqa: BLE001 - see above
        where = f"{field}: " if field else ""
        raise ValueError(f"{where}LoRA file {path} cannot be read ({e}): it is truncated or not a safetensors LoRA. "
                         "Download or save it again, or pick another file.") from e


def load_lora_file(path: str | Path, field: str = "") -> KleinLora:
    """Read a LoRA of any supported layout, with its metadata; errors name `field` (the node input) and the file."""
    path = Path(path)
    sd, metadata = read_lora_file(path, field)
    try:
        lora = from_state_dict(sd, metadata, name=path.name)
    except ValueError as e:
        raise ValueError(f"{field}: {e}" if field else str(e)) from e
    logging.info("Klein LoRA: read %s (%s, %d layers, %d diff tensors)", path.name, lora.source_format,
                 len(lora.layers), len(lora.diffs))
    return lora


def bfl_key(layer: str, part: str) -> str:
    """The ComfyUI/BFL file key of a layer's part ("lora_A.weight", "lora_B.weight", "alpha")."""
    return f"{PREFIX}{layer}.{part}"


def to_comfy_state_dict(lora: KleinLora, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """ComfyUI/BFL layout (this pack's trainer's): lora_A/lora_B + alpha under diffusion_model.*"""
    sd = {}
    for layer, d in sorted(lora.layers.items()):
        cast = (lambda t: t.to(dtype)) if dtype is not None else (lambda t: t)
        if isinstance(d, AdapterDelta):  # LoKr / LoHa / DoRA: their parts as ComfyUI reads them
            sd.update({bfl_key(layer, part): cast(t).contiguous() for part, t in d.file_parts().items()})
            if d.alpha is not None:
                sd[bfl_key(layer, "alpha")] = torch.tensor(float(d.alpha), dtype=dtype or torch.float32)
            continue
        sd[bfl_key(layer, "lora_A.weight")] = cast(d.down).contiguous()
        sd[bfl_key(layer, "lora_B.weight")] = cast(d.up).contiguous()
        sd[bfl_key(layer, "alpha")] = torch.tensor(float(d.alpha), dtype=dtype or torch.float32)
    for key, t in sorted(lora.diffs.items()):
        sd[PREFIX + key] = t.to(dtype) if dtype is not None else t
    return sd


def to_diffusers_state_dict(lora: KleinLora, dtype: torch.dtype | None = None
                            ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """diffusers layout: `transformer.*` names, fused qkv split into q/k/v (A repeated, B by rows), the
    scale folded into B (lora_alpha = r everywhere), per-layer ranks in rank_pattern/alpha_pattern.

    diffusers/peft have no slot for full diff tensors: they are left out, with a warning. diffusers' Flux2
    loader reads plain LoRA only: a LoKr, LoHa or DoRA is refused (DIFFUSERS_LOADS).
    """
    lora.require_lora("the diffusers export (diffusers loads plain LoRA only for FLUX.2)")
    nd, ns = _block_counts(list(lora.layers))
    inverse: dict[str, list[str]] = {}
    for dname, (bfl, third) in diffusers_layer_map(nd, ns).items():
        inverse.setdefault(bfl, [None, None, None] if third is not None else [None])
        inverse[bfl][third or 0] = dname
    sd: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for layer, d in sorted(lora.layers.items()):
        if layer not in inverse:
            raise ValueError(f"layer '{layer}' has no diffusers Flux2 name: export this LoRA in ComfyUI format.")
        down, up = d.folded(dtype=torch.float32)
        names = inverse[layer]
        ups = torch.chunk(up, 3, 0) if len(names) == 3 else (up,)
        for dname, u in zip(names, ups, strict=True):
            sd[f"{DIFFUSERS_PREFIX}{dname}.lora_A.weight"] = down.to(dtype or d.down.dtype).clone()
            sd[f"{DIFFUSERS_PREFIX}{dname}.lora_B.weight"] = u.to(dtype or d.up.dtype).contiguous()
            ranks[dname] = d.rank
    if lora.diffs:
        logging.warning("Klein LoRA: %d full diff tensors (norm-scale/bias diffs) have no diffusers form and are "
                        "left out of the diffusers export of '%s'; the ComfyUI export keeps them.",
                        len(lora.diffs), lora.name)
    common = max(set(ranks.values()), key=list(ranks.values()).count) if ranks else 1
    odd = {k: r for k, r in ranks.items() if r != common}
    meta = {"transformer.r": common, "transformer.lora_alpha": common, "transformer.rank_pattern": odd,
            "transformer.alpha_pattern": dict(odd), "transformer.target_modules": sorted(ranks),
            "transformer.lora_dropout": 0.0, "transformer.use_dora": False, "transformer.lora_bias": False}
    metadata = {k: v for k, v in lora.metadata.items() if k != ADAPTER_METADATA_KEY}
    metadata[ADAPTER_METADATA_KEY] = json.dumps(meta, indent=2, sort_keys=True)
    return sd, metadata


def save_lora(lora: KleinLora, path: str | Path, fmt: str = "comfyui", dtype: torch.dtype | None = None,
              extra_metadata: dict[str, str] | None = None) -> Path:
    """Write atomically in ComfyUI/BFL (default) or diffusers layout; the source metadata is kept."""
    from ..paths import atomic_save_safetensors

    if fmt not in FORMATS:
        raise ValueError(f"format '{fmt}' is not one of {FORMATS}.")
    if fmt == "comfyui":
        sd, metadata = to_comfy_state_dict(lora, dtype), dict(lora.metadata)
    else:
        sd, metadata = to_diffusers_state_dict(lora, dtype)
    metadata.update(extra_metadata or {})
    metadata = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    return atomic_save_safetensors(sd, Path(path), metadata=metadata)
