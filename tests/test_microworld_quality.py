"""Training quality on the micro world, on the CPU (issue 16 item 5): a LoRA trained through the nodes is
graded by ground truth, so these tests fail when training stops learning, not only when it crashes.

The image-to-image LoRA (the held-out complement colour swap, `xjv`) is trained through Dataset Loader ->
Block Target Selector -> Trainer as a user's would be, loaded by `comfy.sd.load_lora_for_models` at strength
1.0 and run through the stock ReferenceLatent edit graph on held-out references (microworld/quality.py, the
quality benchmark's engine, at a CI size).
"""
from __future__ import annotations

import pytest
from klein_lora_studio.microworld import quality
from klein_lora_studio.tests.helpers import micro_models_folder

pytestmark = pytest.mark.comfy

I2I_STEPS = 360  # the image-to-image recipe's rank 32 / alpha 32 at 5x its lr (5e-4), inside its 250-500 step range
I2I_REFERENCES = 8


@pytest.fixture(scope="module")
def micro_models(comfy, tmp_path_factory):
    with micro_models_folder(tmp_path_factory.mktemp("micro-quality")) as paths:
        yield quality.micro_models(paths)


def test_image_to_image_lora_applies_its_transform_to_heldout_references(micro_models):
    base = micro_models.unet()
    run = quality.Run("image-to-image", steps=I2I_STEPS, every=I2I_STEPS, images=24, px=128, seed=0, lr_scale=5.0)
    data, checkpoints, losses, _ = quality.train(micro_models, run, base)
    rows, _, _ = quality.evaluate_transform(micro_models, run, base, data, checkpoints[-1:], I2I_REFERENCES,
                                            sample_steps=8)
    untrained, trained = rows
    # Measured on this CPU with the phase-5 base (8 held-out references, 8 sampling steps, seed 0): the base, which
    # has never seen the trigger, 0.202 (5.1x the identity baseline's 0.040: it redraws the scene); step 120 0.073,
    # step 240 0.044 (1.10x identity), step 360 0.026, step 480 0.021 (bench/results/quality_cpu5_i2i.json). The
    # phase-4 base reached 0.030 at step 240 and the phase-3 base 0.025 at 120: phase 5 trained a quarter of its edit
    # steps at 128 px (the rest at 256 px) and a quarter of its captions with made-up words.
    assert trained["error"] < 0.85 * trained["identity_error"], rows  # measured 0.66x
    assert trained["error"] < 0.5 * untrained["error"], rows  # measured 0.13x
    assert trained["error"] < 0.25 * trained["mean_target_error"], rows  # measured 0.10x (0.026 / 0.262)
    # not asserted: the swapped colour itself (1 of 8 references at step 360, 2 of 8 at 480, the base's 1 of 8,
    # chance 1 of 8): the LoRA has learned to keep the reference's layout and background, and is still learning the swap


CHARACTER_STEPS = 300  # the character recipe's rank 32 / alpha 32 / preset at 5x its lr (1e-3), as the demo trains it
CHARACTER_PROMPTS = 8


def test_character_lora_shows_with_its_trigger_and_not_without(micro_models):
    """A trigger concept learned through the nodes (the character `kwyx`: 24 world images, Dataset Loader -> Block
    Target Selector -> Trainer), loaded by comfy.sd.load_lora_for_models at strength 1.0, on 8 held-out prompts with
    and without the trigger (8 sampling steps). Measured on this CPU (train 126 s, evaluation 55 s): the character on
    5 of 8 triggered prompts and 1 of 8 untriggered, triggered attribute accuracy 0.83 (base 0.54: the character's
    fixed colours stand in for the colour the base gets wrong), untriggered accuracy 0.725 against the base's 0.85.
    The bounds leave one prompt (0.125) of room. (The style, which issue 16 item 5 names, does not bind to its
    trigger at CPU sizes on this base: docs/quality.md.)"""
    base = micro_models.unet()
    run = quality.Run("character", steps=CHARACTER_STEPS, every=CHARACTER_STEPS, images=24, px=128, seed=0,
                      lr_scale=5.0)
    data, checkpoints, _, _ = quality.train(micro_models, run, base)
    truth, _, _ = quality.evaluate_concept(micro_models, run, base, data, checkpoints[-1:], CHARACTER_PROMPTS,
                                           sample_steps=8)
    untrained, trained = truth
    assert untrained["strength"] == 0.0 and untrained["leakage"] == 0.0, untrained  # the base never drew it
    assert trained["strength"] >= 0.5, trained  # measured 0.625 (5 of 8)
    assert trained["leakage"] <= 0.25, trained  # measured 0.125 (1 of 8)
    assert trained["flexibility"] >= untrained["flexibility"], truth  # measured 0.83 against 0.54
    assert trained["base_accuracy"] >= untrained["base_accuracy"] - 0.25, truth  # measured 0.725 against 0.85


def test_strength_sweep_rows_follow_the_load_strength(micro_models):
    """The quality bench's strength sweep (issue 18 item 3): one LoRA file sampled at each load strength as the
    Strength Sweep node applies it; the base first, then a row per strength. At strength 0 the LoRA's samples are the
    base's exactly, at strength 2 they differ, so the strength reaches the sampler. 2 training steps, 2 prompts, 2
    sampling steps: ~20 s on 2 CPU cores."""
    import torch

    base = micro_models.unet()
    run = quality.Run("style", steps=2, every=2, images=4, px=128, seed=0, lr_scale=50.0)
    _, checkpoints, _, _ = quality.train(micro_models, run, base)
    prompts, _ = quality.concept_suite(run.concept, 2, run.seed)
    columns = quality.strength_columns(micro_models, run, base, checkpoints[-1], [0.0, 2.0], prompts, 2)
    assert [c.step for c in columns] == [0, 2, 2]
    assert all(torch.equal(a, b) for a, b in zip(columns[1].latents, columns[0].latents, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(columns[2].latents, columns[0].latents, strict=True))
    rows = quality.evaluate_strengths(micro_models, run, base, checkpoints[-1], [0.0, 2.0], prompts_n=2,
                                      sample_steps=2)
    assert [r["strength_applied"] for r in rows] == [0.0, 0.0, 2.0] and rows[0]["step"] == 0
    keys = ("strength", "leakage", "flexibility", "per_attribute")
    assert {k: rows[1][k] for k in keys} == {k: rows[0][k] for k in keys}, rows
