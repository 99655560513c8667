"""Dataset Doctor: find what makes a LoRA learn the wrong thing before any step is trained.

Each check is a pure function over small PIL images, hashes or file lists, so it can be tested on
generated images. `examine()` runs them all over a folder (and an optional control folder for
image-to-image pairs) and returns a `DoctorReport`: warnings, a text report, and a contact sheet
with the problem images outlined in the colour of their problem.

What is checked, and why it hurts a LoRA:
- near-duplicates (perceptual hash): the duplicated image is overtrained;
- one shared background colour (border pixels): the background is learned as part of the concept;
- reused framing (low-res edge-layout hash): the composition / camera angle is learned;
- corner watermarks or text (edge energy concentrated in a corner): the mark is reproduced;
- missing or trigger-less captions: the trigger is not bound to the concept; captions longer than
  the text encoder takes (cut at 512 tokens);
- files not used: images in subfolders, captions without an image; files linked from outside the
  allowed roots (listed, never shown on the contact sheet);
- images below the training resolution: they are upscaled, so blur is learned;
- image-to-image pairs with a missing partner or a different size;
- dataset size against the task's recommended range (trainer/training/recipes.py).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..training.recipes import RECIPES
from . import captions, images
from .captions import has_trigger

ANALYSIS_SIZE = 256  # long side of the copy every check looks at: enough for hashes and corners, fast on CPU
HASH_BITS = 64

# Thresholds (Hamming distances are out of 64 bits).
DUPLICATE_DISTANCE = 6  # pHash: re-encodes, resizes and small edits stay within ~4; different photos sit near 32
LAYOUT_DISTANCE = 6  # edge-layout hash: same subject placement and scale
SHARED_FRACTION = 0.5  # a background/framing shared by at least this share of the images (and >= 3 of them)
BORDER_TOLERANCE = 30.0  # RGB distance within which two border colours are "the same"
BORDER_UNIFORM = 0.85  # share of border pixels that must be near the border's median colour
CORNER_RATIO = 3.0  # corner edge energy vs the 75th percentile of the other cells
CORNER_MIN_ENERGY = 10.0  # mean |gradient| (0-255 grey levels) of a corner before it counts as text; a 50%-opaque
# caption font at ~1/16 of the image height gives ~12, one shape edge crossing a corner 5-9

CHECKS = {  # check id -> (short label on the contact sheet, border colour)
    "unreadable": ("BAD", (160, 160, 160)),  # listed in the text only: it has no thumbnail
    "files": ("FILES", (120, 120, 120)),  # files not used (subfolders, orphan captions, links out): text only
    "duplicate": ("DUP", (230, 40, 40)),
    "background": ("BG", (255, 150, 0)),
    "framing": ("FRAME", (230, 210, 0)),
    "watermark": ("MARK", (220, 0, 220)),
    "caption": ("CAPT", (0, 200, 220)),
    "low_res": ("LOWRES", (40, 90, 255)),
    "pair": ("PAIR", (140, 60, 200)),
}


@dataclass
class Finding:
    check: str
    message: str
    files: list[str] = field(default_factory=list)


@dataclass
class ImageInfo:
    """What the checks need from one image, read once."""

    name: str
    size: tuple[int, int]
    thumb: Image.Image  # RGB, long side ANALYSIS_SIZE (or less)


# ---------------------------------------------------------------- hashes and per-image measures


def _gray(im: Image.Image, size: int) -> np.ndarray:
    return np.asarray(im.convert("L").resize((size, size), Image.Resampling.BILINEAR), dtype=np.float32)


def _pack(bits: np.ndarray) -> int:
    return int("".join("1" if b else "0" for b in bits.flatten()), 2)


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


def phash(im: Image.Image) -> int:
    """64-bit perceptual hash (DCT of a 32x32 grey copy, 8x8 low frequencies vs their median).

    The same algorithm as the `imagehash` package's phash; written here with scipy's DCT (a ComfyUI
    requirement) to avoid a dependency for ten lines.
    """
    from scipy.fft import dctn

    low = dctn(_gray(im, 32), norm="ortho")[:8, :8]
    return _pack(low > np.median(low))


def layout_hash(im: Image.Image) -> int:
    """64-bit hash of where the edges are (8x8 cells of gradient magnitude above their mean).

    Colours and contrast sign do not matter, only the placement and scale of the structure, so it
    matches reused framing / camera angles that pHash (brightness based) can miss.
    """
    g = _gray(im, 64)
    mag = np.zeros_like(g)
    mag[:, :-1] += np.abs(np.diff(g, axis=1))
    mag[:-1, :] += np.abs(np.diff(g, axis=0))
    cells = mag.reshape(8, 8, 8, 8).mean(axis=(1, 3))
    # The mean, not the median: with sparse edges (a subject on a plain ground) most cells hold only
    # noise, and a median threshold would make half the bits noise.
    return _pack(cells > cells.mean())


def border_colour(im: Image.Image) -> tuple[int, int, int] | None:
    """The image's background colour when its border is one uniform colour, else None."""
    a = np.asarray(im.convert("RGB"), dtype=np.float32)
    h, w = a.shape[:2]
    s = max(2, round(min(h, w) * 0.04))
    border = np.concatenate([a[:s].reshape(-1, 3), a[-s:].reshape(-1, 3), a[:, :s].reshape(-1, 3), a[:, -s:].reshape(-1, 3)])
    med = np.median(border, axis=0)
    near = np.linalg.norm(border - med, axis=1) < BORDER_TOLERANCE / 2
    return tuple(int(round(c)) for c in med) if near.mean() >= BORDER_UNIFORM else None


