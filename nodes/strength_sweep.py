"""Klein LoRA Strength Sweep: one prompt at a grid of LoRA weights (glue over trainer/evaluation/sampling.py)."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..trainer.evaluation import sampling as sp
from ..trainer.lora import formats as lora_formats
from .lora_files import NONE, load_lora, lora_choices
from .types import CATEGORY, model_inputs, one_prompt_inputs


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
                *model_inputs(),
                io.Combo.Input("lora_a", options=lora_choices()[1:], tooltip="LoRA A from models/loras (any layout)."),
                io.Combo.Input("lora_b", options=lora_choices(), default=NONE,
                               tooltip="Optional LoRA B; 'None' sweeps A alone."),
                io.String.Input("strengths", default="0.25, 0.5, 0.75, 1.0",
                                tooltip="Weights to try, comma-separated (1.0 = the strength it was trained at)."),
                *one_prompt_inputs("kln_style, a portrait of a woman"),
            ],
            outputs=[io.Image.Output(display_name="grid", tooltip="Rows weight of A, columns weight of B.")],
        )

    @classmethod
    def execute(cls, model, clip, vae, lora_a: str, lora_b: str, strengths: str, prompt: str, steps: int, cfg: float,
                seed: int, resolution: int) -> io.NodeOutput:
        weights = sp.parse_strengths(strengths)
        a = lora_formats.to_comfy_state_dict(load_lora(lora_a, "lora_a"))
        b = lora_formats.to_comfy_state_dict(load_lora(lora_b, "lora_b")) if lora_b and lora_b != NONE else None
        settings = sp.SampleSettings(steps, cfg, seed, resolution, resolution)
        grid = sp.to_image_tensor(sp.strength_sweep(model, clip, vae, a, b, weights, prompt, settings,
                                                    (lora_a.rsplit(".", 1)[0], (lora_b or "").rsplit(".", 1)[0])))
        return io.NodeOutput(grid, ui=ui.PreviewImage(grid, cls=cls))
