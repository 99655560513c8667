"""The FLUX.2 sizes the pack knows, in one table: block counts, widths, text width, names.

Everything that names a model from its shape (the queue-time check, the LoRA header, the merge's
base check, the benches' random models) reads this table.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Flux2Size:
    key: str  # the LoRA header's base_model
    label: str  # what users call it
    double: int  # double-stream blocks
    single: int  # single-stream blocks
    hidden: int  # transformer width
    context: int  # text conditioning width (3 Qwen3 hidden states stacked)
    trainable: bool = True

    @property
    def blocks(self) -> tuple[int, int, int]:
        return self.double, self.single, self.hidden


KLEIN_4B = Flux2Size("flux2-klein-4b", "FLUX.2 [klein] 4B", 5, 20, 3072, 7680)
KLEIN_9B = Flux2Size("flux2-klein-9b", "FLUX.2 [klein] 9B", 8, 24, 4096, 12288)
FLUX2_DEV = Flux2Size("flux2-dev", "FLUX.2 [dev] (32B)", 8, 48, 6144, 15360, trainable=False)
SIZES = (KLEIN_4B, KLEIN_9B, FLUX2_DEV)
KLEIN_SIZES = tuple(s for s in SIZES if s.trainable)


def by_blocks(double: int, single: int, hidden: int) -> Flux2Size | None:
    return next((s for s in SIZES if s.blocks == (double, single, hidden)), None)


def size_key(double: int, single: int, hidden: int) -> str:
    """The LoRA header's base_model: a known klein's key, else a description of the shape."""
    s = by_blocks(double, single, hidden)
    return s.key if s is not None and s.trainable else f"flux2-{double}x{single}-h{hidden}"


def width_label(hidden: int) -> str | None:
    """'klein 4B' for width 3072 ...: what a LoRA of that width was trained on."""
    s = next((s for s in KLEIN_SIZES if s.hidden == hidden), None)
    return s.label.replace("FLUX.2 [klein]", "klein") if s is not None else None
