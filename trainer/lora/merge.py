"""Merge, resize and bake LoRAs (in the normalised form of trainer/lora/formats.py).

- exact merge: ranks concatenated, each LoRA's weight and alpha/rank scale folded into its B, so the
  merged LoRA's delta is the weighted sum of the deltas (to float rounding). Layers over the union.
- compact merge / resize: the merged delta of each layer, truncated by SVD to a target rank. The SVD
  runs on the low-rank factors (QR of the stacked B and A^T, then an R x R SVD), never on the full
  out x in matrix, so a 9B linear1 with R = 64 costs a few milliseconds.
  Reported: the relative Frobenius error ||D - D_k|| / ||D|| = sqrt(discarded sigma^2 / all sigma^2)
  and the energy kept (kept sigma^2 / all sigma^2), per layer and overall (summed over layers).
- bake: the weighted deltas added into a diffusion model's weights, saved with the same keys and
  dtypes so UNETLoader loads it like the original. Exact for every adapter: a LoKr's or LoHa's delta is
  a matrix like a LoRA's, a DoRA's is W' - W on this base (each computed as ComfyUI's loader does; several
  files are each applied to the original weights, so their order does not matter).
- merge and resize take plain LoRAs only; a LoKr, LoHa or DoRA is refused with the reason.
Full diff tensors (ComfyUI trainer norm-scale/bias diffs) are added with the same weights.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..model.sizes import width_label
from .formats import AdapterDelta, KleinLora, LoraDelta

_IN_IS_HIDDEN = ("img_attn.qkv", "txt_attn.qkv", "img_attn.proj", "txt_attn.proj", "img_mlp.0", "txt_mlp.0",
                 "linear1")
_OUT_IS_HIDDEN = ("img_mlp.2", "txt_mlp.2", "linear2")


@dataclass
class LayerReport:
    layer: str
    rank_in: int
    rank_out: int
    rel_error: float
    energy_kept: float
    total_sq: float = 0.0
    dropped_sq: float = 0.0


@dataclass
class MergeReport:
    mode: str
    layers: list[LayerReport] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def overall_error(self) -> float:
        tot = sum(r.total_sq for r in self.layers)
        return math.sqrt(sum(r.dropped_sq for r in self.layers) / tot) if tot > 0 else 0.0

    @property
    def overall_energy(self) -> float:
        tot = sum(r.total_sq for r in self.layers)
        return 1.0 - sum(r.dropped_sq for r in self.layers) / tot if tot > 0 else 1.0

    def text(self) -> str:
        lines = [f"mode {self.mode}: {len(self.layers)} layers, overall relative Frobenius error "
                 f"{self.overall_error:.2%}, energy kept {self.overall_energy:.2%}"]
        lines += self.notes
        lines += [f"  {r.layer}: rank {r.rank_in} -> {r.rank_out}, error {r.rel_error:.2%}, "
                  f"energy kept {r.energy_kept:.2%}" for r in self.layers]
        return "\n".join(lines)


def base_width(lora: KleinLora) -> int | None:
    """The transformer's hidden width the LoRA was trained on (trainer/model/sizes.py names it)."""
    for layer, d in lora.layers.items():
        if layer.endswith(_IN_IS_HIDDEN):
            return d.shape[1]
        if layer.endswith(_OUT_IS_HIDDEN):
            return d.shape[0]
    return None


def _describe_width(w: int | None) -> str:
    return "unknown width" if w is None else f"width {w}" + (f" ({width_label(w)})" if width_label(w) else "")


def check_same_base(loras: list[KleinLora]) -> None:
    """Same hidden width and the same shape wherever two LoRAs touch the same layer."""
    widths = {lo.name: base_width(lo) for lo in loras}
    known = {n: w for n, w in widths.items() if w is not None}
    if len(set(known.values())) > 1:
        desc = ", ".join(f"'{n}' {_describe_width(w)}" for n, w in known.items())
        raise ValueError(f"the LoRAs were trained on different base models: {desc}. A klein 4B LoRA cannot merge "
                         "with a klein 9B one; pick LoRAs of one base.")
    shapes: dict[str, tuple[str, tuple]] = {}
    for lo in loras:
        for layer, d in lo.layers.items():
            if layer in shapes and shapes[layer][1] != d.shape:
                other, shape = shapes[layer]
                raise ValueError(f"layer '{layer}' is {shape[0]}x{shape[1]} in '{other}' but {d.shape[0]}x{d.shape[1]} "
                                 f"in '{lo.name}': the LoRAs are for different base models; pick LoRAs of one base.")
            shapes.setdefault(layer, (lo.name, d.shape))
        for key, t in lo.diffs.items():
            if key in shapes and shapes[key][1] != tuple(t.shape):
                raise ValueError(f"diff '{key}' is {shapes[key][1]} in '{shapes[key][0]}' but {tuple(t.shape)} in "
                                 f"'{lo.name}': the LoRAs are for different base models.")
            shapes.setdefault(key, (lo.name, tuple(t.shape)))


