"""Nodes for the demo and the tests only (registered when KLEIN_LORA_DEV_NODES=1)."""
from __future__ import annotations

from collections.abc import Callable

import folder_paths
from comfy_api.latest import io


def _text_encoder_loader(node_id: str, display_name: str, tooltip: str,
                         load: Callable[[], Callable[[str], object]]) -> type[io.ComfyNode]:
    """A loader node for a small klein text encoder file (CLIPLoader would build the full Qwen3 size).

    `load` returns the loading function; it is called at run time so torch work stays out of start-up."""

    class _Loader(io.ComfyNode):
        @classmethod
        def define_schema(cls) -> io.Schema:
            return io.Schema(
                node_id=node_id, display_name=display_name, category="Klein LoRA/dev",
                inputs=[io.Combo.Input("clip_name", options=folder_paths.get_filename_list("text_encoders"),
                                       tooltip=tooltip)],
                outputs=[io.Clip.Output(tooltip="The text encoder, for CLIPTextEncode and the Dataset Loader.")],
            )

        @classmethod
        def execute(cls, clip_name: str) -> io.NodeOutput:
            return io.NodeOutput(load()(folder_paths.get_full_path_or_raise("text_encoders", clip_name)))

    _Loader.__name__ = _Loader.__qualname__ = node_id
    return _Loader


def _tiny_clip():
    from .tiny_models import tiny_clip

    return tiny_clip


def _micro_clip():
    from ..microworld.models import micro_clip

    return micro_clip


KleinTinyCLIPLoader = _text_encoder_loader(
    "KleinTinyCLIPLoader", "Klein Tiny Text Encoder (dev)",
    "A tiny klein text encoder file written by devtools.tiny_models.", _tiny_clip)
KleinMicroCLIPLoader = _text_encoder_loader(
    "KleinMicroCLIPLoader", "Klein Micro Text Encoder (dev)",
    "The micro klein text encoder file written by microworld.models (the tiny Qwen3 without tokenizer padding).",
    _micro_clip)

DEV_NODES = [KleinTinyCLIPLoader, KleinMicroCLIPLoader]