def corner_text_score(im: Image.Image) -> tuple[str, float] | None:
    """The corner that looks like a watermark or text overlay, with its energy ratio; None when none does.

    The image is cut into a 4x6 grid; a corner cell whose edge energy (mean |gradient|) is both high
    and several times the 75th percentile of the non-corner cells is where text usually sits.
    """
    g = np.asarray(im.convert("L"), dtype=np.float32)
    mag = np.zeros_like(g)
    mag[:, :-1] += np.abs(np.diff(g, axis=1))
    mag[:-1, :] += np.abs(np.diff(g, axis=0))
    rows, cols = 6, 4
    h, w = (g.shape[0] // rows) * rows, (g.shape[1] // cols) * cols
    cells = mag[:h, :w].reshape(rows, h // rows, cols, w // cols).mean(axis=(1, 3))
    corners = {"top-left": (0, 0), "top-right": (0, cols - 1), "bottom-left": (rows - 1, 0),
               "bottom-right": (rows - 1, cols - 1)}
    mask = np.ones_like(cells, dtype=bool)
    for r, c in corners.values():
        mask[r, c] = False
    rest = float(np.percentile(cells[mask], 75))
    best = None
    for name, (r, c) in corners.items():
        e = float(cells[r, c])
        ratio = e / max(rest, 0.5)
        if e >= CORNER_MIN_ENERGY and ratio >= CORNER_RATIO and (best is None or ratio > best[1]):
            best = (name, ratio)
    return best


# ---------------------------------------------------------------- checks over the whole set


def near_duplicates(hashes: dict[str, int], max_distance: int = DUPLICATE_DISTANCE) -> list[tuple[str, str, int]]:
    """Every pair of images whose perceptual hashes are within `max_distance` bits."""
    names = list(hashes)
    return [(a, b, d) for i, a in enumerate(names) for b in names[i + 1:]
            if (d := hamming(hashes[a], hashes[b])) <= max_distance]


def _largest_group(names: list[str], close) -> list[str]:
    best: list[str] = []
    for a in names:
        group = [b for b in names if b == a or close(a, b)]
        if len(group) > len(best):
            best = group
    return best


def _shared_enough(group: list[str], total: int) -> bool:
    return len(group) >= 3 and len(group) >= SHARED_FRACTION * total


RGB = tuple[int, int, int]


def shared_background(colours: dict[str, RGB | None], total: int) -> tuple[RGB, list[str]] | None:
    """The background colour shared by at least half the images (and 3 or more), with those images."""
    plain = {k: np.array(v, dtype=np.float32) for k, v in colours.items() if v is not None}
    group = _largest_group(list(plain), lambda a, b: float(np.linalg.norm(plain[a] - plain[b])) < BORDER_TOLERANCE)
    if not _shared_enough(group, total):
        return None
    mean = np.mean([plain[n] for n in group], axis=0)
    return tuple(int(round(c)) for c in mean), group


def shared_framing(layouts: dict[str, int], total: int, max_distance: int = LAYOUT_DISTANCE) -> list[str] | None:
    """The images (at least half, and 3 or more) that share one layout of edges: one framing reused."""
    group = _largest_group(list(layouts), lambda a, b: hamming(layouts[a], layouts[b]) <= max_distance)
    return group if _shared_enough(group, total) else None


def _read_captions(listing: images.FolderListing, tokenizer) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Image name -> caption text, and the problem kind -> image names (missing, unreadable, too long...)."""
    texts: dict[str, str] = {}
    problems: dict[str, list[str]] = {"missing": [], "unreadable": [], "too_large": [], "long": []}
    for img in listing.images:
        cap = listing.caption_of(img)
        if cap is None:
            problems["missing"].append(img.name)
            continue
        try:
            text = captions.read_caption(cap)
        except captions.CaptionTooLarge:
            problems["too_large"].append(cap.name)
            continue
        except ValueError:
            problems["unreadable"].append(cap.name)
            continue
        _, tokens = captions.fit_caption(text, tokenizer)
        if tokens > captions.MAX_TOKENS:
            problems["long"].append(f"{cap.name} ({tokens} tokens)")
        texts[img.name] = text
    return texts, problems


def caption_problems(listing: images.FolderListing, trigger: str, tokenizer=None) -> list[Finding]:
    """Images with no caption file, an empty, unreadable or over-long caption, or a caption without the trigger."""
    texts, problems = _read_captions(listing, tokenizer)
    empty = [n for n, t in texts.items() if not t]
    no_trigger = [n for n, t in texts.items() if t and trigger and not has_trigger(t, trigger)]
    missing, unreadable, too_large, long = (problems[k] for k in ("missing", "unreadable", "too_large", "long"))
    stem = lambda names: [Path(n.split(" (")[0]).stem for n in names]  # noqa: E731 - caption names -> image stems
    found = []
    if missing:
        found.append(Finding("caption", f"{len(missing)} image(s) have no .txt caption (they train on the trigger "
                                        f"alone): {_names(missing)}. Write a caption per image.", missing))
    if empty:
        found.append(Finding("caption", f"{len(empty)} caption(s) are empty: {_names(empty)}. Describe what is not "
                                        "the concept (setting, pose, lighting).", empty))
    if no_trigger:
        found.append(Finding("caption", f"{len(no_trigger)} caption(s) lack the trigger '{trigger}' (the loader puts "
                                        f"it first): {_names(no_trigger)}.", no_trigger))
    if unreadable:
        found.append(Finding("caption", f"{len(unreadable)} caption(s) are not UTF-8 text: {_names(unreadable)}. "
                                        "Re-save them as UTF-8.", stem(unreadable)))
    if too_large:
        found.append(Finding("caption", f"{len(too_large)} caption file(s) are larger than any caption "
                                        f"({captions.MAX_CAPTION_BYTES:,} bytes) and stop the loader: "
                                        f"{_names(too_large)}. Is it the right file? Shorten it.", stem(too_large)))
    if long:
        found.append(Finding("caption", f"{len(long)} caption(s) are longer than the text encoder's "
                                        f"{captions.MAX_TOKENS} tokens and are cut there when training: {_names(long)}. "
                                        "Shorten them, or put what matters first.", stem(long)))
    return found


def file_problems(listings: list[images.FolderListing]) -> list[Finding]:
    """Files in the folders that training does not use, and files linked from outside the allowed roots."""
    found = []
    for listing in listings:
        found += [Finding("files", w) for w in listing.warnings()]
        if (refused := listing.outside_error()) is not None:
            found.append(Finding("files", refused.replace("Copy the files", "The loader refuses them: copy the files")))
    return found


def low_resolution(sizes: dict[str, tuple[int, int]], resolution: int) -> list[str]:
    """Images whose short side is below the training resolution (the loader upscales them)."""
    return [n for n, (w, h) in sizes.items() if min(w, h) < resolution]


def pair_problems(targets: dict[str, tuple[int, int]], controls: dict[str, tuple[int, int]]) -> list[Finding]:
    """Pairs are matched by file stem; report partners missing on either side and size mismatches."""
    pairs, no_control, no_target = images.pair_by_stem(list(targets), list(controls))
    if not pairs:
        return [Finding("pair", f"the control folder matches none of the {len(targets)} target images by file name "
                                "(pairs are matched by name without extension, e.g. 001.png <-> 001.jpg): rename "
                                "the control images after their targets.", list(targets))]
    found = []
    if no_control:
        found.append(Finding("pair", f"{len(no_control)} target image(s) have no control image of the same name: "
                                     f"{_names(no_control)}.", no_control))
    if no_target:
        found.append(Finding("pair", f"{len(no_target)} control image(s) have no target of the same name: "
                                     f"{_names(no_target)}.", []))
    mismatched = [(Path(t).stem, targets[t], controls[c], t) for t, c in pairs if targets[t] != controls[c]]
    if mismatched:
        detail = ", ".join(f"{s} (target {a[0]}x{a[1]}, control {b[0]}x{b[1]})" for s, a, b, _ in mismatched[:10])
        found.append(Finding("pair", f"{len(mismatched)} pair(s) differ in size: {detail}"
                                     f"{' ...' if len(mismatched) > 10 else ''}. Export control and target at the "
                                     "same size so they stay aligned.", [t for *_, t in mismatched]))
    return found


def size_advice(count: int, task: str | None) -> tuple[Finding | None, str]:
    """A finding when `count` is outside the task's recommended range, and a one-line summary either way."""
    if not task or task not in RECIPES:
        return None, f"{count} image(s); no task chosen, so no size advice"
    lo, hi = RECIPES[task].dataset_range
    unit = "pairs" if task == "image-to-image" else "images"
    line = f"{count} {unit} for {task} (recommended {lo}-{hi})"
    if count < lo:
        return Finding("size", f"only {count} {unit} for {task}: {lo}-{hi} are recommended; add varied {unit} or "
                               "expect overfitting."), line
    if count > hi:
        return Finding("size", f"{count} {unit} for {task}: more than the recommended {lo}-{hi}; curate to the "
                               "best, most varied ones or raise the steps."), line
    return None, line


def _names(names: list[str], limit: int = 12) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


# ---------------------------------------------------------------- reading images


def read_image(path: Path) -> ImageInfo:
    """The image's true size (EXIF rotation applied) and an RGB copy with a long side of ANALYSIS_SIZE.

    Raises ValueError naming the file when it is empty or cannot be decoded.
    """
    decoded = images.open_rgb(path, max_side=ANALYSIS_SIZE)
    return ImageInfo(path.name, decoded.size, decoded.image)


def _read_all(images: list[Path]) -> tuple[list[ImageInfo], list[Finding]]:
    infos, bad = [], []
    for p in images:
        try:
            infos.append(read_image(p))
        except ValueError as e:
            bad.append(Finding("unreadable", str(e), [p.name]))
    return infos, bad


# ---------------------------------------------------------------- the report


@dataclass
class DoctorReport:
    folder: str
    task: str | None
    resolution: int
    trigger: str
    images: list[ImageInfo]
    findings: list[Finding]
    summary: list[str] = field(default_factory=list)

    @property
    def warnings(self) -> list[str]:
        return [f.message for f in self.findings]

    def flags(self) -> dict[str, list[str]]:
        """File name -> the checks it failed (for the contact sheet)."""
        out: dict[str, list[str]] = {}
        for f in self.findings:
            for n in f.files:
                if f.check not in out.setdefault(n, []):
                    out[n].append(f.check)
        return out

    @property
    def text(self) -> str:
        head = [f"Klein Dataset Doctor: {self.folder}", *self.summary]
        if not self.findings:
            return "\n".join([*head, "No problems found."])
        return "\n".join([*head, f"{len(self.findings)} problem(s):", *(f"- [{f.check}] {f.message}" for f in self.findings)])

    def contact_sheet_image(self, thumb: int = 128, max_columns: int = 10) -> Image.Image:
        """A grid of thumbnails; each problem draws a border in its colour and a label under the image."""
        flags = self.flags()
        n = max(1, len(self.images))
        cols = min(max_columns, math.ceil(math.sqrt(n)))
        rows = math.ceil(n / cols)
        label_h, pad, legend_h = 26, 6, 22
        cell_w, cell_h = thumb + 2 * pad, thumb + 2 * pad + label_h
        sheet = Image.new("RGB", (max(cols * cell_w, 560), legend_h + rows * cell_h), (40, 40, 40))
        draw = ImageDraw.Draw(sheet)
        font = ImageFont.load_default()
        x = 4
        for label, colour in CHECKS.values():  # legend
            draw.rectangle([x, 5, x + 11, 16], fill=colour)
            draw.text((x + 14, 5), label, fill=(230, 230, 230), font=font)
            x += 20 + int(draw.textlength(label, font=font))
        for i, info in enumerate(self.images):
            cx, cy = (i % cols) * cell_w, legend_h + (i // cols) * cell_h
            t = info.thumb.copy()
            t.thumbnail((thumb, thumb))
            sheet.paste(t, (cx + pad + (thumb - t.width) // 2, cy + pad + (thumb - t.height) // 2))
            problems = flags.get(info.name, [])
            for k, check in enumerate(problems):  # nested borders, one per problem
                o = pad - 1 - 3 * k
                if o < 0:
                    break
                draw.rectangle([cx + o, cy + o, cx + cell_w - 1 - o, cy + thumb + 2 * pad - 1 - o],
                               outline=CHECKS[check][1], width=3)
            name = info.name if len(info.name) <= 20 else info.name[:17] + "..."
            draw.text((cx + pad, cy + thumb + 2 * pad), name, fill=(230, 230, 230), font=font)
            if problems:
                draw.text((cx + pad, cy + thumb + 2 * pad + 12), " ".join(CHECKS[c][0] for c in problems),
                          fill=CHECKS[problems[0]][1], font=font)
        return sheet

    def contact_sheet(self, thumb: int = 128):
        """The contact sheet as a ComfyUI IMAGE: a (1, H, W, 3) float tensor in [0, 1]."""
        import torch

        arr = np.asarray(self.contact_sheet_image(thumb), dtype=np.float32) / 255.0
        return torch.from_numpy(arr)[None]


def _image_findings(infos: list[ImageInfo], resolution: int) -> list[Finding]:
    """The checks that look at the pixels: duplicates, background, framing, watermarks, resolution."""
    findings: list[Finding] = []
    if not infos:
        return findings
    dups = near_duplicates({i.name: phash(i.thumb) for i in infos})
    if dups:
        listed = ", ".join(f"{a} ~ {b} ({d} bits)" for a, b, d in dups[:20])
        files = sorted({n for a, b, _ in dups for n in (a, b)})
        findings.append(Finding("duplicate", f"{len(dups)} near-duplicate pair(s): {listed}"
                                             f"{' ...' if len(dups) > 20 else ''}. Keep one of each.", files))
    bg = shared_background({i.name: border_colour(i.thumb) for i in infos}, len(infos))
    if bg:
        (r, g, b), names = bg
        findings.append(Finding("background", f"{len(names)} of {len(infos)} images share one background colour "
                                              f"RGB({r}, {g}, {b}): the LoRA will learn it. Vary the backgrounds "
                                              "or caption them.", names))
    framing = shared_framing({i.name: layout_hash(i.thumb) for i in infos}, len(infos))
    if framing:
        findings.append(Finding("framing", f"{len(framing)} of {len(infos)} images reuse one framing / layout "
                                           f"({_names(framing, 6)}): vary camera angle, distance and crop.", framing))
    marks = {i.name: s for i in infos if (s := corner_text_score(i.thumb))}
    if marks:
        detail = ", ".join(f"{n} ({c})" for n, (c, _) in list(marks.items())[:12])
        findings.append(Finding("watermark", f"{len(marks)} image(s) likely have a watermark or text in a corner: "
                                             f"{detail}. Crop or inpaint it out.", list(marks)))
    low = low_resolution({i.name: i.size for i in infos}, resolution)
    if low:
        sizes = {i.name: i.size for i in infos}
        detail = ", ".join(f"{n} ({sizes[n][0]}x{sizes[n][1]})" for n in low[:12])
        findings.append(Finding("low_res", f"{len(low)} image(s) are below {resolution}px on the short side and "
                                           f"will be upscaled (soft): {detail}{' ...' if len(low) > 12 else ''}.", low))
    return findings


def _pair_findings(infos: list[ImageInfo], control_folder, roots) -> tuple[list[Finding], int, images.FolderListing]:
    """Unreadable controls and pair problems, the number of matched pairs, and the control folder's listing."""
    controls_listing = images.list_folder(Path(control_folder), roots or [Path(control_folder)])
    controls, bad_controls = _read_all(controls_listing.images)
    for f in bad_controls:
        f.message, f.files = f"control {f.message}", []
    found = bad_controls + pair_problems({i.name: i.size for i in infos}, {c.name: c.size for c in controls})
    count = len(images.pair_by_stem([i.name for i in infos], [c.name for c in controls])[0])
    return found, count, controls_listing


def examine(folder: Path | str, trigger: str, resolution: int, task: str | None = None,
            control_folder: Path | str | None = None, roots=None, tokenizer=None) -> DoctorReport:
    """Run every check over `folder` (and `control_folder`'s pairs). Never raises for a bad image: it is a finding.

    `roots`: where the folders' files may really live once links are resolved (default: inside the folder);
    a file linked from elsewhere is a finding and never read or shown. `tokenizer`: klein's, to find
    captions longer than the text encoder takes (default: ComfyUI's copy of it, when ComfyUI is importable).
    """
    folder = Path(folder)
    trigger = (trigger or "").strip()
    listing = images.list_folder(folder, roots)
    infos, findings = _read_all(listing.images)
    listings = [listing]
    if task == "image-to-image" and control_folder is None:
        findings.append(Finding("pair", "task image-to-image needs a control folder (the inputs), matched to these "
                                        "targets by file name."))
    count = len(listing.images)
    if control_folder is not None:
        pair_found, count, controls_listing = _pair_findings(infos, control_folder, roots)
        findings += pair_found
        listings.append(controls_listing)
    size_finding, size_line = size_advice(count, task)
    if size_finding:
        findings.append(size_finding)
    findings += _image_findings(infos, resolution)
    findings += caption_problems(listing, trigger, tokenizer)
    findings += file_problems(listings)
    for f in findings:
        logging.debug("Klein dataset doctor: %s", f.message)
    summary = [f"{size_line}; training resolution {resolution}px; trigger '{trigger}'"]
    return DoctorReport(str(folder), task, resolution, trigger, infos, findings, summary)