def _check_weights(loras: list[KleinLora], weights: list[float]) -> None:
    if len(loras) != len(weights):
        raise ValueError(f"{len(loras)} LoRAs but {len(weights)} weights: give one weight per LoRA.")
    if not loras:
        raise ValueError("no LoRAs given: pick at least one.")


def _merged_diffs(loras: list[KleinLora], weights: list[float]) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for lo, w in zip(loras, weights, strict=True):
        for key, t in lo.diffs.items():
            out[key] = out.get(key, 0) + w * t.float()
    return out


def _merged_metadata(loras: list[KleinLora], weights: list[float], mode: str, rank: int | None) -> dict[str, str]:
    import json

    meta = {"klein_lora_studio.merge": json.dumps({"mode": mode, "target_rank": rank,
                                                   "sources": [{"name": lo.name, "weight": w,
                                                                "format": lo.source_format}
                                                               for lo, w in zip(loras, weights, strict=True)]})}
    if len(loras) == 1:  # a resize keeps the source's metadata
        meta = {**loras[0].metadata, **meta}
    return meta


def exact_merge(loras: list[KleinLora], weights: list[float], name: str = "merged") -> KleinLora:
    """Ranks concatenated: delta = sum_i w_i * delta_i exactly (weights and scales folded into B). Plain LoRA
    only: a LoKr, LoHa or DoRA is refused naming its adapter (formats.KleinLora.require_lora says why)."""
    _check_weights(loras, weights)
    for lo in loras:
        lo.require_lora("merge / resize")
    check_same_base(loras)
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for lo, w in zip(loras, weights, strict=True):
        for layer, d in lo.layers.items():
            parts.setdefault(layer, []).append(d.folded(w))
    layers = {}
    for layer, ps in parts.items():
        down = torch.cat([p[0] for p in ps], 0)
        up = torch.cat([p[1] for p in ps], 1)
        layers[layer] = LoraDelta(down, up, float(down.shape[0]))
    return KleinLora(layers, _merged_diffs(loras, weights), _merged_metadata(loras, weights, "exact", None),
                     "comfyui", name)


def svd_truncate(d: LoraDelta, rank: int, layer: str = "") -> tuple[LoraDelta, LayerReport]:
    """Best rank-`rank` approximation (Eckart-Young) of a low-rank delta, computed from its factors."""
    down, up = d.folded(dtype=torch.float64)
    qb, rb = torch.linalg.qr(up)  # up = qb rb, qb [out, R]
    qa, ra = torch.linalg.qr(down.T)  # down^T = qa ra, qa [in, R]
    u, s, vh = torch.linalg.svd(rb @ ra.T)  # delta = qb (rb ra^T) qa^T
    k = min(rank, int(s.numel()))
    total = float((s ** 2).sum())
    dropped = float((s[k:] ** 2).sum())
    root = s[:k].sqrt()
    new_up = (qb @ u[:, :k]) * root  # balanced split of sigma between the factors
    new_down = root[:, None] * (vh[:k] @ qa.T)
    dtype = torch.promote_types(d.up.dtype, torch.float32)
    rel = math.sqrt(dropped / total) if total > 0 else 0.0
    kept = 1.0 - dropped / total if total > 0 else 1.0
    rep = LayerReport(layer, d.rank, k, rel, kept, total, dropped)
    return LoraDelta(new_down.to(dtype), new_up.to(dtype), float(k)), rep


def compact_merge(loras: list[KleinLora], weights: list[float], rank: int,
                  name: str = "merged") -> tuple[KleinLora, MergeReport]:
    """Exact merge, then each layer's delta truncated by SVD to `rank` (layers already at or below keep theirs)."""
    if rank < 1:
        raise ValueError(f"target rank {rank} is below 1: give a rank of 1 or more.")
    merged = exact_merge(loras, weights, name)
    report = MergeReport("compact" if len(loras) > 1 else "resize")
    layers = {}
    for layer in sorted(merged.layers):
        layers[layer], rep = svd_truncate(merged.layers[layer], rank, layer)
        report.layers.append(rep)
    merged.layers = layers
    merged.metadata = _merged_metadata(loras, weights, report.mode, rank)
    return merged, report


