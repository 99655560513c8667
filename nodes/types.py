"""The pack's own wire types: the frontend connects only matching sockets."""
from dataclasses import dataclass

from comfy_api.latest import io

KleinDataset = io.Custom("KLEIN_DATASET")
KleinTargets = io.Custom("KLEIN_TARGETS")
KleinLoraFile = io.Custom("KLEIN_LORA_FILE")
CATEGORY = "Klein LoRA"


@dataclass(frozen=True)
class LoraPick:
    """One file of models/loras and the weight it enters a merge or bake with (a Klein LoRA File node's output).

    Only the name travels: the merge reads the file when it runs, so its errors name the slot it came in by.
    """
    name: str
    weight: float = 1.0


def model_inputs() -> list:
    """The base model, text encoder and VAE every sampling node takes."""
    return [io.Model.Input("model", tooltip="The FLUX.2 [klein] Base model the LoRAs were trained on."),
            io.Clip.Input("clip", tooltip="klein's text encoder (Qwen3)."),
            io.Vae.Input("vae", tooltip="The FLUX.2 VAE.")]


def one_prompt_inputs(default_prompt: str) -> list:
    """One prompt, one seed, klein Base sampling settings: the grid nodes' shared widgets."""
    from ..trainer.evaluation import sampling as sp

    return [io.String.Input("prompt", multiline=True, default=default_prompt,
                            tooltip="The one prompt every cell uses (include the trigger)."),
            io.Int.Input("steps", default=sp.BASE_STEPS, min=1, max=200, tooltip="Sampling steps (klein Base: 50)."),
            io.Float.Input("cfg", default=sp.BASE_CFG, min=0.0, max=30.0, step=0.1,
                           tooltip="CFG with an empty negative (klein Base: 4.0)."),
            io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="The one noise seed of every cell."),
            io.Int.Input("resolution", default=1024, min=64, max=4096, step=16, tooltip="Square sample size.")]
