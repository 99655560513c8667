"""Nodes for the demo and the tests only (registered when KLEIN_LORA_DEV_NODES=1)."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io


class KleinTinyCLIPLoader(io.ComfyNode):
    """Loads the tiny klein text encoder that devtools.tiny_models writes: CLIPLoader would build the 4B size."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinTinyCLIPLoader",
            display_name="Klein Tiny Text Encoder (dev)",
            category="Klein LoRA/dev",
            inputs=[io.Combo.Input("clip_name", options=folder_paths.get_filename_list("text_encoders"),
                                   tooltip="A tiny klein text encoder file written by devtools.tiny_models.")],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, clip_name: str) -> io.NodeOutput:
        from .tiny_models import tiny_clip

        return io.NodeOutput(tiny_clip(folder_paths.get_full_path_or_raise("text_encoders", clip_name)))


class KleinMicroCLIPLoader(io.ComfyNode):
    """Loads the micro klein text encoder (microworld/models.py: the tiny Qwen3 without tokenizer padding)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinMicroCLIPLoader",
            display_name="Klein Micro Text Encoder (dev)",
            category="Klein LoRA/dev",
            inputs=[io.Combo.Input("clip_name", options=folder_paths.get_filename_list("text_encoders"),
                                   tooltip="The micro klein text encoder file written by microworld.models.")],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, clip_name: str) -> io.NodeOutput:
        from ..microworld.models import micro_clip

        return io.NodeOutput(micro_clip(folder_paths.get_full_path_or_raise("text_encoders", clip_name)))


DEV_NODES = [KleinTinyCLIPLoader, KleinMicroCLIPLoader]
