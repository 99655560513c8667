"""LoRA files in ComfyUI's loras folders, as the merge, bake and sweep nodes pick them: the Klein LoRA File
node, the growing slots it feeds, and reading what arrives in them."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..trainer.lora import formats as lora_formats
from .types import CATEGORY, KleinLoraFile, LoraPick

NONE = "None"
MAX_SLOTS = 16


def lora_choices() -> list[str]:
    """'None' then every file in models/loras, for a combo input."""
    return [NONE, *folder_paths.get_filename_list("loras")]


def load_lora(name: str, field: str) -> lora_formats.KleinLora:
    """The LoRA picked in input `field`; errors name the input and the file."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"{field}: '{name}' is not in models/loras ({folder_paths.get_folder_paths('loras')}).")
    return lora_formats.load_lora_file(path, field)


def lora_slots(input_id: str, min_slots: int, tooltip: str) -> io.Autogrow.Input:
    """Sockets `<input_id>.lora_1`, `.lora_2`, ... for Klein LoRA File nodes: the first `min_slots` required, and
    one more appears whenever the last is connected (a V3 Autogrow: a template is one socket, so the file and
    its weight come together from a Klein LoRA File node)."""
    template = io.Autogrow.TemplateNames(
        KleinLoraFile.Input("lora", tooltip="A Klein LoRA File node (a LoRA of models/loras and its weight)."),
        names=[f"lora_{i}" for i in range(1, MAX_SLOTS + 1)], min=min_slots)
    return io.Autogrow.Input(input_id, template=template, tooltip=tooltip)


def read_picks(picks: dict[str, LoraPick] | None, input_id: str) -> tuple[list[lora_formats.KleinLora], list[float]]:
    """The LoRAs connected to a `lora_slots` input, in slot order, with their weights; a file that cannot be read
    is an error naming its slot (e.g. `loras.lora_2`) and the file."""
    picked = [(slot, p) for slot, p in (picks or {}).items() if p is not None]
    return [load_lora(p.name, f"{input_id}.{slot}") for slot, p in picked], [p.weight for _, p in picked]


class KleinLoRAFile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinLoRAFile", display_name="Klein LoRA File", category=CATEGORY,
            description="One LoRA of models/loras and its weight, for Klein LoRA Merge or Bake: connect one node per "
                        "LoRA to their loras slots (a new slot appears when the last one is connected).",
            inputs=[io.Combo.Input("lora_name", options=lora_choices()[1:],
                                   tooltip="A LoRA from models/loras (any layout: ComfyUI/BFL, ai-toolkit, kohya, "
                                           "diffusers, ComfyUI trainer)."),
                    io.Float.Input("weight", default=1.0, min=-10.0, max=10.0, step=0.01,
                                   tooltip="Its weight in the result (1.0 = its trained strength; negative subtracts it).")],
            outputs=[KleinLoraFile.Output(display_name="lora_file",
                                          tooltip="The file and its weight, for a loras slot of Klein LoRA Merge or Bake.")])

    @classmethod
    def execute(cls, lora_name: str, weight: float) -> io.NodeOutput:
        return io.NodeOutput(LoraPick(lora_name, float(weight)))
