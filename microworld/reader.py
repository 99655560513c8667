"""An analytic reader of micro-world images: what a (generated, blurry, noisy) picture shows.

No training, nothing learned: every estimate is a few lines of numpy a reviewer can recompute.
  background  the median colour of the border ring -> nearest named background
  foreground  pixels that stand off the background after a light blur (robust to sampling noise)
  colour      the vote of the foreground pixels near a named colour or its pastel (edges vote for none)
  position    the foreground centroid -> 3x3 cell
  shape/size  the best intersection-over-union with every shape's template (drawn by world.shape_mask
              at both sizes and a few scales around them, centred on the foreground centroid)
  style       tint score: how far the shape's inner pixels are mixed toward white, from the read colour (0)
              to its pastel (1), judged on the smallest channel (which a hue error barely moves)
  object      the cross template beats every base shape's
  character   both fixed colours present, the head's above the body's
For image pairs, image_error compares a sample with the expected image (mean absolute error, 0..1).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageFilter

from . import world

READ_PX = 128  # images are read at this size (any input size is resized first)
BORDER = 4  # px of the border ring that samples the background
FG_DISTANCE = 48.0  # RGB distance from the background that makes a pixel foreground
COLOUR_DISTANCE = 90.0  # a foreground pixel votes for a named colour only this close to it
TINT_PRESENT = 0.5  # tint score above which the style counts as present: nearer the pastel than the pure colour
CHARACTER_SHARE = 0.08  # each character colour must cover this share of the foreground (clean: head ~0.25)
SCALES = (0.8, 0.9, 1.0, 1.1, 1.2)  # template scales tried around each nominal size
TEMPLATE_SHAPES = world.SHAPES + (world.OBJECT_SHAPE,)
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclass(frozen=True)
class Reading:
    """What one image shows. colour/shape/position/size are None where no foreground was found."""
    background: str
    colour: str | None
    position: str | None
    size: str | None
    shape: str | None
    shape_iou: float
    tint_score: float
    character_score: float
    foreground_share: float

    @property
    def style(self) -> bool:
        return self.tint_score > TINT_PRESENT

    @property
    def object(self) -> bool:
        return self.shape == world.OBJECT_SHAPE

    @property
    def character(self) -> bool:
        return self.character_score >= 1.0

    def concept_present(self, concept: str) -> bool:
        """Is the concept (style/object/character) in the picture?"""
        if concept not in ("style", "object", "character"):
            raise ValueError(f"concept {concept!r}: the reader sees 'style', 'object' or 'character'")
        return bool(getattr(self, concept))


def as_array(image, px: int = READ_PX) -> np.ndarray:
    """An RGB image (PIL, or HxWx3 array in 0..255 or 0..1) as float32 px x px x 3 in 0..255."""
    if not isinstance(image, Image.Image):
        arr = np.asarray(image, dtype=np.float32)
        if arr.ndim != 3 or arr.shape[2] != 3:
            raise ValueError(f"the reader wants an RGB image (H x W x 3), got an array of shape {arr.shape}")
        arr = arr * 255.0 if arr.max() <= 1.0 else arr
        image = Image.fromarray(arr.clip(0, 255).round().astype(np.uint8), "RGB")
    image = image.convert("RGB")
    if image.size != (px, px):
        image = image.resize((px, px), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _nearest(rgb: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour per pixel, and its distance."""
    table = np.array(list(palette.values()), dtype=np.float32)
    d = np.linalg.norm(rgb[..., None, :] - table, axis=-1)
    return d.argmin(-1), d.min(-1)


def _background(arr: np.ndarray) -> tuple[str, np.ndarray]:
    ring = np.concatenate([arr[:BORDER].reshape(-1, 3), arr[-BORDER:].reshape(-1, 3),
                           arr[:, :BORDER].reshape(-1, 3), arr[:, -BORDER:].reshape(-1, 3)])
    rgb = np.median(ring, axis=0)
    i, _ = _nearest(rgb[None], world.BACKGROUNDS)
    return list(world.BACKGROUNDS)[int(i[0])], rgb


_NAMED = {**world.COLOURS, **{f"{k} pastel": v for k, v in world.PASTELS.items()}}
_NAMED_COLOUR = [k.split()[0] for k in _NAMED]  # the colour name of each entry, pure and pastel alike


def _colour(arr: np.ndarray, mask: np.ndarray) -> str | None:
    """The named colour most foreground pixels are near (a pastel pixel votes for its colour's name)."""
    idx, dist = _nearest(arr[mask], _NAMED)
    votes: dict[str, int] = {}
    for i in idx[dist < COLOUR_DISTANCE]:
        votes[_NAMED_COLOUR[i]] = votes.get(_NAMED_COLOUR[i], 0) + 1
    return max(votes, key=votes.get) if votes else None


def _cell(cx: float, cy: float) -> str:
    col = int(np.argmin([abs(cx - c) for c in world.CELL_CENTRES]))
    row = int(np.argmin([abs(cy - c) for c in world.CELL_CENTRES]))
    return world.POSITIONS[3 * row + col]


@functools.lru_cache(maxsize=64)
def _templates(px: int) -> tuple[tuple[str, str, np.ndarray], ...]:
    """(shape, size, mask) for every template shape, size and scale, each with its centroid moved to
    the image centre (so it can be shifted onto a foreground's centroid)."""
    out = []
    for shape in TEMPLATE_SHAPES:
        for size, frac in world.HALF_EXTENT.items():
            for s in SCALES:
                m = world.shape_mask(shape, px / 2, px / 2, frac * s * px, px)
                ys, xs = np.nonzero(m)
                out.append((shape, size, np.roll(m, (round(px / 2 - ys.mean()), round(px / 2 - xs.mean())), (0, 1))))
    return tuple(out)


