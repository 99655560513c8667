"""Which linear layers of a klein transformer carry LoRA.

The block map comes from the workshop notes, in klein 4B's single numbering (double-stream blocks
first, then single-stream blocks):

    double 0-4      text <-> image binding (trigger <-> concept)
    single 5-10     texture, colour, low-level style          ("single early")
    single 11-18    parts, identity, structure                ("single mid")
    single 19-24    composition, layout                       ("single late")

klein 9B has 8 double and 24 single blocks. All double blocks stay one group; the single blocks are
split by the same proportions as 4B's 20 (6 : 8 : 6), boundaries rounded to the nearest block:
single_blocks 0-6 early, 7-16 mid, 17-23 late (9B numbering 8-14, 15-24, 25-31).

Single-stream blocks fuse q, k, v and the MLP input in one linear (`linear1`) and the attention
output with the MLP output in another (`linear2`). "Attention only" therefore still trains the whole
of `linear1`/`linear2` in single blocks (the MLP rows included): splitting one LoRA by rows would
give a file other tools do not load. In double blocks it means `*_attn.qkv` and `*_attn.proj` only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

GROUPS = ("double", "single_early", "single_mid", "single_late")
GROUP_LABELS = {
    "double": "double-stream: text <-> image binding (trigger <-> concept)",
    "single_early": "single early: texture, colour, low-level style",
    "single_mid": "single mid: parts, identity, structure",
    "single_late": "single late: composition, layout",
}
LAYER_KINDS = ("attention", "attention_mlp", "all_linears")
STREAMS = ("both", "image", "text")

# 4B proportions of the single-stream bands: 6 of 20 early, 8 mid, 6 late.
_EARLY_END, _MID_END, _SINGLE_REF = 6, 14, 20

_DOUBLE_ATTN = ("{s}_attn.qkv", "{s}_attn.proj")
_DOUBLE_MLP = ("{s}_mlp.0", "{s}_mlp.2")
_SINGLE_FUSED = ("linear1", "linear2")


@dataclass(frozen=True)
class TargetPreset:
    groups: tuple[str, ...]
    layers: str
    streams: str = "both"
    why: str = ""


PRESETS: dict[str, TargetPreset] = {
    "all blocks, attention (seed default)": TargetPreset(
        GROUPS, "attention", why="the workshop's practical recipe: attention across all blocks"),
    "style": TargetPreset(
        ("double", "single_early", "single_late"), "attention",
        why="trigger binding + texture/colour + composition; leaves identity/structure alone"),
    "character": TargetPreset(
        ("double", "single_mid"), "attention_mlp",
        why="trigger binding + parts/identity/structure, with MLP capacity for detail"),
    "object": TargetPreset(
        ("double", "single_early", "single_mid"), "attention",
        why="trigger binding + material/texture + parts/structure"),
    "image-to-image": TargetPreset(
        GROUPS, "attention",
        why="an edit touches every level: binding, texture, structure and layout"),
}


CUSTOM = "custom"  # the selector's preset that uses its switches


def selection(preset: str, switches: tuple[bool, ...], layers: str, streams: str) -> tuple[tuple[str, ...], str, str]:
    """(groups, layers, streams) of the selector's widgets: the preset's, or with 'custom' the group switches'
    (one per GROUPS entry) and the given layers and streams."""
    if preset != CUSTOM:
        p = PRESETS[preset]
        return p.groups, p.layers, p.streams
    return tuple(g for g, on in zip(GROUPS, switches, strict=True) if on), layers, streams


@dataclass(frozen=True)
class BlockCounts:
    double: int
    single: int

    @classmethod
    def of_model(cls, diffusion_model) -> "BlockCounts":
        return cls(len(diffusion_model.double_blocks), len(diffusion_model.single_blocks))


@dataclass
class KleinTargets:
    """The resolved LoRA targets: exact module names inside the diffusion model."""

    modules: list[str]
    groups: tuple[str, ...]
    layers: str
    streams: str
    counts: BlockCounts
    bands: dict[str, list[int]] = field(default_factory=dict)

    def describe(self) -> str:
        lines = [f"{len(self.modules)} linear layers in a {self.counts.double}+{self.counts.single}-block model "
                 f"({self.layers}, streams: {self.streams})"]
        for g in self.groups:
            blocks = self.bands.get(g, [])
            span = f"{blocks[0]}-{blocks[-1]}" if blocks else "none"
            lines.append(f"  {GROUP_LABELS[g]}: blocks {span} (global numbering)")
        return "\n".join(lines)


def single_bands(n_single: int) -> dict[str, range]:
    """Split `n_single` single-stream blocks (local indices) into early/mid/late like 4B's 6:8:6."""
    early_end = round(n_single * _EARLY_END / _SINGLE_REF)
    mid_end = round(n_single * _MID_END / _SINGLE_REF)
    return {"single_early": range(0, early_end), "single_mid": range(early_end, mid_end),
            "single_late": range(mid_end, n_single)}


