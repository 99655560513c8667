"""Caption folder reading: trigger insertion, missing captions, clear errors (no ComfyUI needed)."""
import pytest
from klein_lora_studio.trainer.data import captions
from klein_lora_studio.trainer.data import dataset as ds
from PIL import Image


def _img(path, size=(40, 30), color=(10, 200, 30)):
    Image.new("RGB", size, color).save(path)


def test_trigger_added_once_and_missing_captions_named(tmp_path):
    _img(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a red car", encoding="utf-8")
    _img(tmp_path / "b.jpg")
    (tmp_path / "b.txt").write_text("photo of ZXQ on a road", encoding="utf-8")
    _img(tmp_path / "c.webp")
    (tmp_path / "notes.md").write_text("ignored")
    items, missing, warnings = ds.scan_folder(tmp_path, "zxq")
    assert [i.image.name for i in items] == ["a.png", "b.jpg", "c.webp"]
    assert [i.caption for i in items] == ["zxq, a red car", "photo of ZXQ on a road", "zxq"]
    assert missing == ["c.webp"] and warnings == []


def test_trigger_match_is_a_whole_word():
    assert captions.with_trigger("zxqfoo style", "zxq") == "zxq, zxqfoo style"
    assert captions.with_trigger("in zxq-style", "zxq") == "in zxq-style"


def test_empty_folder_is_an_error_naming_it(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=f"{tmp_path}.*has no images"):
        ds.scan_folder(tmp_path, "t")


def test_load_image_crops_to_square_resolution_and_notes_upscaling(tmp_path):
    _img(tmp_path / "wide.png", size=(200, 100))
    px, note = ds.load_image_sized(tmp_path / "wide.png", (64, 64))
    assert tuple(px.shape) == (64, 64, 3) and note is None
    assert abs(float(px[..., 1].mean()) - 200 / 255) < 0.02
    px, note = ds.load_image_sized(tmp_path / "wide.png", (128, 128))
    assert tuple(px.shape) == (128, 128, 3) and "is below 128x128 and was upscaled" in note


def test_resolution_must_be_a_multiple_of_16(tmp_path):
    _img(tmp_path / "a.png")
    with pytest.raises(ValueError, match="not a multiple of 16.*use 96 or 112"):
        ds.encode_folder(tmp_path, None, None, 100, "t")
