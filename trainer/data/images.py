"""A dataset folder's files and how one image is read: one place for the loader and the Dataset Doctor.

Listing: the images of a folder (not its subfolders: they are counted and reported), each with its
caption, the captions without an image, and every file whose link leads outside the allowed roots
(checked one by one after resolving links, so a link cannot smuggle a file in from elsewhere).

Captions are matched by the image's exact name and a `.txt` extension in any case: `C.TXT` is the
caption of `C.Png` (Windows and macOS match it so; Linux users meet the same files). A caption
whose name differs from its image's only in case is not matched: it is reported as an orphan, with
the image it nearly names.

Reading: EXIF rotation applied, transparency flattened onto white, 16-bit and float images scaled
to 8 bits, and every failure (empty file, corrupt file, decompression bomb) a ValueError naming the
file and saying what to do.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, TypeVar

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
CAPTION_SUFFIX = ".txt"
_SIZE_SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # EXIF orientations that rotate by 90 degrees
_WIDE_MODES = ("I;16", "I;16B", "I;16L", "I", "F")

Size = tuple[int, int]  # (width, height) in pixels
T = TypeVar("T", str, Path)


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_within(path: Path, roots: Sequence[Path]) -> bool:
    from ..paths import is_within

    return any(is_within(path, r) for r in roots)


@dataclass
class FolderListing:
    """What is in a dataset folder, read once."""

    folder: Path
    images: list[Path] = field(default_factory=list)
    captions: dict[str, Path] = field(default_factory=dict)  # image name -> its caption file
    orphan_captions: list[Path] = field(default_factory=list)  # no image of that name
    near_misses: dict[str, str] = field(default_factory=dict)  # orphan caption -> image named the same but for case
    subfolder_images: dict[str, int] = field(default_factory=dict)  # subfolder -> images in it (not used)
    outside: list[tuple[Path, Path]] = field(default_factory=list)  # (file, where its link leads)

    def caption_of(self, image: Path) -> Path | None:
        return self.captions.get(image.name)

    def outside_error(self) -> str | None:
        """The refusal for files linked from outside the allowed roots, naming them; None when none is."""
        if not self.outside:
            return None
        shown = "; ".join(f"{p.name} -> {real}" for p, real in self.outside[:5])
        more = f" (+{len(self.outside) - 5} more)" if len(self.outside) > 5 else ""
        return (f"dataset folder {self.folder}: {len(self.outside)} file(s) link outside the allowed roots: "
                f"{shown}{more}. Copy the files into the folder instead of linking them, or add their folder to "
                "'dataset_roots' in klein_lora_studio.json.")

    def warnings(self) -> list[str]:
        """Files the folder holds that training will not use, each group in one sentence naming them."""
        out = []
        if self.subfolder_images:
            subs = ", ".join(f"{s}/ ({n})" for s, n in sorted(self.subfolder_images.items()))
            out.append(f"{sum(self.subfolder_images.values())} image(s) in subfolders of {self.folder} are not used "
                       f"(only the folder itself is read): {subs}. Move them up into the folder, or point the "
                       "folder input at the subfolder.")
        if self.orphan_captions:
            names = []
            for c in self.orphan_captions:
                hint = self.near_misses.get(c.name)
                names.append(f"{c.name} (the image is {hint}: names must match exactly)" if hint else c.name)
            out.append(f"{len(self.orphan_captions)} caption(s) have no image of the same name and are not used: "
                       f"{_names(names)}. Rename them after their image or remove them.")
        return out


def _names(names: list[str], limit: int = 10) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _count_images(folder: Path) -> int:
    return sum(1 for _, _, files in os.walk(folder) for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES)


def list_folder(folder: Path, roots: Sequence[Path] | None = None) -> FolderListing:
    """The folder's images and captions. `roots` are where files may really live (default: the folder)."""
    folder = Path(folder)
    roots = [Path(os.path.realpath(r)) for r in (roots or [folder])]
    out = FolderListing(folder)
    captions: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_dir():
            if (n := _count_images(p)):
                out.subfolder_images[p.name] = n
            continue
        is_caption = p.suffix.lower() == CAPTION_SUFFIX
        if not (is_caption or is_image(p)) or not p.is_file():
            continue
        real = Path(os.path.realpath(p))
        if not _is_within(real, roots):
            out.outside.append((p, real))
        elif is_caption:
            captions.setdefault(p.stem, []).append(p)
        else:
            out.images.append(p)
    stems = {p.stem for p in out.images}
    for img in out.images:
        found = captions.get(img.stem)
        if found:  # the exact `.txt` first when `.txt` and `.TXT` both exist
            out.captions[img.name] = min(found, key=lambda c: (c.suffix != CAPTION_SUFFIX, c.name))
    by_lower = {p.stem.lower(): p.name for p in out.images}
    for stem, files in sorted(captions.items()):
        if stem not in stems:
            out.orphan_captions += files
            if stem.lower() in by_lower:
                out.near_misses.update({c.name: by_lower[stem.lower()] for c in files})
    return out


