"""LoRA files in ComfyUI's loras folders, as the merge and sweep nodes pick them: shared node helpers."""
from __future__ import annotations

import folder_paths

from ..trainer.lora import formats as lora_formats

NONE = "None"


def lora_choices() -> list[str]:
    """'None' then every file in models/loras, for a combo input."""
    return [NONE, *folder_paths.get_filename_list("loras")]


def load_lora(name: str, field: str) -> lora_formats.KleinLora:
    """The LoRA picked in input `field`; errors name the input and the file."""
    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"{field}: '{name}' is not in models/loras ({folder_paths.get_folder_paths('loras')}).")
    return lora_formats.load_lora_file(path, field)
