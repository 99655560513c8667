"""KleinLoRATrainer as ComfyUI runs it: recipe fill-in, live checkpoint sampling, the recommendation report."""
from __future__ import annotations

import json

import pytest
import torch
from klein_lora_studio.tests.helpers import TRIGGER, write_concept_dataset
from klein_lora_studio.trainer.data import dataset as ds
from klein_lora_studio.trainer.model import targets as tg

pytestmark = pytest.mark.comfy


def test_trainer_node_samples_each_checkpoint_and_recommends(comfy, tiny, base_dir):
    from klein_lora_studio.nodes.lora_trainer import KleinLoRATrainer

    torch.set_num_threads(1)
    folder = write_concept_dataset(base_dir / "input" / "node_monitor", n=3, size=64)
    with torch.inference_mode():
        data = ds.encode_folder(folder, tiny.vae, tiny.clip, 64, TRIGGER)
        unet = tiny.unet()
        dm = unet.model.diffusion_model
        targets = tg.resolve_targets(["double"], "attention", tg.BlockCounts.of_model(dm))
        out = KleinLoRATrainer.execute(unet, data, targets, "custom", 4, 4.0, 2e-3, 6, 1, 0, "AdamW", 3, False,
                                       "auto", "node_monitor", "bf16", 2, tiny.clip, tiny.vae)
    model, lora, lora_path, loss, checkpoints, evaluation = out.args
    assert lora_path.endswith("node_monitor.safetensors") and len(loss["loss"]) == 6
    assert checkpoints.splitlines()[0].endswith("node_monitor_step00003.safetensors")
    samples = sorted(p.name for p in (base_dir / "output" / "klein_lora_samples").glob("node_monitor*.png"))
    assert samples == ["node_monitor.png", "node_monitor_step00003.png"]
    assert "Recommended" in evaluation and "strength" in evaluation
    report = json.loads((base_dir / "models" / "loras" / "node_monitor_eval.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [3, 6] and report["recommended"]["step"] in (3, 6)
    assert out.ui["lora_path"] == [lora_path]


def test_recipe_overrides_the_custom_values(comfy, tiny, base_dir):
    from klein_lora_studio.nodes.lora_trainer import KleinLoRATrainer
    from klein_lora_studio.trainer.training.recipes import RECIPES, apply_recipe

    folder = write_concept_dataset(base_dir / "input" / "node_recipe", n=1, size=64)
    with torch.inference_mode():
        data = ds.encode_folder(folder, tiny.vae, tiny.clip, 64, TRIGGER)
        unet = tiny.unet()
        targets = tg.resolve_targets(["double"], "attention", tg.BlockCounts.of_model(unet.model.diffusion_model))
        with pytest.raises(ValueError, match="steps is 0"):  # custom keeps the node's (bad) values
            KleinLoRATrainer.execute(unet, data, targets, "custom", 4, 4.0, 2e-3, 0, 1, 0, "AdamW", 0, False,
                                     "auto", "node_recipe", "bf16")
    assert (RECIPES["style"].rank, RECIPES["style"].steps) == (16, 600)
    assert apply_recipe("character", 4, 4.0, 1.0, 5) == (32, 32.0, 2e-4, 1000)
