"""The training settings of one run, as plain data: no torch, so reading or writing a run config is cheap.

The loop (trainer/training/loop.py) trains from it, the run config (trainer/jobs/config.py) carries it
as its `train` section, and a training state (trainer/training/resume.py) stores it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

from ..model.offload_plan import parse_choice as parse_offload

OPTIMIZERS = ("AdamW", "Adafactor", "AdamW8bit")  # AdamW8bit: torchao's 8-bit optimizer states (low-VRAM mode)
COMPILE_CHOICES = ("auto", "on", "off")  # auto: compile the blocks on CUDA, not on the CPU
SHARD_CHOICES = ("auto", "on", "off")  # several processes: shard the frozen base over them (trainer/training/sharding.py)
# the frozen base's products (trainer/model/fp8_compute.py): auto = bf16 until fp8's quality check holds
BASE_COMPUTE_CHOICES = ("auto", "bf16", "fp8")
SAVE_DTYPE_NAMES = ("bf16", "fp32", "fp16")  # the keys of trainer/lora/layers.SAVE_DTYPES (tests check they agree)
# the adapter peft trains on the targeted layers (trainer/lora/layers.py); lora is the default and unchanged
ADAPTERS = ("lora", "lokr", "loha", "dora")


@dataclass
class TrainConfig:
    rank: int
    alpha: float
    learning_rate: float
    steps: int
    batch_size: int = 1
    seed: int = 0
    optimizer: str = "AdamW"
    save_every: int = 0
    gradient_checkpointing: bool = False
    output_name: str = "klein_lora"
    save_dtype: str = "bf16"
    max_grad_norm: float = 1.0
    recipe: str = "custom"
    compile_blocks: str = "auto"
    resume_from: str = ""  # "latest", a checkpoint of the run, or "" for a new run (see trainer/training/resume.py)
    keep_states: int = 2  # training states kept beside the checkpoints (0: all); each is ~3x the fp32 LoRA
    low_vram: bool = False  # gradient checkpointing + 8-bit AdamW; load the base with weight_dtype fp8 for the rest
    shard_base: str = "auto"  # several processes: shard the frozen base over them (FSDP, trainer/training/sharding.py)
    base_compute: str = "auto"  # the frozen base's products: bf16, or fp8 e4m3 row-wise (trainer/model/fp8_compute.py)
    adapter: str = "lora"  # lora, lokr (Kronecker), loha (Hadamard), dora (LoRA + magnitude): trainer/lora/layers.py
    lokr_factor: int = -1  # LoKr: the Kronecker factor's size (-1: near the square root of each width)
    lokr_full_rank: bool = False  # LoKr: both Kronecker factors full matrices (rank and alpha unused, scale 1)
    # 0: train every step. N: stop once N consecutive checkpoints are past the peak by the monitor's metrics
    # (trainer/evaluation/early_stop.py); needs the checkpoint samples (clip, vae, save_every > 0)
    early_stop_patience: int = 0
    # 'off' | 'auto' | N: the frozen blocks past the first N stream from CPU memory (trainer/model/block_stream.py)
    offload_blocks: str = "off"

    @property
    def recompute(self) -> bool:
        return self.gradient_checkpointing or self.low_vram

    @property
    def optimizer_used(self) -> str:
        return "AdamW8bit" if self.low_vram and self.optimizer == "AdamW" else self.optimizer

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps is {self.steps}: train for at least 1 step (the recipes use 250-1200).")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate is {self.learning_rate}: it must be above 0 (the recipes use 1e-4 to 3e-4).")
        if self.learning_rate > 1e-2:
            logging.warning("Klein LoRA: learning_rate %g is far above the recipes' 1e-4..3e-4; expect divergence.",
                            self.learning_rate)
        if self.batch_size < 1:
            raise ValueError(f"batch_size is {self.batch_size}: use 1 or more.")
        for name, value, choices in (("optimizer", self.optimizer, OPTIMIZERS),
                                     ("compile_blocks", self.compile_blocks, COMPILE_CHOICES),
                                     ("save_dtype", self.save_dtype, SAVE_DTYPE_NAMES),
                                     ("shard_base", self.shard_base, SHARD_CHOICES),
                                     ("base_compute", self.base_compute, BASE_COMPUTE_CHOICES),
                                     ("adapter", self.adapter, ADAPTERS)):
            if value not in choices:
                raise ValueError(f"{name} '{value}' is not one of {list(choices)}.")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ValueError(f"lokr_factor is {self.lokr_factor}: use -1 (automatic) or a factor of 1 or more "
                             "(LyCORIS presets use 4-16).")
        if self.early_stop_patience < 0:
            raise ValueError(f"early_stop_patience is {self.early_stop_patience}: use 0 (off) or the number of "
                             "consecutive checkpoints past the peak to stop after (1-3).")
        parse_offload(self.offload_blocks)
        if self.keep_states < 0:
            raise ValueError(f"keep_states is {self.keep_states}: use 0 (keep all) or more.")