def no_images_error(listing: FolderListing, what: str = "dataset folder", advice: str = "") -> str:
    """'has no images', saying so when the images sit in subfolders."""
    msg = f"{what} {listing.folder} has no images ({', '.join(IMAGE_SUFFIXES)})"
    if listing.subfolder_images:
        subs = ", ".join(f"{s}/ ({n})" for s, n in sorted(listing.subfolder_images.items()))
        return (f"{msg}; its subfolders hold images, but only the folder itself is read: {subs}. Point the folder "
                "input at the subfolder, or move the images up.")
    return f"{msg}: {advice or 'put the training images there with same-name .txt captions.'}"


# ---------------------------------------------------------------- pairing by name


def stem_clashes(paths: Sequence[T]) -> list[list[T]]:
    """Groups of files that share one name without extension (pairs cannot be matched through them)."""
    groups: dict[str, list[T]] = {}
    for p in paths:
        groups.setdefault(Path(p).stem, []).append(p)
    return [g for g in groups.values() if len(g) > 1]


def pair_by_stem(targets: Sequence[T], controls: Sequence[T]) -> tuple[list[tuple[T, T]], list[T], list[T]]:
    """(target, control) pairs matched by name without extension, the lone targets and the lone controls."""
    t = {Path(p).stem: p for p in targets}
    c = {Path(p).stem: p for p in controls}
    pairs = [(t[s], c[s]) for s in t if s in c]
    return pairs, [t[s] for s in sorted(set(t) - set(c))], [c[s] for s in sorted(set(c) - set(t))]


# ---------------------------------------------------------------- reading one image


class Decoded(NamedTuple):
    image: object  # PIL.Image.Image, 8-bit RGB, EXIF-rotated
    note: str | None  # what was converted, for the report
    size: Size  # the full (width, height) as used, also when decoded at a reduced size


def _check_nonempty(path: Path) -> None:
    if path.stat().st_size == 0:
        raise ValueError(f"image {path} is an empty (zero-byte) file: remove it or replace it with the real image.")


def _unreadable(path: Path, e: Exception) -> ValueError:
    from PIL import Image

    if isinstance(e, Image.DecompressionBombError):
        return ValueError(f"image {path} claims more pixels than PIL will decode ({e}): it is a decompression bomb "
                          "or a huge scan. Downscale it (a few megapixels is plenty for training) or remove it.")
    return ValueError(f"image {path} cannot be read ({e}): the file is corrupt or not an image; "
                      "re-export it or remove it from the folder.")


def _errors() -> tuple[type[BaseException], ...]:
    from PIL import Image, UnidentifiedImageError

    return UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError


def _oriented_size(im) -> Size:
    w, h = im.size
    return (h, w) if im.getexif().get(0x0112) in _SIZE_SWAPPING_ORIENTATIONS else (w, h)


def image_size(path: Path) -> Size:
    """(width, height) as the image will be used (after EXIF rotation), read from the header only."""
    from PIL import Image

    _check_nonempty(path)
    try:
        with Image.open(path) as im:
            return _oriented_size(im)
    except _errors() as e:
        raise _unreadable(path, e) from e


def to_rgb(im, name: str):
    """(8-bit RGB image, note): transparency onto white, 16-bit / float scaled to 8 bits, other modes converted."""
    import numpy as np
    from PIL import Image

    if im.mode == "RGB":
        return im, None
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", im.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg, f"{name}: transparency flattened onto white"
    if im.mode in _WIDE_MODES:
        arr = np.asarray(im, dtype=np.float32)
        scaled = Image.fromarray((arr / max(float(arr.max()), 1.0) * 255).clip(0, 255).astype("uint8"))
        return scaled.convert("RGB"), f"{name}: 16-bit image scaled to 8-bit RGB"
    return im.convert("RGB"), f"{name}: converted from {im.mode} to RGB"


def open_rgb(path: Path, max_side: int | None = None) -> Decoded:
    """The image as 8-bit RGB, EXIF-rotated; with `max_side`, a copy no larger (JPEGs decode reduced, fast)."""
    from PIL import Image, ImageOps

    _check_nonempty(path)
    try:
        with Image.open(path) as im:
            size = _oriented_size(im)
            if max_side:
                im.draft("RGB", (max_side * 2, max_side * 2))
            im.load()
            rgb, note = to_rgb(ImageOps.exif_transpose(im), path.name)
            if max_side:
                rgb.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
            return Decoded(rgb.copy() if rgb is im else rgb, note, size)
    except _errors() as e:
        raise _unreadable(path, e) from e
