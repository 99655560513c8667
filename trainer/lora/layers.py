"""LoRA layers on a ComfyUI diffusion model through peft, and the ComfyUI/BFL file format.

peft builds the layers (LoraConfig, its init: A Kaiming-uniform, B zero, scale alpha/rank) and
takes them out again (LoraModel.unload), so the model a user wired in is the same object with the
same weights afterwards. The file uses ComfyUI/BFL names with the scale stated by an `alpha` key:
`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`, `...lora_B.weight`, `...alpha`;
ComfyUI applies alpha/rank, peft applied lora_alpha/r: the same number, so strength 1.0 is the
strength the trainer trained at.

The other adapters (TrainConfig.adapter) are peft's too, on the same targets, saved in the keys ComfyUI's
stock loader applies (comfy/weight_adapter; formats.AdapterDelta states each convention):
- lokr (LoKrConfig): `lokr_w1`, `lokr_w2_a`/`lokr_w2_b` (or full `lokr_w2`), `alpha`. peft scales every
  LoKr by alpha/r, ComfyUI only when a factor is a product, so with both factors full the scale goes into w1
  and no alpha is written.
- loha (LoHaConfig): `hada_w1_a`...`hada_w2_b` + `alpha`, the same names and alpha/r on both sides.
- dora (LoraConfig(use_dora=True)): lora_A/lora_B/alpha + `dora_scale` [out, 1]. peft scales each output
  row by m / ||W + s BA||; ComfyUI's weight_decompose divides by the base's row norm ||W|| instead, so
  the file holds m * (||W|| + eps) / ||W + s BA||: at strength 1 the loaded model equals the trained one.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .formats import ADAPTER_NAMES, AdapterDelta, KleinLora, LoraDelta, bfl_key, to_comfy_state_dict

ADAPTER = "klein"
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}
LOKR_FULL = 2**20  # LoKr "full rank": a rank no klein width reaches, so peft keeps both Kronecker factors full


@dataclass(frozen=True)
class AdapterSpec:
    """Which adapter a run trains and its own knobs (TrainConfig's adapter, lokr_factor, lokr_full_rank)."""

    kind: str = "lora"
    lokr_factor: int = -1
    lokr_full_rank: bool = False

    @classmethod
    def of(cls, cfg) -> AdapterSpec:
        return cls(cfg.adapter, cfg.lokr_factor, cfg.lokr_full_rank)

    @property
    def label(self) -> str:
        return ADAPTER_NAMES[self.kind]


def peft_config(spec: AdapterSpec, rank: int, alpha: float, modules: list[str]):
    """peft's own config for the adapter, on exactly `modules` (no dropout: the run's noise is the seed's alone)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    target = "(" + "|".join(re.escape(m) for m in modules) + ")"
    if spec.kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True, target_modules=target,
                          use_dora=spec.kind == "dora")
    if spec.kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=0.0, module_dropout=0.0, init_weights=True,
                          target_modules=target)
    if spec.kind == "lokr":
        r, a = (LOKR_FULL, float(LOKR_FULL)) if spec.lokr_full_rank else (rank, alpha)
        return LoKrConfig(r=r, alpha=a, rank_dropout=0.0, module_dropout=0.0, init_weights=True,
                          decompose_factor=spec.lokr_factor, decompose_both=False, target_modules=target)
    raise ValueError(f"adapter '{spec.kind}' is not one of {list(ADAPTER_NAMES)}.")


def _tuner(spec: AdapterSpec):
    from peft.tuners.loha import LoHaModel
    from peft.tuners.lokr import LoKrModel
    from peft.tuners.lora import LoraModel

    return {"lora": LoraModel, "dora": LoraModel, "loha": LoHaModel, "lokr": LoKrModel}[spec.kind]


def rank_problem(rank: int, widths: dict[str, int]) -> str | None:
    """Why `rank` cannot train layers of these widths (min of in/out features per layer), or None."""
    if rank < 1:
        return f"rank {rank} is below 1: use a rank of 1 or more (the recipes use 16-32)."
    if not widths:
        return None
    narrow = min(widths, key=widths.get)
    if rank > widths[narrow]:
        return (f"rank {rank} is larger than layer {narrow} allows ({widths[narrow]}, the smaller of its "
                f"input and output widths): lower the rank to at most {widths[narrow]}.")
    return None


def check_rank(diffusion_model: torch.nn.Module, modules: list[str], rank: int, kind: str = "lora") -> None:
    """LoKr's rank sizes the small Kronecker factor's product, not the layer: only rank >= 1 holds for it."""
    if kind == "lokr":
        if rank < 1:
            raise ValueError(f"rank {rank} is below 1: use a rank of 1 or more (LoKr presets use 4-16).")
        return
    widths = {}
    for name in modules:
        m = diffusion_model.get_submodule(name)
        widths[name] = min(m.in_features, m.out_features)
    if (problem := rank_problem(rank, widths)) is not None:
        raise ValueError(problem)


@dataclass
class LoraHandle:
    """The injected layers of one training run."""

    model: torch.nn.Module
    modules: list[str]
    rank: int
    alpha: float
    spec: AdapterSpec = AdapterSpec()

    def layer(self, name: str):
        return self.model.get_submodule(name)

    def parts(self, name: str) -> dict[str, torch.nn.Parameter]:
        """A layer's trained tensors by peft's name without the adapter ('lokr_w1', 'lora_A.weight', ...)."""
        tag = f".{ADAPTER}"
        return {n.replace(tag, ""): p for n, p in sorted(self.layer(name).named_parameters())
                if tag in n and not n.startswith("base_layer")}

    def parameters(self) -> list[torch.nn.Parameter]:
        out = []
        for name in self.modules:
            if self.spec.kind == "lora":  # A then B per layer, as every LoRA run's optimizer state is ordered
                layer = self.layer(name)
                out += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
            else:
                out += list(self.parts(name).values())
        return out

    def to_lora(self, dtype: torch.dtype = torch.float32) -> KleinLora:
        """The trained layers as a KleinLora (CPU copies), for any of trainer/lora/formats.py's writers."""
        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", dtype).clone()

        if self.spec.kind != "lora":
            return KleinLora({name: self._adapter_delta(name, copy) for name in self.modules})
        return KleinLora({name: LoraDelta(copy(self.layer(name).lora_A[ADAPTER].weight),
                                          copy(self.layer(name).lora_B[ADAPTER].weight), self.alpha)
                          for name in self.modules})

    @torch.no_grad()
    def _adapter_delta(self, name: str, copy) -> AdapterDelta:
        """peft's tensors of one layer in ComfyUI's convention (the module docstring says why each changes)."""
        parts = {k: t.detach().float() for k, t in self.parts(name).items()}
        if self.spec.kind == "loha":
            return AdapterDelta("loha", {k: copy(t) for k, t in parts.items()}, self.alpha)
        if self.spec.kind == "lokr":
            if "lokr_w2" in parts and "lokr_w1" in parts:  # both full: ComfyUI applies no alpha, so fold peft's in
                scale = self.layer(name).scaling[ADAPTER]
                return AdapterDelta("lokr", {"lokr_w1": copy(parts["lokr_w1"] * scale), "lokr_w2": copy(parts["lokr_w2"])})
            return AdapterDelta("lokr", {k: copy(t) for k, t in parts.items()}, self.alpha)
        down, up, m = parts["lora_A.weight"], parts["lora_B.weight"], parts["lora_magnitude_vector.weight"]
        w = self.layer(name).get_base_layer().weight.detach().float()
        merged_norm = (w + (self.alpha / self.rank) * (up @ down)).norm(dim=1)
        base_norm = w.norm(dim=1) + torch.finfo(torch.float32).eps
        dora_scale = (m * base_norm / merged_norm).reshape(-1, 1)
        return AdapterDelta("dora", {"down": copy(down), "up": copy(up), "dora_scale": copy(dora_scale)}, self.alpha)

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """ComfyUI/BFL-format tensors on the CPU (what the LoRA file holds)."""
        return to_comfy_state_dict(self.to_lora(dtype), dtype)

    def training_tensors(self) -> dict[str, torch.Tensor]:
        """What a training state keeps to resume bit for bit: the file for LoRA, peft's own fp32 tensors otherwise
        (DoRA's file scale and a full LoKr's folded w1 are derived from them, not the other way round)."""
        if self.spec.kind == "lora":
            return self.state_dict(torch.float32)
        return {bfl_key(name, part): t.detach().to("cpu", torch.float32).clone()
                for name in self.modules for part, t in self.parts(name).items()}

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """A training state's tensors (training_tensors) back into the layers."""
        for name in self.modules:
            layer = self.layer(name)
            own = ({p: getattr(layer, p)[ADAPTER].weight for p in ("lora_A", "lora_B")} if self.spec.kind == "lora"
                   else self.parts(name))
            for part, dst in own.items():
                key = bfl_key(name, f"{part}.weight" if self.spec.kind == "lora" else part)
                if key not in sd:
                    raise ValueError(f"{key} is not in the saved state: it was trained with another adapter than "
                                     f"{self.spec.label}.")
                src = sd[key]
                if src.shape != dst.shape:
                    raise ValueError(f"{key} has shape {tuple(src.shape)}, the run expects "
                                     f"{tuple(dst.shape)}: the file was trained with another rank or model.")
                dst.copy_(src)


@contextmanager
def lora_layers(diffusion_model: torch.nn.Module, modules: list[str], rank: int, alpha: float,
                param_dtype: torch.dtype = torch.float32, seed: int = 0, spec: AdapterSpec | None = None):
    """Inject peft adapter layers (LoRA unless `spec` says otherwise) into `modules` for the duration of the
    block, then remove them.

    The base weights, their requires_grad flags and the train/eval mode are as before afterwards,
    whether the block finishes, is cancelled or raises.
    """
    spec = spec or AdapterSpec()
    check_rank(diffusion_model, modules, rank, spec.kind)
    flags = {n: p.requires_grad for n, p in diffusion_model.named_parameters()}
    was_training = diffusion_model.training
    config = peft_config(spec, rank, alpha, modules)
    fork_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)  # the factors' random init depends on the run's seed, nothing else
        tuner = _tuner(spec)(diffusion_model, config, ADAPTER)
    try:
        handle = LoraHandle(diffusion_model, list(modules), rank, float(alpha), spec)
        for p in handle.parameters():
            p.data = p.data.to(param_dtype)
            p.requires_grad_(True)
        yield handle
    finally:
        tuner.unload()
        for n, p in diffusion_model.named_parameters():
            p.requires_grad_(flags.get(n, False))
        diffusion_model.train(was_training)


def lora_metadata(**fields) -> dict[str, str]:
    """safetensors metadata: every value as a string (the format allows nothing else)."""
    import json

    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in fields.items()}


def adapter_metadata(spec: AdapterSpec) -> dict[str, object]:
    """The header fields naming a LoKr/LoHa/DoRA file's adapter; none for plain LoRA, whose files stay as they were
    (a header without `adapter` is a LoRA)."""
    if spec.kind == "lora":
        return {}
    fields: dict[str, object] = {"adapter": spec.kind, "format": f"comfyui-bfl-{spec.kind}"}
    if spec.kind == "lokr":
        fields.update(lokr_factor=spec.lokr_factor, lokr_full_rank=spec.lokr_full_rank)
    return fields
