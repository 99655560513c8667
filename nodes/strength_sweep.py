from __future__ import annotations

from comfy_api.latest import io, ui

from ..trainer import lora_formats
from ..trainer import sampling as sp
from .merge import NONE, _load, _lora_choices
from .types import CATEGORY


class KleinStrengthSweep(io.ComfyNode):
    """The seed's "weight tuning": one LoRA, or a style and a subject LoRA, at a grid of weights."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinStrengthSweep",
            display_name="Klein LoRA Strength Sweep",
            category=CATEGORY,
            is_output_node=True,
            description="Samples one prompt at every weight (pair): rows LoRA A's weight, columns LoRA B's. Pick the "
                        "cell you like and merge at those weights with Klein LoRA Merge.",
            inputs=[
                io.Model.Input("model", tooltip="The FLUX.2 [klein] Base model the LoRAs were trained on."),
                io.Clip.Input("clip", tooltip="klein's text encoder (Qwen3)."),
                io.Vae.Input("vae", tooltip="The FLUX.2 VAE."),
                io.Combo.Input("lora_a", options=_lora_choices()[1:], tooltip="LoRA A from models/loras (any layout)."),
                io.Combo.Input("lora_b", options=_lora_choices(), default=NONE,
                               tooltip="Optional LoRA B; 'None' sweeps A alone."),
                io.String.Input("strengths", default="0.25, 0.5, 0.75, 1.0",
                                tooltip="Weights to try, comma-separated (1.0 = the strength it was trained at)."),
                io.String.Input("prompt", multiline=True, default="kln_style, a portrait of a woman",
                                tooltip="The one prompt every cell uses (include the triggers)."),
                io.Int.Input("steps", default=sp.BASE_STEPS, min=1, max=200, tooltip="Sampling steps (klein Base: 50)."),
                io.Float.Input("cfg", default=sp.BASE_CFG, min=0.0, max=30.0, step=0.1,
                               tooltip="CFG with an empty negative (klein Base: 4.0)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="The one noise seed of every cell."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=16, tooltip="Square sample size."),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="Rows weight of A, columns weight of B.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, lora_a: str, lora_b: str, strengths: str, prompt: str, steps: int, cfg: float,
                seed: int, resolution: int) -> io.NodeOutput:
        weights = sp.parse_strengths(strengths)
        a = lora_formats.to_comfy_state_dict(_load(lora_a, "lora_a"))
        b = lora_formats.to_comfy_state_dict(_load(lora_b, "lora_b")) if lora_b and lora_b != NONE else None
        settings = sp.SampleSettings(steps, cfg, seed, resolution, resolution)
        grid = sp.to_image_tensor(sp.strength_sweep(model, clip, vae, a, b, weights, prompt, settings,
                                                    (lora_a.rsplit(".", 1)[0], (lora_b or "").rsplit(".", 1)[0])))
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))
