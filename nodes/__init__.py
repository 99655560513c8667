"""Klein LoRA Studio's ComfyUI nodes: thin V3 glue over `trainer/`."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

from .checkpoint_sampler import KleinCheckpointSampler
from .dataset_loader import KleinDatasetLoader
from .doctor import KleinDatasetDoctor
from .lora_trainer import KleinLoRATrainer
from .merge import MERGE_NODES
from .rank_steps_grid import KleinRankStepsGrid
from .strength_sweep import KleinStrengthSweep
from .target_selector import KleinBlockTargetSelector

try:  # the history route for the web extension; a server-only extra, never a reason to fail loading
    from .web_routes import register as _register_routes

    _register_routes()
except Exception:  # noqa: BLE001
    logging.exception("Klein LoRA: the /klein_lora/history route could not be registered; the chart will not replay")

try:  # queue-time model and rank checks (nodes/queue_check.py); without them the run-time checks still stand
    from .queue_check import register as _register_queue_check

    _register_queue_check()
except Exception:  # noqa: BLE001
    logging.exception("Klein LoRA: the queue-time model check could not be registered; the run will check instead")

DEV_NODES_ENV = "KLEIN_LORA_DEV_NODES"


class KleinLoRAExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        found: list[type[io.ComfyNode]] = [KleinDatasetLoader, KleinBlockTargetSelector, KleinLoRATrainer,
                                           KleinDatasetDoctor, KleinCheckpointSampler, KleinRankStepsGrid, KleinStrengthSweep,
                                           *MERGE_NODES]
        if os.environ.get(DEV_NODES_ENV) == "1":
            from ..devtools.nodes import DEV_NODES

            found += DEV_NODES
        return found


async def comfy_entrypoint() -> KleinLoRAExtension:
    return KleinLoRAExtension()
