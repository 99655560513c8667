"""The workshop's starting recipes for klein Base 4B (alpha = rank, so alpha/rank = 1 = full strength)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Recipe:
    rank: int
    alpha: float
    learning_rate: float
    steps: int
    step_range: tuple[int, int]
    target_preset: str
    dataset_range: tuple[int, int]


RECIPES: dict[str, Recipe] = {
    "style": Recipe(16, 16.0, 3e-4, 600, (500, 800), "style", (50, 200)),
    "character": Recipe(32, 32.0, 2e-4, 1000, (800, 1200), "character", (20, 60)),
    "object": Recipe(24, 24.0, 2e-4, 800, (600, 1000), "object", (30, 100)),
    "image-to-image": Recipe(32, 32.0, 1e-4, 400, (250, 500), "image-to-image", (30, 100)),
}
CUSTOM = "custom"
RECIPE_CHOICES = (CUSTOM, *RECIPES)


def apply_recipe(name: str, rank: int, alpha: float, learning_rate: float, steps: int) -> tuple[int, float, float, int]:
    """The node's own values for "custom", else the recipe's."""
    if name == CUSTOM:
        return rank, alpha, learning_rate, steps
    if name not in RECIPES:
        raise ValueError(f"Unknown recipe '{name}'; choose from {list(RECIPE_CHOICES)}.")
    r = RECIPES[name]
    return r.rank, r.alpha, r.learning_rate, r.steps
