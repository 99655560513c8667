"""A run's files and their names, in one place: every `<run>_stepNNNNN` name is made and read here.

    <loras>/<run>.safetensors                                 the final LoRA
    <loras>/<run>_checkpoints/<run>_stepNNNNN.safetensors     the checkpoint of step N (also of the final step)
    <loras>/<run>_checkpoints/<run>_stepNNNNN.trainstate      the training state beside it (resume)
    <loras>/<run>_checkpoints/<run>_monitor.json              the monitor's per-checkpoint metrics (early stop)
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

LORA_SUFFIX = ".safetensors"
# Not ".pt": ComfyUI lists .pt files in models/loras as LoRAs, and a state is not one.
STATE_SUFFIX = ".trainstate"
CHECKPOINTS_SUFFIX = "_checkpoints"
_STEP = re.compile(r"^(?P<run>.+)_step(?P<step>\d+)$")


def step_stem(run: str, step: int) -> str:
    return f"{run}_step{step:05d}"


def parse_step(name: str) -> tuple[str, int] | None:
    """(run, step) of a checkpoint or state name (with or without its suffix), None for any other name."""
    for suffix in (LORA_SUFFIX, STATE_SUFFIX):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    m = _STEP.match(name)
    return (m["run"], int(m["step"])) if m else None


def run_of_checkpoints_dir(folder: Path) -> str | None:
    """The run whose checkpoints folder `folder` is, None for any other folder."""
    name = Path(folder).name
    return name[: -len(CHECKPOINTS_SUFFIX)] if name.endswith(CHECKPOINTS_SUFFIX) and len(name) > len(CHECKPOINTS_SUFFIX) \
        else None


@dataclass(frozen=True)
class RunFiles:
    """The files of run `run` in the LoRA folder `out_dir`."""

    out_dir: Path
    run: str

    @property
    def lora(self) -> Path:
        return Path(self.out_dir) / f"{self.run}{LORA_SUFFIX}"

    @property
    def checkpoints_dir(self) -> Path:
        return Path(self.out_dir) / f"{self.run}{CHECKPOINTS_SUFFIX}"

    @property
    def step_prefix(self) -> str:
        return f"{self.run}_step"

    @property
    def monitor(self) -> Path:
        """The monitor's history of a run that stops at its peak: what a resumed run decides from."""
        return self.checkpoints_dir / f"{self.run}_monitor.json"

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints_dir / f"{step_stem(self.run, step)}{LORA_SUFFIX}"

    def state(self, step: int) -> Path:
        return self.checkpoints_dir / f"{step_stem(self.run, step)}{STATE_SUFFIX}"

    def states(self) -> list[Path]:
        """The run's state files, oldest step first."""
        found = []
        for p in self.checkpoints_dir.glob(f"{self.step_prefix}*{STATE_SUFFIX}"):
            parsed = parse_step(p.name)
            if parsed and parsed[0] == self.run:
                found.append((parsed[1], p))
        return [p for _, p in sorted(found)]

    def is_checkpoint_name(self, name: object) -> bool:
        """`name` is a bare checkpoint file name of this run (what a state may list)."""
        if not isinstance(name, str) or Path(name).name != name or not name.endswith(LORA_SUFFIX):
            return False
        parsed = parse_step(name)
        return parsed is not None and parsed[0] == self.run and name == self.checkpoint(parsed[1]).name