def resize(lora: KleinLora, rank: int, name: str | None = None) -> tuple[KleinLora, MergeReport]:
    """One LoRA to a lower rank by SVD, with the same error report as a compact merge."""
    return compact_merge([lora], [1.0], rank, name or lora.name)


def exact_report(lora: KleinLora) -> MergeReport:
    rep = MergeReport("exact")
    rep.layers = [LayerReport(k, d.rank, d.rank, 0.0, 1.0) for k, d in sorted(lora.layers.items())]
    return rep


# --- bake into a diffusion model -----------------------------------------------------------------

_MODEL_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")


def _model_prefix(keys) -> str:
    for p in _MODEL_PREFIXES:
        if any(k.startswith(p + "double_blocks.") or k.startswith(p + "single_blocks.") for k in keys):
            return p
    raise ValueError("the model file has no double_blocks/single_blocks weights: it is not a FLUX.2 [klein] "
                     "diffusion model (pick a file from models/diffusion_models).")


def bake_state_dict(model_sd: dict[str, torch.Tensor], loras: list[KleinLora], weights: list[float],
                    model_name: str = "model") -> dict[str, torch.Tensor]:
    """model weights + sum_i w_i delta_i, computed in float32 and cast back to each tensor's dtype."""
    _check_weights(loras, weights)
    check_same_base(loras)
    prefix = _model_prefix(model_sd.keys())
    out = dict(model_sd)
    deltas: dict[str, torch.Tensor] = {}
    for lo, w in zip(loras, weights, strict=True):
        for layer, d in lo.layers.items():
            key = f"{prefix}{layer}.weight"
            if key not in model_sd:
                raise ValueError(f"LoRA '{lo.name}' targets '{layer}', which model '{model_name}' does not have: the "
                                 "LoRA is for another base model.")
            if tuple(model_sd[key].shape) != d.shape:
                w_model = model_sd[key].shape
                raise ValueError(f"LoRA '{lo.name}' layer '{layer}' is {d.shape[0]}x{d.shape[1]} but model "
                                 f"'{model_name}' has {w_model[0]}x{w_model[1]} there: the LoRA was trained on "
                                 f"{_describe_width(base_width(lo))}; bake it into that base.")
            # LoKr/LoHa: their additive update; DoRA: W' - W on this base, as ComfyUI's loader computes it
            update = d.delta_on(model_sd[key]) if isinstance(d, AdapterDelta) else d.delta(torch.float32)
            deltas[key] = deltas.get(key, 0) + w * update
        for dkey, t in lo.diffs.items():
            layer, kind = dkey.rsplit(".", 1)
            names = [f"{prefix}{layer}.bias"] if kind == "diff_b" else [f"{prefix}{layer}.weight",
                                                                         f"{prefix}{layer}.scale"]
            key = next((n for n in names if n in model_sd), None)
            if key is None or tuple(model_sd[key].shape) != tuple(t.shape):
                raise ValueError(f"LoRA '{lo.name}' diff '{dkey}' ({tuple(t.shape)}) has no matching tensor in model "
                                 f"'{model_name}': the LoRA is for another base model.")
            deltas[key] = deltas.get(key, 0) + w * t.float()
    for key, delta in deltas.items():
        base = model_sd[key]
        if base.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or not base.is_floating_point():
            raise ValueError(f"model '{model_name}' stores '{key}' as {base.dtype}: baking into quantised weights "
                             "would lose the LoRA in rounding; bake into the bf16/fp16/fp32 release instead.")
        out[key] = (base.float() + delta).to(base.dtype)
    logging.info("Klein LoRA: baked %d LoRA(s) into %d tensors of %s", len(loras), len(deltas), model_name)
    return out


def bake_file(model_path: str | Path, loras: list[KleinLora], weights: list[float], out_path: str | Path) -> Path:
    """Bake into a model file; same keys and dtypes, metadata kept plus a note of what was baked."""
    import json

    from safetensors import safe_open

    from ..paths import atomic_save_safetensors

    model_path = Path(model_path)
    with safe_open(str(model_path), framework="pt", device="cpu") as f:
        metadata = dict(f.metadata() or {})
        sd = {k: f.get_tensor(k) for k in f.keys()}
    baked = bake_state_dict(sd, loras, weights, model_path.name)
    metadata["klein_lora_studio.baked"] = json.dumps(
        {"base": model_path.name, "loras": [{"name": lo.name, "weight": w} for lo, w in zip(loras, weights, strict=True)]})
    return atomic_save_safetensors(baked, Path(out_path), metadata=metadata)
