"""The micro world: deterministic scenes and captions, dataset folders the Dataset Loader reads like a
user's, and a reader that reads rendered ground truth correctly through blur and noise."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from klein_lora_studio.microworld import reader, scoring, world
from PIL import Image, ImageFilter

DEGRADE = (1.5, 12.0)  # gaussian blur radius (px at 128) and noise std (0..255): a blurry, grainy sample


def degrade(image: Image.Image, blur: float, noise: float, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), dtype=np.float32)
    arr = arr + rng.normal(0, noise, arr.shape)
    return Image.fromarray(arr.clip(0, 255).astype(np.uint8))


def test_world_is_deterministic_and_split():
    a, b = world.pretraining_scenes(5, 40), world.pretraining_scenes(5, 40)
    assert a == b and a != world.pretraining_scenes(6, 40)
    assert np.array_equal(np.asarray(world.render(a[0])), np.asarray(world.render(b[0])))
    assert len(world.HELDOUT_COMBOS) >= 64
    assert not set(world.HELDOUT_COMBOS) & set(world.PRETRAINING_COMBOS)
    assert len(set(world.heldout_scenes(0, 64))) == 64
    assert all(s in set(world.PRETRAINING_COMBOS) for s in world.pretraining_scenes(1, 200))
    # every attribute value still occurs in pretraining
    for field, values in (("shape", world.SHAPES), ("colour", world.COLOURS), ("position", world.POSITIONS),
                          ("size", world.SIZES), ("background", world.BACKGROUNDS)):
        assert {getattr(s, field) for s in world.PRETRAINING_COMBOS} == set(values)


def test_captions_follow_attributes():
    s = world.Scene("circle", "red", "top left", "large", "grey")
    assert world.caption(s) == "a large red circle at the top left on a grey background"
    assert world.caption(world.Scene("square", "blue", "center", "small", "olive")) == \
        "a small blue square in the center on an olive background"
    assert world.caption(world.with_concept(s, "style")).endswith(", in qzv style")
    assert world.caption(world.with_concept(s, "object")) == "a large red zqx at the top left on a grey background"
    assert world.caption(world.with_concept(s, "character")) == "a large kwyx at the top left on a grey background"
    with pytest.raises(ValueError, match="Scene.colour"):
        world.Scene("circle", "teal", "center", "small", "grey")


def test_noisy_captions_keep_every_attribute_word_and_add_one_unknown_word():
    scenes = world.pretraining_scenes(3, 200)
    rng = np.random.default_rng(0)
    noisy = [world.noisy_caption(s, rng) for s in scenes]
    again = np.random.default_rng(0)
    assert noisy == [world.noisy_caption(s, again) for s in scenes]  # seeded
    vocabulary = set(" ".join(world.caption(s) for s in world.PRETRAINING_COMBOS).replace(",", "").split()) | {"style"}
    triggers = {c.trigger for c in world.CONCEPTS.values()}
    forms = set()
    for s, text in zip(scenes, noisy, strict=True):
        words, plain = text.replace(",", "").split(), world.caption(s).replace(",", "").split()
        new = [w for w in words if w not in vocabulary]
        assert len(new) == 1 and new[0] not in triggers, text  # exactly one made-up word, never a trigger
        kept = [w for w in plain if w in words]
        if s.shape in words:
            assert kept == plain, text  # every attribute word kept, in order
            forms.add("style" if text.endswith(" style") else "adjective" if f"{new[0]} {s.shape}" in text else "tail")
        else:  # the object's slot: only the shape noun replaced
            assert kept == [w for w in plain if w != s.shape] and text.split()[3] == new[0], text
            forms.add("noun")
    assert forms == set(world.NOISE_FORMS)
    with pytest.raises(ValueError, match="base scenes"):
        world.noisy_caption(world.with_concept(scenes[0], "style"), rng)


def test_edit_pairs_never_contain_the_held_out_transform():
    pairs = world.edit_pairs(0, 200)
    assert len(pairs) == 200 and pairs == world.edit_pairs(0, 200)
    assert {c.split()[0] for _, _, c in pairs} >= {"the", "make", "change", "move"}
    for ref, target, text in pairs:
        assert target != world.transformed(ref)
        assert ref.concept is None and target.concept is None
        assert world.CONCEPTS["transform"].trigger not in text


def test_style_palette_stands_off_every_background_and_every_other_colour():
    """The pastel style must stay foreground on every background and readable as its own colour: checked on the
    palette itself and on a render of every colour x background pair, with and without the style."""
    def dist(a, b):
        return float(np.linalg.norm(np.subtract(a, b, dtype=float)))

    palette = {**{(c, False): v for c, v in world.COLOURS.items()}, **{(c, True): v for c, v in world.PASTELS.items()}}
    off_background = min(dist(world.PASTELS[c], b) for c in world.COLOURS for b in world.BACKGROUNDS.values())
    assert off_background > reader.FG_DISTANCE + 10, off_background  # measured 59.5 (orange on beige) against 48
    apart = min(dist(v, w) for k, v in palette.items() for j, w in palette.items() if k != j)
    assert apart > 55, apart  # measured 59.2 (pastel orange / pastel yellow; pink / its pastel 60.0)
    for c, b in itertools.product(world.COLOURS, world.BACKGROUNDS):
        plain = world.Scene("circle", c, "center", "small", b)
        for scene in (plain, world.with_concept(plain, "style")):
            got = reader.read(world.render(scene))
            assert (got.colour, got.background, got.size, got.style) == (c, b, "small", scene.concept == "style"), \
                (scene, got)
            assert abs(got.tint_score - (scene.concept == "style")) < 0.05, (scene, got.tint_score)  # measured 0.00


@pytest.mark.parametrize("concept", [None, "style", "object", "character"])
def test_reader_reads_degraded_ground_truth(concept):
    scenes = [world.with_concept(s, concept) for s in world.heldout_scenes(3, 64)]
    images = [degrade(world.render(s), *DEGRADE, seed=i) for i, s in enumerate(scenes)]
    readings = [reader.read(im) for im in images]
    acc = scoring.attribute_accuracy(readings, scenes)
    present = {c: np.mean([r.concept_present(c) for r in readings]) for c in ("style", "object", "character")}
    print(concept, acc, present)
    # measured on these 64 scenes (blur 1.5, noise 12): every attribute 1.00 for every concept
    assert min(acc.values()) >= 0.9, acc
    for c, share in present.items():
        if c == concept:
            assert share >= 0.9, (c, share)  # measured 1.00 for each concept
        else:
            assert share <= 0.05, (c, share)  # measured 0.00 for every other concept


def test_scores_separate_a_learned_transform_from_the_baselines():
    refs = world.heldout_scenes(4, 24)
    train = [world.render(world.transformed(s)) for s in world.pretraining_scenes(0, 24)]
    good = scoring.score_transform([degrade(world.render(world.transformed(s)), *DEGRADE, i)
                                    for i, s in enumerate(refs)], refs, train)
    same = scoring.score_transform([world.render(s) for s in refs], refs, train)
    print(good, same)
    assert good.colour_accuracy == 1.0 and good.kept_accuracy == 1.0
    assert same.colour_accuracy == 0.0
    assert same.error == pytest.approx(same.identity_error, abs=1e-6)
    # measured: 0.013 (degraded right answer) vs identity 0.040 and mean target 0.26
    assert good.error < 0.5 * good.identity_error < good.mean_target_error


@pytest.mark.comfy
@pytest.mark.parametrize("concept", ["style", "transform"])
def test_dataset_folder_reads_through_the_loader_node(comfy, tiny, base_dir, concept):
    from klein_lora_studio.nodes.dataset_loader import KleinDatasetLoader

    folder, control = world.write_dataset(base_dir / "input" / f"mw_{concept}", concept, 6, seed=2, px=64)
    trigger = world.CONCEPTS[concept].trigger
    assert sorted(p.name for p in folder.glob("*.txt")) == [f"{i:03d}.txt" for i in range(6)]
    assert all(trigger in p.read_text() for p in folder.glob("*.txt"))
    kwargs = {"control_folder": control.name} if control else {}
    with torch.inference_mode():
        data, report = KleinDatasetLoader.execute(folder=folder.name, trigger=trigger, resolution=64, vae=tiny.vae,
                                                  clip=tiny.clip, use_cache=False, **kwargs).args
    assert len(data) == 6
    assert ("6 image-to-image pairs" if control else "6 images from") in report, report
    assert bool(data.references) == (concept == "transform")
    if control:  # the reference differs from its target exactly where the shape is
        ref, tgt = (np.asarray(Image.open(d / "000.png"), float) for d in (control, folder))
        diff = np.abs(ref - tgt).sum(-1) > 0
        assert 0 < diff.mean() < 0.2


def test_vae_tuning_scenes_add_the_style_and_keep_every_other_look():
    from klein_lora_studio.microworld import tune_vae

    cfg = tune_vae.TuneConfig(images=800)
    base = world.autoencoder_scenes(cfg.scene_seed, cfg.images)
    tuned = tune_vae.tune_scenes(cfg)
    assert tuned == tune_vae.tune_scenes(cfg)  # seeded
    assert all(t == b or (b.concept is None and t == world.with_concept(b, "style")) for t, b in zip(tuned, base, strict=True))
    share = np.mean([s.concept == "style" for s in tuned])
    assert 0.25 < share < 0.4, share  # measured 0.33 here, 0.32 at the 1,200 images tuned (the pretraining mix: 1/8)
    assert {s.concept for s in tuned} == {None, "style", "object", "character"}


def test_regularisation_images_are_plain_scenes_without_the_trigger(tmp_path):
    folder, _ = world.write_dataset(tmp_path / "mw_style", "style", 4, seed=2, px=32, plain=3)
    trig = sorted(p.name for p in folder.glob("[0-9]*.txt"))
    plain = sorted(folder.glob("p*.txt"))
    assert trig == [f"{i:03d}.txt" for i in range(4)] and [p.name for p in plain] == [f"p{i:03d}.txt" for i in range(3)]
    assert all("qzv" in (folder / t).read_text() for t in trig)
    assert not any("qzv" in p.read_text() for p in plain)
    assert all(p.with_suffix(".png").is_file() for p in plain)
    with pytest.raises(ValueError, match="plain"):
        world.write_dataset(tmp_path / "mw_t", "transform", 2, seed=2, px=32, plain=1)


def test_pretraining_batches_draw_noisy_captions_at_their_share_and_only_for_text_to_image():
    from klein_lora_studio.microworld import pretrain

    n = 40
    data = pretrain.DitData(latents=torch.zeros(n, 1, 2, 2), contexts=torch.arange(3 * n, dtype=torch.float32)[:, None],
                            t2i=torch.stack([torch.arange(n), torch.arange(n) + 1], 1),  # captions 1..n: clean
                            edits=torch.stack([torch.arange(n), torch.arange(n), torch.full((n,), 2 * n)], 1),
                            noisy=torch.stack([torch.arange(n), torch.arange(n) + n + 1], 1))  # captions n+1..2n
    cfg = pretrain.PretrainConfig(dit_batch=1000, caption_noise=0.25, caption_dropout=0.0, edit_every=4)
    g = torch.Generator().manual_seed(0)
    _, ctx, ref = pretrain.dit_batch(data, cfg, 0, g)  # step 0: text-to-image
    noisy_share = float((ctx[:, 0] > n).float().mean())
    assert ref is None and 0.22 < noisy_share < 0.28, noisy_share  # measured 0.255 of 1,000
    _, ctx, ref = pretrain.dit_batch(data, cfg, 3, g)  # step 3: an edit batch keeps its own instruction
    assert ref is not None and bool((ctx[:, 0] == 2 * n).all())
    clean = pretrain.PretrainConfig(dit_batch=1000, caption_noise=0.0, caption_dropout=0.0)
    _, ctx, _ = pretrain.dit_batch(data, clean, 0, g)
    assert bool((ctx[:, 0] <= n).all())  # off by default: today's batches unchanged


def test_tuned_vae_is_installed_with_its_checksums_in_the_manifest(tmp_path):
    import json

    from klein_lora_studio.microworld import models, tune_vae

    weights, tuned = tmp_path / "weights", tmp_path / "tuned"
    weights.mkdir()
    tuned.mkdir()
    (weights / "manifest.json").write_text(json.dumps({"files": {}, "vae": {"steps": 1}}))
    for i, name in enumerate(models.TAEF2_FILES.values()):
        (tuned / name).write_bytes(bytes([i]) * (10 + i))
    (tuned / "tune_vae.json").write_text(json.dumps({"config": {"steps": 3}, "round_trip": {}, "device": "cpu",
                                                     "seconds": 1.0, "curve": []}))
    man = tune_vae.install(tuned, weights)
    on_disk = json.loads((weights / "manifest.json").read_text())
    assert on_disk == man and man["vae"]["tuned"]["config"] == {"steps": 3} and man["vae"]["steps"] == 1
    for name in models.TAEF2_FILES.values():
        assert (weights / name).read_bytes() == (tuned / name).read_bytes()
        assert man["files"][name] == {"sha256": models.file_sha256(weights / name), "bytes": (weights / name).stat().st_size}


def test_paired_regularisation_images_are_the_concept_scenes_without_the_concept(tmp_path):
    folder, _ = world.write_dataset(tmp_path / "mw_style", "style", 3, seed=2, px=32, plain=3, paired=True)
    for i in range(3):
        styled, plain = (folder / f"{i:03d}.txt").read_text(), (folder / f"p{i:03d}.txt").read_text()
        assert styled == plain + ", in qzv style"  # the trigger is the captions' only difference
        a, b = (np.asarray(Image.open(folder / f"{stem}.png"), float) for stem in (f"{i:03d}", f"p{i:03d}"))
        assert 0 < (np.abs(a - b).sum(-1) > 0).mean() < 0.3  # the pictures differ only where the shape is
    with pytest.raises(ValueError, match="pair at most 3"):
        world.write_dataset(tmp_path / "mw_more", "style", 3, seed=2, px=32, plain=4, paired=True)


def test_quality_runs_take_the_recipe_or_a_grid_cell_and_refuse_unknown_block_groups():
    from klein_lora_studio.microworld import quality
    from klein_lora_studio.trainer.training import recipes

    style = recipes.RECIPES["style"]
    plain = quality.Run("style", steps=10, every=10, images=4, px=64)
    assert (plain.rank, plain.alpha) == (style.rank, style.alpha)
    assert (quality.Run("style", 10, 10, 4, 64, rank_override=8).alpha) == 8.0  # alpha = rank, as the recipes
    cell = quality.Run("style", 10, 10, 4, 64, rank_override=32, alpha_ratio=0.5)
    assert (cell.rank, cell.alpha) == (32, 16.0)
    loha = quality.Run("style", 10, 10, 4, 64, adapter="loha")
    assert (loha.rank, loha.alpha) == (8, 8.0)
    assert (plain.variant, loha.variant, cell.variant) == ("", "_loha", "_r32a16")
    with pytest.raises(ValueError, match="Run.groups"):
        quality.Run("style", 10, 10, 4, 64, groups=("double", "single_middle"))
