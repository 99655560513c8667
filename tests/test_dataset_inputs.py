"""Bad input stays a clear error naming the file; odd formats are converted with a note; buckets reach the loop.

The first group needs no ComfyUI (PIL and the loader's own functions); the last tests run the real
loader node and a few training steps on the tiny model.
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from klein_lora_studio.trainer.data import captions, images
from klein_lora_studio.trainer.data import dataset as ds
from PIL import Image

TRIGGER = "zxq"


def _rgb(w: int = 64, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def test_corrupt_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    with pytest.raises(ValueError, match=r"image .*broken\.png cannot be read .*corrupt or not an image"):
        ds.load_image_sized(bad, (64, 64))
    with pytest.raises(ValueError, match=r"broken\.png cannot be read"):
        images.image_size(bad)  # the bucketing path reads headers first: the same error


def test_zero_byte_image_is_named(tmp_path):
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    for read in (lambda p: ds.load_image_sized(p, (64, 64)), images.image_size):
        with pytest.raises(ValueError, match=r"empty\.jpg is an empty \(zero-byte\) file"):
            read(empty)


def test_cmyk_16bit_and_alpha_are_converted_with_a_note(tmp_path):
    _rgb().convert("CMYK").save(tmp_path / "cmyk.jpg")
    Image.fromarray(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).save(tmp_path / "deep.png")
    rgba = _rgb().convert("RGBA")
    rgba.putalpha(0)  # fully transparent: must become the white background
    rgba.save(tmp_path / "alpha.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    pixels, note = ds.load_image_sized(tmp_path / "cmyk.jpg", (64, 64))
    assert pixels.shape == (64, 64, 3) and note == "cmyk.jpg: converted from CMYK to RGB"
    pixels, note = ds.load_image_sized(tmp_path / "deep.png", (64, 64))
    assert note == "deep.png: 16-bit image scaled to 8-bit RGB" and 0.9 < float(pixels.max()) <= 1.0
    pixels, note = ds.load_image_sized(tmp_path / "alpha.png", (64, 64))
    assert note == "alpha.png: transparency flattened onto white" and torch.allclose(pixels, torch.ones_like(pixels))


def test_small_image_is_upscaled_with_a_note(tmp_path):
    _rgb(40, 30).save(tmp_path / "small.png")
    pixels, note = ds.load_image_sized(tmp_path / "small.png", (80, 64))
    assert pixels.shape == (64, 80, 3) and "small.png: 40x30 is below 80x64 and was upscaled" in note


def test_non_utf8_caption_is_named(tmp_path):
    _rgb().save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(ValueError, match=r"caption .*a\.txt is not UTF-8 text .*re-save it as UTF-8"):
        ds.scan_folder(tmp_path, TRIGGER)


def test_folder_without_images_and_pair_folder_matching_nothing(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here", encoding="utf-8")
    with pytest.raises(ValueError, match="has no images"):
        ds.scan_folder(tmp_path, TRIGGER)
    target, control = tmp_path / "t", tmp_path / "c"
    target.mkdir()
    control.mkdir()
    _rgb().save(target / "001.png")
    _rgb().save(control / "car_001.png")
    with pytest.raises(ValueError, match=r"matches none of the 1 images .*001\.png.*car_001\.png"):
        ds.encode_folder(target, None, None, 64, TRIGGER, control_folder=control)


def test_bad_options_are_errors_with_the_fix(tmp_path):
    _rgb().save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="repeats is 0"):
        ds.encode_folder(tmp_path, None, None, 64, TRIGGER, repeats=0)
    with pytest.raises(ValueError, match="caption_dropout is 1.0"):
        ds.encode_folder(tmp_path, None, None, 64, TRIGGER, caption_dropout=1.0)


def test_caption_variants_are_seeded_distinct_and_keep_the_trigger_first():
    cap = "zxq, red car, night, rain, neon"
    v = captions.caption_variants(cap, TRIGGER)
    assert v == captions.caption_variants(cap, TRIGGER)  # same every run: the cache hits
    assert v[0] == cap and len(v) == captions.SHUFFLE_VARIANTS == len(set(v))
    assert all(x.startswith("zxq, ") and sorted(x.split(", ")) == sorted(cap.split(", ")) for x in v)
    assert captions.caption_variants("zxq, one tag", TRIGGER) == ["zxq, one tag"]  # nothing to shuffle


# ------------------------------------------------------------------ real ComfyUI


def _mixed_aspect_folder(folder, n_wide: int = 3, n_tall: int = 3, n_square: int = 1):
    folder.mkdir(parents=True, exist_ok=True)
    sizes = [(128, 64)] * n_wide + [(64, 128)] * n_tall + [(96, 96)] * n_square
    for i, (w, h) in enumerate(sizes):
        _rgb(w, h, seed=i).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text("a picture", encoding="utf-8")
    return folder


@pytest.mark.comfy
def test_loader_node_buckets_cache_and_doctor_warnings(comfy, tiny, base_dir):
    _mixed_aspect_folder(base_dir / "input" / "mixed")
    (base_dir / "input" / "mixed" / "006.txt").unlink()  # the doctor flags it, the loader notes it
    node = comfy.NODE_CLASS_MAPPINGS["KleinDatasetLoader"]
    schema = node.GET_SCHEMA() if hasattr(node, "GET_SCHEMA") else node.define_schema()
    assert all(i.tooltip for i in schema.inputs), "every input needs a tooltip"
    with torch.inference_mode():
        loader = dict(folder="mixed", trigger=TRIGGER, resolution=64, vae=tiny.vae, clip=tiny.clip)
        data, report = node.execute(**loader, control_folder="", bucketing=True, repeats=2, caption_dropout=0.1,
                                    shuffle_tags=False, use_cache=True).args
        again = node.execute(**loader, bucketing=True, use_cache=True).args[0]
        square = node.execute(**loader, bucketing=False, use_cache=False).args[0]
    assert report.startswith("Dataset Doctor: ") and "006.png" in report.split("\n\n")[0]
    shapes = sorted({tuple(lat.shape[-2:]) for lat in data.latents})
    assert shapes == [(3, 6), (4, 4), (6, 3)]  # 64px area: 96x48 / 64x64 / 48x96 buckets, latent 16x smaller
    assert "3 bucket(s) for 7 image(s)" in report and "repeats 2" in report and "caption dropout 0.1" in report
    assert data.empty_context is not None and data.repeats == 2
    assert "7 latent(s) reused, 0 encoded" in again.report()
    assert {tuple(lat.shape[-2:]) for lat in square.latents} == {(4, 4)}
    assert "square centre crops, 64x64" in square.report()


@pytest.mark.comfy
def test_training_batches_never_mix_buckets(encoded, base_dir, monkeypatch):
    from klein_lora_studio.trainer.training import loop

    def two_wide_two_tall(folder, **_):
        return _mixed_aspect_folder(folder, n_wide=2, n_tall=2, n_square=0)

    setup = encoded("mixed_train", size=64, write=two_wide_two_tall, bucketing=True, caption_dropout=0.5)
    data = setup.data
    seen: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    real_step = loop.train_step

    def recording_step(dm, work, x0, ctx, *args):
        seen.append((tuple(x0.shape), tuple(ctx.shape)))
        return real_step(dm, work, x0, ctx, *args)

    monkeypatch.setattr(loop, "train_step", recording_step)
    cfg = loop.TrainConfig(rank=2, alpha=2, learning_rate=1e-3, steps=3, batch_size=2, output_name="mixed")
    with torch.inference_mode():
        result = loop.train_lora(setup.unet, data, setup.targets, cfg, base_dir / "models" / "loras")
    assert len(seen) == 3 and all(s[0][0] == 2 and s[1][0] == 2 for s in seen), seen  # 2 per bucket: full batches
    assert {s[0][2:] for s in seen} <= {(3, 6), (6, 3)} and len(result.losses) == 3


def test_caption_dropout_and_variants_per_step():
    lat = torch.zeros(128, 4, 4)
    variants = [torch.full((512, 8), float(k)) for k in range(3)]
    data = ds.KleinDataset([lat], [variants[0]], ["c"], ["a.png"], 64, TRIGGER, "f", context_variants=[variants],
                           empty_context=torch.full((512, 8), -1.0), caption_dropout=0.25)
    rng = random.Random(0)
    picks = [float(data.context_for(0, rng)[0, 0]) for _ in range(2000)]
    assert abs(picks.count(-1.0) / 2000 - 0.25) < 0.03  # dropout share
    assert {picks.count(float(k)) > 400 for k in range(3)} == {True}  # every variant gets picked
