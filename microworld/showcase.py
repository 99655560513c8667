"""A before/after grid of a concept LoRA on held-out prompts, graded by the reader (the demo's result).

Rows: held-out prompts with the trigger, then the same prompts without it. Columns: the base model and
the base with the LoRA at strength 1.0 through the stock LoraLoaderModelOnly. Every cell is sampled by
the pack's sampling (one seed for all cells, FLUX.2 schedule, CFG 4, empty negative) and read by
microworld.reader, so "the concept is visible with the trigger and absent without it" is a count.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from . import reader, world

BEFORE, AFTER = "before: base model", "after: + LoRA at 1.0"
GRID_PAD = 4  # trainer.evaluation.sampling.grid_image's padding around every cell


@dataclass
class Showcase:
    grid: object  # PIL image
    cells: dict[str, list]  # column -> PIL images, rows in order (triggered rows first)
    present: dict[str, list[bool]]  # column -> the reader's concept verdict per row
    triggered: list[bool]
    prompts: list[str]
    scenes: list  # the world.Scene each row's prompt was written from
    concept: str = "style"

    def share(self, column: str, triggered: bool) -> float:
        """Share of the column's rows (triggered or not) in which the reader sees the concept."""
        k, n = self.count(column, triggered)
        return k / n

    def count(self, column: str, triggered: bool) -> tuple[int, int]:
        """(rows with the concept, rows) of the column's triggered or untriggered prompts."""
        rows = [p for p, t in zip(self.present[column], self.triggered, strict=True) if t == triggered]
        return sum(rows), len(rows)

    def summary(self) -> str:
        return "; ".join("{}: concept in {}/{} triggered, {}/{} untriggered prompts".format(
            c, *self.count(c, True), *self.count(c, False)) for c in (BEFORE, AFTER))


def showcase_scenes(concept: str, n: int, seed: int) -> tuple[list, list[bool]]:
    """n held-out scenes carrying the concept (triggered prompts), then the same n without it."""
    scenes = world.heldout_scenes(seed, n)
    return [world.with_concept(s, concept) for s in scenes] + scenes, [True] * n + [False] * n


def before_after(base_model, lora_name: str, clip, vae, concept: str = "style", n: int = 4, seed: int = 0,
                 steps: int = 8, px: int = 128) -> Showcase:
    """Sample and read the grid. `lora_name` is a file in ComfyUI's loras folder (as LoraLoader lists it)."""
    import torch

    import nodes

    from ..trainer.evaluation import sampling as sp

    scenes, triggered = showcase_scenes(concept, n, seed)
    texts = [world.caption(s) for s in scenes]
    prompts = [sp.SuitePrompt(t, str(i % n), t, trig) for i, (t, trig) in enumerate(zip(texts, triggered, strict=True))]
    settings = sp.SampleSettings(steps=steps, cfg=sp.BASE_CFG, seed=seed, width=px, height=px)
    with torch.inference_mode():
        lora_model = nodes.LoraLoaderModelOnly().load_lora_model_only(base_model, lora_name, 1.0)[0]
        conds = sp.encode_prompts(clip, prompts)
        cols = {label: [sp.to_pil(im) for im in sp.sample_column(m, conds, vae, settings, label).images]
                for label, m in ((BEFORE, base_model), (AFTER, lora_model))}
    present = {c: [reader.read(im).concept_present(concept) for im in ims] for c, ims in cols.items()}
    grid = sp.grid_image([[cols[c][r] for c in cols] for r in range(len(texts))], texts, list(cols),
                         f"{world.CONCEPTS[concept].trigger} ({concept}): held-out prompts, with and without the trigger")
    return Showcase(grid, cols, present, triggered, texts, scenes, concept)


def save_cells(sc: Showcase, path: str | Path) -> Path:
    """The grid's layout and the reader's verdict and tint score on every cell, as JSON (beside the grid), so
    a reader of the PNG can check that the picture says what the demo printed."""
    from ..trainer.paths import atomic_write_text

    scores = {c: [round(reader.read(im).tint_score, 3) for im in ims] for c, ims in sc.cells.items()}
    data = {"concept": sc.concept, "columns": list(sc.cells), "prompts": sc.prompts, "triggered": sc.triggered,
            "present": sc.present, "tint_score": scores, "cell_px": sc.cells[BEFORE][0].width}
    return atomic_write_text(json.dumps(data, indent=1) + "\n", Path(path))


def grid_cells(grid, rows: int, cols: int, px: int) -> list[list]:
    """The cell images cropped back out of a grid_image of rows x cols cells of px (labels on the left and top)."""
    left = grid.width - cols * (px + GRID_PAD) - GRID_PAD
    top = grid.height - rows * (px + GRID_PAD) - GRID_PAD
    return [[grid.crop((x, y, x + px, y + px)) for x in (left + c * (px + GRID_PAD) + GRID_PAD for c in range(cols))]
            for y in (top + r * (px + GRID_PAD) + GRID_PAD for r in range(rows))]


def read_grid(grid_path: str | Path, cells_path: str | Path) -> dict[str, list[bool]]:
    """The reader's concept verdict on every cell of a saved grid (column -> rows), read from the PNG itself."""
    from PIL import Image

    meta = json.loads(Path(cells_path).read_text(encoding="utf-8"))
    with Image.open(grid_path) as im:
        cells = grid_cells(im.convert("RGB"), len(meta["prompts"]), len(meta["columns"]), meta["cell_px"])
    return {c: [reader.read(row[i]).concept_present(meta["concept"]) for row in cells]
            for i, c in enumerate(meta["columns"])}
