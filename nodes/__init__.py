"""Klein LoRA Studio's ComfyUI nodes: thin V3 glue over `trainer/`.

Importing this registers nothing: ComfyUI calls the extension's `on_load` (then `get_node_list`) when it
loads the pack, and that adds the server extras (the history route, the queue-time check).
"""
from __future__ import annotations

import logging
import os

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from . import queue_check, web_routes
from .checkpoint_sampler import KleinCheckpointSampler
from .dataset_loader import KleinDatasetLoader
from .doctor import KleinDatasetDoctor
from .lora_files import KleinLoRAFile
from .lora_trainer import KleinLoRATrainer
from .merge import MERGE_NODES
from .micro_world import KleinMicroWorld
from .rank_steps_grid import KleinRankStepsGrid
from .strength_sweep import KleinStrengthSweep
from .target_selector import KleinBlockTargetSelector

DEV_NODES_ENV = "KLEIN_LORA_DEV_NODES"

# (what, register(), what the user loses without it): server-only extras, never a reason to fail loading
SERVER_EXTRAS = (
    ("the /klein_lora/history route", web_routes.register, "the chart will not replay after a page reload"),
    ("the queue-time model check", queue_check.register, "the run will check the model instead"),
)


def register_server_extras() -> None:
    """Each extra once, when a server runs (in library use there is no server and nothing to add)."""
    for what, register, without in SERVER_EXTRAS:
        try:
            register()
        except Exception:  # noqa: BLE001
            logging.exception("Klein LoRA: %s could not be registered; %s", what, without)


class KleinLoRAExtension(ComfyExtension):
    @override
    async def on_load(self) -> None:
        register_server_extras()

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        found: list[type[io.ComfyNode]] = [KleinDatasetLoader, KleinBlockTargetSelector, KleinLoRATrainer,
                                           KleinDatasetDoctor, KleinCheckpointSampler, KleinRankStepsGrid, KleinStrengthSweep,
                                           KleinLoRAFile, *MERGE_NODES, KleinMicroWorld]
        if os.environ.get(DEV_NODES_ENV) == "1":
            from ..devtools.nodes import DEV_NODES

            found += DEV_NODES
        return found


async def comfy_entrypoint() -> KleinLoRAExtension:
    return KleinLoRAExtension()
