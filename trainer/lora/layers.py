"""LoRA layers on a ComfyUI diffusion model through peft, and the ComfyUI/BFL file format.

peft builds the layers (LoraConfig, its init: A Kaiming-uniform, B zero, scale alpha/rank) and
takes them out again (LoraModel.unload), so the model a user wired in is the same object with the
same weights afterwards. The file uses ComfyUI/BFL names with the scale stated by an `alpha` key:
`diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight`, `...lora_B.weight`, `...alpha`;
ComfyUI applies alpha/rank, peft applied lora_alpha/r: the same number, so strength 1.0 is the
strength the trainer trained at.
"""
from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from .formats import KleinLora, LoraDelta, bfl_key, to_comfy_state_dict

ADAPTER = "klein"
SAVE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


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


def check_rank(diffusion_model: torch.nn.Module, modules: list[str], rank: int) -> None:
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

    def layer(self, name: str):
        return self.model.get_submodule(name)

    def parameters(self) -> list[torch.nn.Parameter]:
        out = []
        for name in self.modules:
            layer = self.layer(name)
            out += [layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight]
        return out

    def to_lora(self, dtype: torch.dtype = torch.float32) -> KleinLora:
        """The trained layers as a KleinLora (CPU copies), for any of trainer/lora/formats.py's writers."""
        def copy(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to("cpu", dtype).clone()

        return KleinLora({name: LoraDelta(copy(self.layer(name).lora_A[ADAPTER].weight),
                                          copy(self.layer(name).lora_B[ADAPTER].weight), self.alpha)
                          for name in self.modules})

    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """ComfyUI/BFL-format tensors on the CPU."""
        return to_comfy_state_dict(self.to_lora(dtype), dtype)

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        for name in self.modules:
            layer = self.layer(name)
            for part in ("lora_A", "lora_B"):
                dst = getattr(layer, part)[ADAPTER].weight
                key = bfl_key(name, f"{part}.weight")
                src = sd[key]
                if src.shape != dst.shape:
                    raise ValueError(f"{key} has shape {tuple(src.shape)}, the run expects "
                                     f"{tuple(dst.shape)}: the file was trained with another rank or model.")
                dst.copy_(src)


@contextmanager
def lora_layers(diffusion_model: torch.nn.Module, modules: list[str], rank: int, alpha: float,
                param_dtype: torch.dtype = torch.float32, seed: int = 0):
    """Inject peft LoRA layers into `modules` for the duration of the block, then remove them.

    The base weights, their requires_grad flags and the train/eval mode are as before afterwards,
    whether the block finishes, is cancelled or raises.
    """
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    check_rank(diffusion_model, modules, rank)
    flags = {n: p.requires_grad for n, p in diffusion_model.named_parameters()}
    was_training = diffusion_model.training
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, init_lora_weights=True,
                        target_modules="(" + "|".join(re.escape(m) for m in modules) + ")")
    fork_devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)  # the A matrices' init depends on the run's seed, nothing else
        tuner = LoraModel(diffusion_model, config, ADAPTER)
    try:
        handle = LoraHandle(diffusion_model, list(modules), rank, float(alpha))
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
