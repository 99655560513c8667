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

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.scale * (self.up.to(dtype) @ self.down.to(dtype))

    def folded(self, weight: float = 1.0, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """(down, up * weight * scale): the same delta with the scale inside B (alpha = rank)."""
        return self.down.to(dtype), self.up.to(dtype) * (weight * self.scale)


@dataclass
class KleinLora:
    """A LoRA in BFL layer names, whatever file it came from."""

    layers: dict[str, LoraDelta] = field(default_factory=dict)
    diffs: dict[str, torch.Tensor] = field(default_factory=dict)  # "<layer>.diff" / "<layer>.diff_b": full tensors
    metadata: dict[str, str] = field(default_factory=dict)
    source_format: str = "comfyui"
    name: str = "lora"

    def ranks(self) -> dict[str, int]:
        return {k: v.rank for k, v in self.layers.items()}


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
                             "is not a LoRA this pack reads (LoKr/LoHa and DoRA are not supported).")
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


def from_state_dict(sd: dict[str, torch.Tensor], metadata: dict[str, str] | None = None,
                    name: str = "lora") -> KleinLora:
    """Any supported layout -> KleinLora, alpha folded into the per-layer scale as the trainer meant it."""
    metadata = dict(metadata or {})
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

    diffusers/peft have no slot for full diff tensors: they are left out, with a warning.
    """
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