def _match_shape(mask: np.ndarray, cx: float, cy: float) -> tuple[str, str, float, dict[str, float]]:
    """(shape, size, IoU, best IoU per shape) of the best template centred on the mask's centroid."""
    px = mask.shape[0]
    # move the mask's centroid to the centre instead of every template to the centroid
    m = np.zeros_like(mask)
    dy, dx = round(px / 2 - cy), round(px / 2 - cx)
    ys, xs = np.nonzero(mask)
    keep = (ys + dy >= 0) & (ys + dy < px) & (xs + dx >= 0) & (xs + dx < px)
    m[ys[keep] + dy, xs[keep] + dx] = True
    best: dict[str, tuple[float, str]] = {}
    for shape, size, t in _templates(px):
        iou = float((t & m).sum() / max(1, (t | m).sum()))
        if iou > best.get(shape, (-1.0, ""))[0]:
            best[shape] = (iou, size)
    shape = max(best, key=lambda k: best[k][0])
    return shape, best[shape][1], best[shape][0], {k: v[0] for k, v in best.items()}


def tint_score(arr: np.ndarray, mask: np.ndarray, colour: str | None) -> float:
    """How far the shape's colour is mixed toward white, as a share of the style's mix: 0 for the read colour
    itself, 1 for its pastel. Mixing toward white raises a pixel's smallest channel, and a hue error (a sample's
    orange read as red, a cyan blob with green in it) barely moves it, so the score is that channel's rise above
    the read colour's smallest channel, over the pastel's rise: the median over the shape's inner pixels (the
    mask eroded by 3 px, so the edge, blurred toward the background, is not counted; the whole mask if that
    leaves fewer than 12). 0.5 is the midpoint, where a pixel is as near the pastel as the pure colour."""
    if colour is None:
        return 0.0
    inner = _erode(mask, 3)
    pixels = arr[inner if inner.sum() >= 12 else mask]
    lo, hi = min(world.COLOURS[colour]), min(world.PASTELS[colour])
    return float(np.median((pixels.min(-1) - lo) / (hi - lo)))


def _erode(mask: np.ndarray, r: int) -> np.ndarray:
    out = mask.copy()
    for _ in range(r):
        out[1:] &= mask[:-1]
        out[:-1] &= mask[1:]
        out[:, 1:] &= mask[:, :-1]
        out[:, :-1] &= mask[:, 1:]
        mask = out.copy()
    return out


def character_score(arr: np.ndarray, mask: np.ndarray) -> float:
    """>= 1 when the character's head colour and body colour each cover CHARACTER_SHARE of the
    foreground and the head sits above the body; the smaller share / CHARACTER_SHARE otherwise (0 if
    the head is not above)."""
    idx, dist = _nearest(arr, world.COLOURS)
    names = list(world.COLOURS)
    head = mask & (idx == names.index(world.CHARACTER_HEAD)) & (dist < COLOUR_DISTANCE)
    body = mask & (idx == names.index(world.CHARACTER_BODY)) & (dist < COLOUR_DISTANCE)
    total = max(1, mask.sum())
    if head.sum() == 0 or body.sum() == 0 or np.nonzero(head)[0].mean() >= np.nonzero(body)[0].mean():
        return 0.0
    return float(min(head.sum(), body.sum()) / total / CHARACTER_SHARE)


def read(image) -> Reading:
    """Read one RGB image (PIL or array)."""
    raw = as_array(image)
    arr = np.asarray(Image.fromarray(raw.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0)), dtype=np.float32)
    background, bg = _background(arr)
    mask = np.linalg.norm(arr - bg, axis=-1) > FG_DISTANCE
    share = float(mask.mean())
    if mask.sum() < 10:
        return Reading(background, None, None, None, None, 0.0, 0.0, 0.0, share)
    ys, xs = np.nonzero(mask)
    cx, cy = xs.mean(), ys.mean()
    shape, size, iou, _ = _match_shape(mask, cx, cy)
    px = arr.shape[0]
    colour = _colour(arr, mask)
    return Reading(background=background, colour=colour, position=_cell(cx / px, cy / px),
                   size=size, shape=shape, shape_iou=iou, tint_score=tint_score(arr, mask, colour),
                   character_score=character_score(arr, mask), foreground_share=share)


def attributes_match(reading: Reading, scene: world.Scene) -> dict[str, bool]:
    """Per attribute: does the reading agree with the scene the prompt asked for? (A character scene has
    no colour or base shape to check; an object scene's shape is the cross.)"""
    out = {"background": reading.background == scene.background, "position": reading.position == scene.position,
           "size": reading.size == scene.size}
    if scene.concept != "character":
        out["colour"] = reading.colour == scene.colour
        out["shape"] = reading.shape == scene.shape
    return out


def image_error(sample, expected) -> float:
    """Mean absolute RGB error between two images, 0..1 (both read at READ_PX, lightly blurred so a
    sample's grain is not counted as error)."""
    def prep(im):
        a = as_array(im)
        return np.asarray(Image.fromarray(a.astype(np.uint8)).filter(ImageFilter.GaussianBlur(1.0)), np.float32)
    return float(np.abs(prep(sample) - prep(expected)).mean() / 255.0)
