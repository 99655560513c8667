from __future__ import annotations

from comfy_api.latest import io

from ..trainer.model import targets as tg
from . import queue_check
from .types import CATEGORY, KleinTargets

CUSTOM = tg.CUSTOM


class KleinBlockTargetSelector(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinBlockTargetSelector",
            display_name="Klein Block Target Selector",
            category=CATEGORY,
            description="Chooses which klein blocks and layers carry LoRA, resolved against the connected model.",
            inputs=[
                io.Model.Input("model", tooltip="The klein diffusion model; its real block counts (4B 5+20, 9B 8+24) "
                                                "decide the exact layer names."),
                io.Combo.Input("preset", options=[CUSTOM, *tg.PRESETS], default="all blocks, attention (seed default)",
                               tooltip="A recipe's groups and layers; 'custom' uses the switches below."),
                io.Boolean.Input("double_blocks", default=True,
                                 tooltip="Double-stream blocks (4B 0-4): text <-> image binding, trigger <-> concept."),
                io.Boolean.Input("single_early", default=True,
                                 tooltip="Single blocks 5-10 (4B numbering): texture, colour, low-level style."),
                io.Boolean.Input("single_mid", default=True,
                                 tooltip="Single blocks 11-18 (4B numbering): parts, identity, structure."),
                io.Boolean.Input("single_late", default=True,
                                 tooltip="Single blocks 19-24 (4B numbering): composition, layout."),
                io.Combo.Input("layers", options=list(tg.LAYER_KINDS), default="attention",
                               tooltip="attention: qkv + proj (single blocks' fused linear1/linear2 whole); "
                                       "attention_mlp: + double-block MLPs; all_linears: every linear in the blocks."),
                io.Combo.Input("streams", options=list(tg.STREAMS), default="both", advanced=True,
                               tooltip="Which stream of the double blocks to train: image, text or both (expert: the "
                                       "presets train both)."),
            ],
            outputs=[
                KleinTargets.Output(display_name="targets",
                                    tooltip="The resolved layer names for the Klein LoRA Trainer's targets input."),
                io.String.Output(display_name="description",
                                 tooltip="The selection in words: layer count, kinds and streams, and each group's "
                                         "blocks in this model."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def validate_inputs(cls, model=None) -> bool | str:
        """At queue time: a MODEL traced to a file that is not klein fails now (see nodes/queue_check.py)."""
        return queue_check.problem(cls) or True

    @classmethod
    def execute(cls, model, preset: str, double_blocks: bool, single_early: bool, single_mid: bool,
                single_late: bool, layers: str, streams: str) -> io.NodeOutput:
        dm = model.model.diffusion_model
        if not hasattr(dm, "double_blocks") or not hasattr(dm, "single_blocks"):
            raise ValueError(f"the MODEL is a {type(model.model).__name__}, not FLUX.2 [klein]: connect a klein "
                             "diffusion model (UNETLoader).")
        groups, layers, streams = tg.selection(preset, (double_blocks, single_early, single_mid, single_late), layers,
                                               streams)
        t = tg.resolve_targets(groups, layers, tg.BlockCounts.of_model(dm), streams, tg.linear_layer_names(dm))
        return io.NodeOutput(t, t.describe())