def group_blocks(counts: BlockCounts) -> dict[str, list[str]]:
    """Block module prefixes per group, e.g. {"double": ["double_blocks.0", ...], ...}."""
    out = {"double": [f"double_blocks.{i}" for i in range(counts.double)]}
    for name, idx in single_bands(counts.single).items():
        out[name] = [f"single_blocks.{i}" for i in idx]
    return out


def global_numbers(counts: BlockCounts) -> dict[str, list[int]]:
    """The same groups in the workshop's single numbering (double first, then single)."""
    out = {"double": list(range(counts.double))}
    for name, idx in single_bands(counts.single).items():
        out[name] = [counts.double + i for i in idx]
    return out


def _suffixes(block_prefix: str, layers: str, streams: str) -> list[str]:
    if block_prefix.startswith("single_blocks"):
        return list(_SINGLE_FUSED)
    names = {"both": ("img", "txt"), "image": ("img",), "text": ("txt",)}[streams]
    patterns = _DOUBLE_ATTN + (_DOUBLE_MLP if layers != "attention" else ())
    return [p.format(s=s) for s in names for p in patterns]


def resolve_targets(groups: list[str] | tuple[str, ...], layers: str, counts: BlockCounts,
                    streams: str = "both", linear_names: set[str] | None = None) -> KleinTargets:
    """Turn group choices into exact module names for a model with `counts` blocks.

    `linear_names` is the set of names of every torch.nn.Linear in the diffusion model; when given,
    each resolved name is checked against it and "all_linears" takes every linear inside the
    selected blocks.
    """
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise ValueError(f"Unknown block group(s) {unknown}; choose from {list(GROUPS)}.")
    if layers not in LAYER_KINDS:
        raise ValueError(f"Unknown layer kind '{layers}'; choose from {list(LAYER_KINDS)}.")
    if streams not in STREAMS:
        raise ValueError(f"Unknown stream choice '{streams}'; choose from {list(STREAMS)}.")
    if not groups:
        raise ValueError("No block group selected: enable at least one of double, single early, single mid "
                         "or single late, or pick a preset. An empty selection would train nothing.")
    per_group = group_blocks(counts)
    modules: list[str] = []
    for g in GROUPS:
        if g not in groups:
            continue
        for prefix in per_group[g]:
            if layers == "all_linears" and linear_names is not None:
                inside = sorted(n for n in linear_names if n.startswith(prefix + "."))
                if prefix.startswith("double_blocks") and streams != "both":
                    tag = "img_" if streams == "image" else "txt_"
                    inside = [n for n in inside if n[len(prefix) + 1:].startswith(tag)]
                modules.extend(inside)
            else:
                modules.extend(f"{prefix}.{s}" for s in _suffixes(prefix, layers, streams))
    if linear_names is not None:
        missing = [m for m in modules if m not in linear_names]
        if missing:
            raise ValueError(f"{len(missing)} target layer(s) do not exist in the connected model, e.g. "
                             f"{missing[:3]}: is this a FLUX.2 [klein] model?")
    if not modules:
        raise ValueError(f"The selection {list(groups)} has no blocks in a model with {counts.double} double and "
                         f"{counts.single} single blocks: select another group.")
    numbers = global_numbers(counts)
    return KleinTargets(modules=modules, groups=tuple(g for g in GROUPS if g in groups), layers=layers,
                        streams=streams, counts=counts, bands={g: numbers[g] for g in groups})


def linear_layer_names(diffusion_model) -> set[str]:
    import torch

    return {n for n, m in diffusion_model.named_modules() if isinstance(m, torch.nn.Linear)}
