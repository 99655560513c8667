"""KleinLoRATrainer as ComfyUI runs it: recipe fill-in, live checkpoint sampling, the recommendation report."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import safetensors
import torch
from klein_lora_studio.tests.helpers import run_trainer, trainer_inputs

pytestmark = pytest.mark.comfy


def test_trainer_node_samples_each_checkpoint_and_recommends(comfy, tiny, encoded, base_dir):
    from klein_lora_studio.trainer.evaluation import metrics as mt

    torch.set_num_threads(1)
    setup = encoded("node_monitor")
    out = run_trainer(setup, steps=6, save_every=3, output_name="node_monitor", clip=tiny.clip, vae=tiny.vae,
                      sample_steps=2)
    model, lora, lora_path, loss, checkpoints, evaluation = out.args
    assert lora_path.endswith("node_monitor.safetensors") and len(loss["loss"]) == 6
    assert checkpoints.splitlines() == [str(base_dir / "models" / "loras" / "node_monitor_checkpoints" /
                                            "node_monitor_step00003.safetensors"), lora_path]
    samples = sorted(p.name for p in (base_dir / "output" / "klein_lora_samples").glob("node_monitor*.png"))
    assert samples == ["node_monitor.png", "node_monitor_step00003.png"]
    assert "strength" in evaluation
    report = json.loads((base_dir / "models" / "loras" / "node_monitor_eval.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [3, 6]
    # the report's recommendation is the rule's pick over the report's own scores, and names its file
    scores = [mt.CheckpointMetrics(**{k: v for k, v in c.items() if k != "flags"}) for c in report["checkpoints"]]
    pick, reason = mt.recommend(scores)
    assert report["recommended"] == {"label": pick.label, "step": pick.step, "path": pick.path}
    assert report["reason"] == reason and f"Recommended: {reason}" in evaluation
    assert pick.path in checkpoints.splitlines() and Path(pick.path).is_file()
    assert out.ui["lora_path"] == [lora_path]


def test_a_recipe_sets_rank_alpha_learning_rate_and_steps(comfy, encoded, monkeypatch):
    """A non-custom recipe trains with the recipe table's values, whatever the custom fields hold (here values
    that would be refused). The table is shortened to 3 steps so the tiny run is quick."""
    from klein_lora_studio.trainer.training import recipes

    short = dataclasses.replace(recipes.RECIPES["style"], rank=2, alpha=3.0, steps=3)
    monkeypatch.setitem(recipes.RECIPES, "style", short)
    inputs = trainer_inputs(encoded("node_recipe", n=1), output_name="node_recipe")
    inputs["recipe"] = {"recipe": "style", "rank": 0, "alpha": 0.0, "learning_rate": 0.0, "steps": 0}
    from klein_lora_studio.nodes.lora_trainer import KleinLoRATrainer

    with torch.inference_mode():
        out = KleinLoRATrainer.execute(**inputs)
    meta = safetensors.safe_open(out.args[2], "pt").metadata()
    assert (meta["recipe"], meta["rank"], float(meta["alpha"]), meta["steps"]) == ("style", "2", 3.0, "3")
    assert float(meta["learning_rate"]) == short.learning_rate and len(out.args[3]["loss"]) == 3


def test_custom_uses_the_nodes_own_values(comfy, encoded):
    with pytest.raises(ValueError, match="steps is 0"):  # custom keeps the node's (bad) values
        run_trainer(encoded("node_custom", n=1), steps=0, output_name="node_custom")
    from klein_lora_studio.trainer.training.recipes import RECIPES, apply_recipe

    assert (RECIPES["style"].rank, RECIPES["style"].steps) == (16, 600)
    assert apply_recipe("character", 4, 4.0, 1.0, 5) == (32, 32.0, 2e-4, 1000)


def test_the_recipe_tooltip_is_built_from_the_recipe_table(comfy):
    from klein_lora_studio.nodes.lora_trainer import KleinLoRATrainer
    from klein_lora_studio.trainer.lora.layers import SAVE_DTYPES
    from klein_lora_studio.trainer.training import config, recipes

    schema = KleinLoRATrainer.define_schema()
    recipe = next(i for i in schema.inputs if i.id == "recipe")
    for name, r in recipes.RECIPES.items():
        assert f"{name}: rank {r.rank}, alpha {r.alpha:g}, lr {r.learning_rate:g}, {r.steps} steps" in recipe.tooltip
    options = {o.key: [i.id for i in o.inputs] for o in recipe.options}
    assert options == {**{n: [] for n in recipes.RECIPES}, "custom": ["rank", "alpha", "learning_rate", "steps"]}
    assert all(i.tooltip for i in recipe.get_all()) and all(o.tooltip for o in schema.outputs)
    assert {i.id for i in schema.inputs if i.advanced} == {"gpus", "export_config", "optimizer",
                                                           "gradient_checkpointing", "compile_blocks", "save_dtype",
                                                           "base_compute", "early_stop_patience", "offload_blocks"}
    assert set(config.SAVE_DTYPE_NAMES) == set(SAVE_DTYPES)
