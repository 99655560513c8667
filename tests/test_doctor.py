"""Dataset Doctor: every check fires on a generated dataset made to have the problem, and stays quiet on one without it."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from klein_lora_studio.trainer.data import doctor as dr
from klein_lora_studio.trainer.data import images as listing
from PIL import Image, ImageDraw, ImageFont


def varied(seed: int, size: tuple[int, int] = (160, 128)) -> Image.Image:
    """An image unlike the others: a random-direction gradient background with random shapes and a little noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    c0, c1 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    ang = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    t = np.cos(ang) * xx + np.sin(ang) * yy
    t = (t - t.min()) / (np.ptp(t) + 1e-6)
    im = Image.fromarray((c0 * (1 - t[..., None]) + c1 * t[..., None]).astype(np.uint8))
    d = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 5))):
        x0, y0 = rng.uniform(0, w * 0.8), rng.uniform(0, h * 0.8)
        box = [x0, y0, x0 + rng.uniform(10, w * 0.5), y0 + rng.uniform(10, h * 0.5)]
        colour = tuple(int(v) for v in rng.uniform(0, 255, 3))
        (d.ellipse if rng.random() < 0.5 else d.rectangle)(box, fill=colour)
    a = np.asarray(im, np.float32) + rng.normal(0, 4, (h, w, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def on_plain_background(seed: int, bg=(255, 255, 255), size: int = 128) -> Image.Image:
    """A random subject in the middle of a plain background (a product shot)."""
    rng = np.random.default_rng(seed)
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    cx, cy, r = size / 2 + rng.uniform(-15, 15), size / 2 + rng.uniform(-15, 15), rng.uniform(20, 40)
    d.ellipse([cx - r, cy - r * rng.uniform(0.6, 1.4), cx + r, cy + r], fill=tuple(int(v) for v in rng.uniform(0, 200, 3)))
    return im


def same_framing(seed: int, size: int = 128) -> Image.Image:
    """One composition (a box in the same place at the same scale) with different colours, even inverted contrast."""
    rng = np.random.default_rng(seed)
    bg = tuple(int(v) for v in rng.uniform(0, 255, 3))
    fg = tuple(255 - c for c in bg)
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    d.rectangle([20, 30, 70, 110], fill=fg)
    d.ellipse([85, 15, 115, 45], fill=fg)
    a = np.asarray(im, np.float32) + rng.normal(0, 3, (size, size, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def smooth(seed: int, size: int = 192) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    a = np.stack([80 + 100 * xx, 90 + 80 * yy, 150 - 60 * xx], -1) + rng.normal(0, 2, (size, size, 3))
    return Image.fromarray(a.clip(0, 255).astype(np.uint8))


def with_watermark(im: Image.Image, corner: str = "bottom-right") -> Image.Image:
    im = im.copy()
    d = ImageDraw.Draw(im)
    font = ImageFont.load_default(size=11)
    w, h = im.size
    x = w - 44 if "right" in corner else 3
    y = h - 26 if "bottom" in corner else 3
    d.text((x, y), "(c)stk", fill=(255, 255, 255), font=font)
    d.text((x, y + 11), "photo", fill=(255, 255, 255), font=font)
    return im


def write(folder: Path, images: dict[str, Image.Image], captions: dict[str, str] | None = None,
          caption: str | None = "zxq, a thing") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, im in images.items():
        im.save(folder / name)
        text = (captions or {}).get(name, caption)
        if text is not None:
            (folder / name).with_suffix(".txt").write_text(text, encoding="utf-8")
    return folder


def checks(report: dr.DoctorReport) -> set[str]:
    return {f.check for f in report.findings}


def clean_set(n: int = 6) -> dict[str, Image.Image]:
    return {f"{i:03d}.png": varied(i) for i in range(n)}


# ------------------------------------------------------------------ a clean dataset: nothing fires


def test_clean_dataset_has_no_findings(tmp_path):
    folder = write(tmp_path / "d", clean_set(8))
    report = dr.examine(folder, "zxq", 128)
    assert report.findings == [], report.text
    assert report.warnings == [] and "No problems found" in report.text


# ------------------------------------------------------------------ near-duplicates


def test_near_duplicates_are_listed_as_pairs(tmp_path):
    images = clean_set(5)
    buf = io.BytesIO()
    images["001.png"].resize((140, 112)).save(buf, "JPEG", quality=70)  # resized + re-encoded copy
    images["copy_of_001.jpg"] = Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    report = dr.examine(write(tmp_path / "d", images), "zxq", 100)
    dup = [f for f in report.findings if f.check == "duplicate"]
    assert len(dup) == 1 and "001.png ~ copy_of_001.jpg" in dup[0].message
    assert sorted(dup[0].files) == ["001.png", "copy_of_001.jpg"]


def test_near_duplicates_quiet_on_distinct_images():
    hashes = {i: dr.phash(varied(i)) for i in range(20)}
    assert dr.near_duplicates(hashes) == []


# ------------------------------------------------------------------ shared background


def test_shared_background_fires_on_white_product_shots(tmp_path):
    images = {f"{i}.png": on_plain_background(i) for i in range(4)} | {"v.png": varied(1, (128, 128))}
    report = dr.examine(write(tmp_path / "d", images), "zxq", 100)
    bg = [f for f in report.findings if f.check == "background"]
    assert len(bg) == 1 and "RGB(255, 255, 255)" in bg[0].message and "4 of 5" in bg[0].message
    assert "v.png" not in bg[0].files


def test_shared_background_quiet_when_backgrounds_vary(tmp_path):
    colours = [(255, 255, 255), (20, 20, 20), (200, 40, 40), (40, 160, 60), (30, 60, 200), (240, 220, 40)]
    images = {f"{i}.png": on_plain_background(i, bg=c) for i, c in enumerate(colours)}
    report = dr.examine(write(tmp_path / "d", images), "zxq", 100)
    assert "background" not in checks(report), report.text
    assert dr.border_colour(varied(3)) is None  # a gradient border is no single colour


# ------------------------------------------------------------------ reused framing


def test_reused_framing_fires_even_with_inverted_colours(tmp_path):
    images = {f"{i}.png": same_framing(i) for i in range(5)} | {f"v{i}.png": varied(i, (128, 128)) for i in range(2)}
    report = dr.examine(write(tmp_path / "d", images), "zxq", 100)
    fr = [f for f in report.findings if f.check == "framing"]
    assert len(fr) == 1 and sorted(fr[0].files) == [f"{i}.png" for i in range(5)], report.text


def test_reused_framing_quiet_on_varied_compositions():
    layouts = {i: dr.layout_hash(varied(i)) for i in range(20)}
    assert dr.shared_framing(layouts, 20) is None


# ------------------------------------------------------------------ watermarks / corner text


@pytest.mark.parametrize("corner", ["bottom-right", "top-left"])
def test_corner_text_is_found_in_its_corner(corner):
    found = dr.corner_text_score(with_watermark(smooth(0), corner))
    assert found is not None and found[0] == corner
    faint = Image.blend(smooth(0), with_watermark(smooth(0), corner), 0.5)  # a 50%-opaque watermark
    found = dr.corner_text_score(faint)
    assert found is not None and found[0] == corner


def test_corner_text_quiet_on_clean_textured_and_centred_images():
    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 256, (192, 192, 3), dtype=np.uint8))  # texture everywhere, no corner stands out
    centred = smooth(1)
    ImageDraw.Draw(centred).text((70, 90), "centre", fill=(255, 255, 255), font=ImageFont.load_default(size=14))
    for im in (smooth(0), noise, centred, *(varied(i, (256, 192)) for i in range(40))):
        assert dr.corner_text_score(im) is None


def test_watermark_finding_names_the_files(tmp_path):
    images = {"a.png": with_watermark(smooth(0)), "b.png": smooth(1), "c.png": varied(2)}
    report = dr.examine(write(tmp_path / "d", images), "zxq", 100)
    wm = [f for f in report.findings if f.check == "watermark"]
    assert len(wm) == 1 and wm[0].files == ["a.png"] and "bottom-right" in wm[0].message


# ------------------------------------------------------------------ captions


def test_caption_problems_are_each_reported(tmp_path):
    folder = write(tmp_path / "d", clean_set(5), captions={"001.png": "", "002.png": "a dog on grass"})
    (folder / "003.txt").unlink()
    (folder / "004.txt").write_bytes("zxq caf\xe9".encode("latin-1"))
    found = dr.caption_problems(listing.list_folder(folder), "zxq")
    by_text = " | ".join(f.message for f in found)
    assert [f.files for f in found] == [["003.png"], ["001.png"], ["002.png"], ["004"]], by_text
    assert "no .txt caption" in by_text and "empty" in by_text and "lack the trigger 'zxq'" in by_text
    assert "not UTF-8" in by_text and "004.txt" in by_text


def test_captions_with_trigger_are_fine(tmp_path):
    folder = write(tmp_path / "d", clean_set(3), captions={"001.png": "A photo of ZXQ, smiling"})
    assert dr.caption_problems(listing.list_folder(folder), "zxq") == []
    assert dr.caption_problems(listing.list_folder(folder), "") == []  # no trigger: nothing to miss


# ------------------------------------------------------------------ resolution


def test_low_resolution_names_the_small_images(tmp_path):
    images = {"big.png": varied(0, (160, 128)), "small.png": varied(1, (96, 64))}
    report = dr.examine(write(tmp_path / "d", images), "zxq", 128)
    low = [f for f in report.findings if f.check == "low_res"]
    assert len(low) == 1 and low[0].files == ["small.png"] and "96x64" in low[0].message
    assert dr.low_resolution({"a": (128, 200), "b": (1024, 768)}, 128) == []


def test_exif_rotation_and_modes_are_read(tmp_path):
    rgba = Image.new("RGBA", (80, 50), (10, 20, 30, 0))
    rgba.save(tmp_path / "a.png")
    Image.fromarray((np.arange(60 * 40).reshape(40, 60) * 20).astype(np.uint16)).save(tmp_path / "b.png")
    assert dr.read_image(tmp_path / "a.png").size == (80, 50)
    info = dr.read_image(tmp_path / "b.png")
    assert info.size == (60, 40) and info.thumb.mode == "RGB"


def test_unreadable_images_are_findings_not_crashes(tmp_path):
    folder = write(tmp_path / "d", clean_set(2))
    (folder / "empty.png").write_bytes(b"")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    report = dr.examine(folder, "zxq", 100)
    bad = [f for f in report.findings if f.check == "unreadable"]
    assert sorted(f.files[0] for f in bad) == ["broken.jpg", "empty.png"]
    assert any("zero-byte" in f.message for f in bad)


# ------------------------------------------------------------------ pairs


def test_pair_problems_missing_partner_and_size(tmp_path):
    targets = write(tmp_path / "t", {"001.png": varied(0), "002.png": varied(1), "003.png": varied(2)})
    controls = write(tmp_path / "c", {"001.jpg": varied(10), "002.png": varied(11, (128, 128)), "009.png": varied(12)},
                     caption=None)
    report = dr.examine(targets, "zxq", 100, "image-to-image", control_folder=controls)
    pairs = [f for f in report.findings if f.check == "pair"]
    text = " | ".join(f.message for f in pairs)
    assert len(pairs) == 3, text
    assert pairs[0].files == ["003.png"] and "no control image" in pairs[0].message
    assert "009.png" in pairs[1].message and "no target" in pairs[1].message
    assert pairs[2].files == ["002.png"] and "target 160x128, control 128x128" in pairs[2].message
    assert "2 pairs for image-to-image" in report.text  # the size check counts matched pairs


def test_pair_folder_that_matches_nothing():
    found = dr.pair_problems({"a.png": (64, 64)}, {"b.png": (64, 64)})
    assert len(found) == 1 and "matches none" in found[0].message


def test_matching_pairs_are_fine():
    assert dr.pair_problems({"a.png": (64, 48), "b.png": (80, 80)}, {"a.jpg": (64, 48), "b.webp": (80, 80)}) == []


def test_image_to_image_without_control_folder_is_a_finding(tmp_path):
    report = dr.examine(write(tmp_path / "d", clean_set(2)), "zxq", 100, "image-to-image")
    assert any(f.check == "pair" and "control folder" in f.message for f in report.findings)


# ------------------------------------------------------------------ dataset size


@pytest.mark.parametrize(("count", "task", "fires"), [
    (10, "style", True), (50, "style", False), (200, "style", False), (201, "style", True),
    (19, "character", True), (40, "character", False), (101, "object", True), (30, "image-to-image", False),
    (3, None, False),
])
def test_dataset_size_against_task_range(count, task, fires):
    finding, line = dr.size_advice(count, task)
    assert (finding is not None) == fires
    if task:
        assert "recommended" in line


def test_examine_reports_small_dataset_for_task(tmp_path):
    report = dr.examine(write(tmp_path / "d", clean_set(4)), "zxq", 100, "character")
    size = [f for f in report.findings if f.check == "size"]
    assert len(size) == 1 and "only 4 images for character: 20-60" in size[0].message


# ------------------------------------------------------------------ contact sheet


def test_contact_sheet_marks_problem_images(tmp_path):
    images = {"000.png": varied(0), "001.png": varied(1, (64, 48))}
    report = dr.examine(write(tmp_path / "d", images), "zxq", 100)
    sheet = report.contact_sheet(thumb=64)
    assert tuple(sheet.shape[:1]) == (1,) and sheet.shape[-1] == 3 and str(sheet.dtype) == "torch.float32"
    assert 0.0 <= float(sheet.min()) and float(sheet.max()) <= 1.0
    im = report.contact_sheet_image(thumb=64)
    pad, legend = 6, 22
    cell_w = 64 + 2 * pad
    # 001.png (second cell) is low-res: its outer border carries the low_res colour; 000.png's border stays grey.
    assert im.getpixel((cell_w + pad - 1, legend + 30)) == dr.CHECKS["low_res"][1]
    assert im.getpixel((pad - 1, legend + 30)) == (40, 40, 40)
