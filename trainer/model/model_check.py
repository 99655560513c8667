"""Is a diffusion model file a FLUX.2 [klein] the trainer can train, and how wide are its layers?

Answered from the safetensors header alone (tensor names, shapes, dtypes; no weights are read), so
the pack can say it when a prompt is queued instead of minutes later inside the run. The
architecture is named by ComfyUI's own model detection (`comfy.model_detection`, fed shape-only
meta tensors), so the verdict is the one UNETLoader / CheckpointLoaderSimple would reach. Anything
this cannot read or recognise (not safetensors, diffusers layout, a format ComfyUI converts on load)
gets no verdict: the run-time check (`loop.check_klein`) still stands.
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache

from . import sizes

FLUX2_DEV = sizes.FLUX2_DEV.blocks  # double blocks, single blocks, hidden width of FLUX.2 [dev] (32B)
KLEIN_FILES = "flux-2-klein-base-4b.safetensors or flux-2-klein-base-9b.safetensors"
# ComfyUI's model config class names -> what users call them
_FRIENDLY = {"Flux": "FLUX.1 [dev]", "FluxSchnell": "FLUX.1 [schnell]", "FluxInpaint": "FLUX.1 Fill",
             "SD15": "Stable Diffusion 1.5", "SD20": "Stable Diffusion 2", "SDXL": "SDXL", "SDXLRefiner": "SDXL refiner",
             "SD3": "Stable Diffusion 3", "Chroma": "Chroma", "QwenImage": "Qwen-Image", "HiDream": "HiDream",
             "Lumina2": "Lumina 2", "AuraFlow": "AuraFlow", "PixArtSigma": "PixArt Sigma"}
_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}  # unpacked: the shape is the layer's shape
_BLOCKS = ("double_blocks.", "single_blocks.")


@dataclass(frozen=True)
class ModelFacts:
    """What the header says. `arch` is ComfyUI's model config name ("Flux2", "FluxSchnell", "SDXL", ...)."""

    arch: str
    double: int = 0
    single: int = 0
    hidden: int = 0
    linears: frozenset[str] = frozenset()  # every linear layer inside the blocks (module names)
    widths: dict[str, int] = field(default_factory=dict)  # min(in, out) of those whose shape is exact

    @property
    def is_flux2(self) -> bool:
        return self.arch == "Flux2"

    def describe(self) -> str:
        if self.is_flux2:
            size = sizes.by_blocks(self.double, self.single, self.hidden)
            name = size.label if size is not None else None
            return f"{name or 'a FLUX.2 model'}: {self.double} double + {self.single} single blocks, width {self.hidden}"
        friendly = _FRIENDLY.get(self.arch)
        return f"{friendly} (ComfyUI detects it as {self.arch})" if friendly else f"a {self.arch} model"


def flux2_problem(double: int, single: int, hidden: int) -> str | None:
    """FLUX.2 models the trainer refuses: [dev] shares the architecture but not klein's text encoder or size."""
    if (double, single, hidden) == FLUX2_DEV:
        d = sizes.FLUX2_DEV
        return (f"{d.label[:-1]}: {d.double} double + {d.single} single blocks, width {d.hidden}), not FLUX.2 "
                "[klein]: this trainer "
                f"trains klein Base 4B or 9B; load {KLEIN_FILES}")
    return None


def model_problem(facts: ModelFacts, file_name: str, loader: str) -> str | None:
    """The queue-time error for a model file the trainer cannot train, or None when it can."""
    if not facts.is_flux2:
        return (f"the MODEL comes from '{file_name}' ({loader}), which is {facts.describe()}, not FLUX.2 [klein]: "
                f"load a klein Base diffusion model ({KLEIN_FILES}) with Load Diffusion Model (UNETLoader) instead.")
    problem = flux2_problem(facts.double, facts.single, facts.hidden)
    return f"the MODEL comes from '{file_name}' ({loader}), which is {problem}" if problem else None


# BFL's file names: `flux-2-klein-4b` / `-9b` are the distilled (4-step) models, `flux-2-klein-base-4b` / `-9b` Base
_DISTILLED_NAME = re.compile(r"flux[-_. ]?2[-_. ]*klein[-_. ]*(4|9)b", re.I)


def distilled_warning(file_name: str, where: str = "") -> str | None:
    """A warning when the base model's file is named as the distilled klein: both have the same shapes, so the
    name is all there is to tell them apart, and LoRAs trained on the distilled model come out grey or generic."""
    name = os.path.basename(file_name or "")
    found = _DISTILLED_NAME.search(name)
    if found is None or "base" in name.lower():
        return None
    size = found.group(1)
    return (f"the MODEL comes from '{name}'{f' ({where})' if where else ''}, which by its name is the distilled "
            f"FLUX.2 [klein] {size}B (4-step), not klein Base: LoRAs trained on the distilled model come out grey or "
            f"generic. Train on flux-2-klein-base-{size}b.safetensors and sample the LoRA on the distilled model "
            "(the supported use); if the file is a renamed Base, rename it back.")


def header_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
    """{tensor name: (shape, safetensors dtype)} from the file's header; no tensor data is read."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        for k in f.keys():
            s = f.get_slice(k)
            out[k] = (tuple(s.get_shape()), s.get_dtype())
    return out


def facts_from_shapes(shapes: dict[str, tuple[tuple[int, ...], str]]) -> ModelFacts | None:
    """Name the architecture the way ComfyUI's loaders do, from shapes only; None when ComfyUI knows none."""
    import comfy.model_detection as md
    import comfy.supported_models
    import comfy.utils
    import torch

    sd = {k: torch.empty(shape, device="meta") for k, (shape, _) in shapes.items()}
    prefix = md.unet_prefix_from_state_dict(sd)  # as load_diffusion_model_state_dict: checkpoints work too
    stripped = comfy.utils.state_dict_prefix_replace(sd, {prefix: ""}, filter_keys=True)
    if stripped:
        shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
        sd = stripped
    config = md.detect_unet_config(sd, "")
    if config is None:
        return None
    arch = next((m.__name__ for m in comfy.supported_models.models if m.matches(config, sd, "")), None)
    if arch is None:
        return None
    if arch != "Flux2":
        return ModelFacts(arch)
    linears, widths = set(), {}
    for k, (shape, dtype) in shapes.items():
        if k.startswith(_BLOCKS) and k.endswith(".weight") and len(shape) == 2:
            linears.add(k[:-len(".weight")])
            if dtype in _FLOAT_DTYPES:  # packed quantised weights (nvfp4 ...) store a fraction of the columns
                widths[k[:-len(".weight")]] = min(shape)
    return ModelFacts(arch, config["depth"], config["depth_single_blocks"], config["hidden_size"],
                      frozenset(linears), widths)


@lru_cache(maxsize=32)
def _cached_facts(path: str, mtime_ns: int, size: int) -> ModelFacts | None:
    return facts_from_shapes(header_shapes(path))


def file_facts(path: str) -> ModelFacts | None:
    """ModelFacts of a safetensors file, cached by path, mtime and size; None when it cannot be read or named
    (the loader reports an unreadable file itself)."""
    try:
        st = os.stat(path)
        return _cached_facts(os.path.realpath(path), st.st_mtime_ns, st.st_size)
    except Exception:  # noqa: BLE001 - never more than a missing verdict
        logging.debug("Klein LoRA: no header verdict for %s", path, exc_info=True)
        return None
