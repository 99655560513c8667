"""A procedural micro world whose ground truth is known: shapes of named colours on plain backgrounds.

A scene is a handful of attributes (shape, colour, position in a 3x3 grid, size, background), rendered
by a pure function and captioned from the same attributes, so every sample a model makes can be read
back and graded (microworld/reader.py). Four concepts never appear in pretraining, one per workshop
recipe, each named by a nonsense trigger word:

- style      "qzv":  a pastel palette: the shape's colour mixed 40% toward white ("... in qzv style")
- object     "zqx":  a new shape, a plus-shaped cross ("a large red zqx at ...")
- character  "kwyx": a fixed two-part figure, a yellow round head on a purple body
- transform  "xjv":  image-to-image, the shape's colour swapped for its complement (background kept)

The attribute combinations are split once, by a fixed seed, into pretraining and held-out ones
(1 in 8 held out, so every attribute value and most pairs of values are still seen in pretraining);
flexibility is measured on the held-out prompts. Pure numpy/PIL, deterministic by seed.

Why the style is a palette (it was diagonal stripes of an 18 px period before): the micro base
draws colour, position and background well (94% / 97% / 94% on held-out prompts) but no detail below a
latent token (16 x 16 px; shape 28%), and a stripe texture lives exactly there, so it was never learned
(at most 41% of triggered prompts after 800 H200 steps, none at CPU sizes). A colour grade is what this
model can draw, and still a style in the workshop's sense: it changes how every subject looks, not what
the prompt asks for. The colour *name* stays readable (a pastel red is still red), so flexibility
(colour, position, size, background follow the prompt) is measured as before. The tint, 40% toward
white, is the largest in steps of 5% that keeps every pastel shape clearly off every background: at
least 59.5 RGB (orange on beige; 45% would give 49 against the reader's foreground line of 48), while
the 16 colours (8 pure, 8 pastel) stay at least 59 apart (pastel orange / pastel yellow; pink and its
pastel 60); tests/test_microworld.py checks all 8 x 6 pairs. Whether a LoRA learns it on the CPU is
measured in docs/quality.md ("The style concept on the CPU").
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# well separated saturated colours for shapes (min pairwise RGB distance ~ 110)
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30), "orange": (245, 140, 0), "yellow": (240, 230, 40), "green": (30, 170, 50),
    "cyan": (40, 210, 230), "blue": (30, 60, 220), "purple": (140, 40, 200), "pink": (250, 120, 190),
}
# backgrounds have names of their own, so no caption says "blue" twice and no shape matches its background
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 240), "black": (20, 20, 25), "grey": (128, 128, 128),
    "beige": (215, 195, 150), "navy": (20, 30, 80), "olive": (110, 110, 40),
}
SHAPES = ("circle", "square", "triangle", "diamond")
POSITIONS = ("top left", "top center", "top right", "middle left", "center", "middle right",
             "bottom left", "bottom center", "bottom right")
SIZES = ("small", "large")

OBJECT_SHAPE = "cross"  # the object concept's new shape: never drawn in pretraining
CHARACTER_SHAPE = "character"  # the character concept's composite
CHARACTER_HEAD, CHARACTER_BODY = "yellow", "purple"  # its fixed colours (an identity, not a prompt choice)
COMPLEMENT = {"red": "cyan", "cyan": "red", "orange": "blue", "blue": "orange",
              "yellow": "purple", "purple": "yellow", "green": "pink", "pink": "green"}

# cell centres and half-extents as fractions of the image side
CELL_CENTRES = (0.2, 0.5, 0.8)
HALF_EXTENT = {"small": 0.12, "large": 0.18}
SUPERSAMPLE = 4
HELDOUT_SEED, HELDOUT_EVERY = 16, 8


@dataclass(frozen=True)
class Concept:
    name: str
    trigger: str
    recipe: str  # the workshop recipe it stands for
    what: str


CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    Concept("style", "qzv", "style", "a pastel palette: the shape's colour mixed 40% toward white"),
    Concept("object", "zqx", "object", f"a new shape: a plus-shaped {OBJECT_SHAPE}"),
    Concept("character", "kwyx", "character", "a fixed figure: a yellow round head on a purple body"),
    Concept("transform", "xjv", "image-to-image", "the shape's colour swapped for its complement"),
)}


@dataclass(frozen=True)
class Scene:
    """One picture's attributes. `concept` is None (the base world), "style", "object" or "character".

    An object scene has shape == OBJECT_SHAPE; a character scene has shape == CHARACTER_SHAPE and no
    colour (its colours are fixed). The transform concept is a mapping of scenes (transformed()).
    """
    shape: str
    colour: str | None
    position: str
    size: str
    background: str
    concept: str | None = None

    def __post_init__(self):
        want_shape = {None: SHAPES, "style": SHAPES, "object": (OBJECT_SHAPE,), "character": (CHARACTER_SHAPE,)}
        if self.concept not in want_shape:
            raise ValueError(f"Scene.concept {self.concept!r}: use None, 'style', 'object' or 'character'")
        if self.shape not in want_shape[self.concept]:
            raise ValueError(f"Scene.shape {self.shape!r} with concept {self.concept!r}: use one of "
                             f"{want_shape[self.concept]}")
        if (self.colour is None) != (self.concept == "character"):
            raise ValueError(f"Scene.colour {self.colour!r}: a character scene has None, any other one of {list(COLOURS)}")
        if self.colour is not None and self.colour not in COLOURS:
            raise ValueError(f"Scene.colour {self.colour!r}: use one of {list(COLOURS)}")
        for field, allowed in (("position", POSITIONS), ("size", SIZES), ("background", BACKGROUNDS)):
            if getattr(self, field) not in allowed:
                raise ValueError(f"Scene.{field} {getattr(self, field)!r}: use one of {list(allowed)}")


def with_concept(scene: Scene, concept: str | None) -> Scene:
    """The same scene carrying `concept` (the object/character replace the shape; the style keeps it)."""
    if concept in (None, "style"):
        return replace(scene, concept=concept)
    if concept == "object":
        return replace(scene, shape=OBJECT_SHAPE, concept="object")
    if concept == "character":
        return replace(scene, shape=CHARACTER_SHAPE, colour=None, concept="character")
    raise ValueError(f"concept {concept!r}: use None, 'style', 'object' or 'character' (the transform is transformed())")


def transformed(scene: Scene) -> Scene:
    """The held-out image-to-image transform: the shape's colour swapped for its complement."""
    if scene.colour is None:
        raise ValueError("the colour swap needs a scene with a colour (not a character scene)")
    return replace(scene, colour=COMPLEMENT[scene.colour])


# ---------------------------------------------------------------------------------------------- captions
def _where(position: str) -> str:
    return "in the center" if position == "center" else f"at the {position}"


def caption(scene: Scene) -> str:
    """The prompt for a scene, written from its attributes, with the concept's trigger where it has one."""
    article = "an" if scene.background[0] in "aeiou" else "a"
    tail = f"{_where(scene.position)} on {article} {scene.background} background"
    if scene.concept == "character":
        return f"a {scene.size} {CONCEPTS['character'].trigger} {tail}"
    noun = CONCEPTS["object"].trigger if scene.concept == "object" else scene.shape
    text = f"a {scene.size} {scene.colour} {noun} {tail}"
    return f"{text}, in {CONCEPTS['style'].trigger} style" if scene.concept == "style" else text


_CONSONANTS, _VOWELS = "bcdfghjklmnpqrstvwxz", "aeiouy"
NOISE_FORMS = ("style", "adjective", "noun", "tail")  # where a nonsense word goes in a noisy caption


_TAKEN_WORDS = frozenset({c.trigger for c in CONCEPTS.values()} | set(" ".join(
    [*COLOURS, *BACKGROUNDS, *SHAPES, *POSITIONS, *SIZES, OBJECT_SHAPE, "in", "on", "at", "the", "style"]).split()))


def nonsense_word(rng: np.random.Generator) -> str:
    """A made-up word of 3-5 letters (no concept's trigger, no word of the world's captions)."""
    while True:
        n = int(rng.integers(3, 6))
        word = "".join(rng.choice(list(_VOWELS if i % 3 == 1 and rng.random() < 0.5 else _CONSONANTS))
                       for i in range(n))
        if word not in _TAKEN_WORDS:
            return word


def noisy_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The scene's caption with one made-up word where the concepts' triggers go, the picture unchanged.

    Pretraining on a share of these teaches the base what klein knows from its web-scale captions: an
    unknown word is not an instruction. Without them the micro base's prompt-following halves on any unseen
    word (measured: mean attribute accuracy 0.74 -> 0.42 with ", in qzv style"), so a LoRA has to repair the
    base before it can learn its concept. Forms: ", in W style" (the style trigger's slot), "a large red W
    circle" (an extra word), "a large red W at ..." (the object's slot: the noun replaced, the shape still
    drawn) and a trailing ", W".
    """
    if scene.concept is not None:
        raise ValueError("noisy_caption is for base scenes (concept None): concept captions carry their trigger")
    word, form = nonsense_word(rng), NOISE_FORMS[int(rng.integers(len(NOISE_FORMS)))]
    text = caption(scene)
    if form == "style":
        return f"{text}, in {word} style"
    if form == "tail":
        return f"{text}, {word}"
    head = f"a {scene.size} {scene.colour} "
    rest = text[len(head) + len(scene.shape):]
    return head + (f"{word} {scene.shape}" if form == "adjective" else word) + rest


def untriggered(scene: Scene) -> Scene:
    """The base scene a triggered prompt stands for without its trigger (the leakage prompt)."""
    if scene.concept == "character":
        return replace(scene, shape=SHAPES[0], colour=CHARACTER_BODY, concept=None)
    if scene.concept == "object":
        return replace(scene, shape=SHAPES[0], concept=None)
    return replace(scene, concept=None)


# ---------------------------------------------------------------------------------------------- geometry
def centre_of(position: str) -> tuple[float, float]:
    """(x, y) of a grid cell's centre, as fractions of the side."""
    i = POSITIONS.index(position)
    return CELL_CENTRES[i % 3], CELL_CENTRES[i // 3]


def shape_polygon(shape: str, cx: float, cy: float, h: float) -> list[tuple[float, float]] | None:
    """The outline of a polygonal shape in a 2h box centred at (cx, cy); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        s = 0.9 * h
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - h), (cx + h, cy), (cx, cy + h), (cx - h, cy)]
    if shape == OBJECT_SHAPE:
        a = 0.36 * h  # half-width of the arms
        return [(cx - a, cy - h), (cx + a, cy - h), (cx + a, cy - a), (cx + h, cy - a), (cx + h, cy + a),
                (cx + a, cy + a), (cx + a, cy + h), (cx - a, cy + h), (cx - a, cy + a), (cx - h, cy + a),
                (cx - h, cy - a), (cx - a, cy - a)]
    raise ValueError(f"shape {shape!r}: use one of {SHAPES + (OBJECT_SHAPE,)}")


def shape_mask(shape: str, cx: float, cy: float, h: float, side: int) -> np.ndarray:
    """A boolean mask (side x side) of a shape; coordinates are pixels. Also the reader's templates."""
    im = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(im)
    poly = shape_polygon(shape, cx, cy, h)
    if poly is None:
        draw.ellipse([cx - h, cy - h, cx + h, cy + h], fill=255)
    else:
        draw.polygon(poly, fill=255)
    return np.asarray(im) > 127


TINT_TARGET, TINT_AMOUNT = (255, 255, 255), 0.4  # the style's palette: every colour mixed 40% toward white


def tinted(rgb: tuple[int, int, int]) -> tuple[int, int, int]:
    """A colour in the style's pastel palette (mixed TINT_AMOUNT of the way toward TINT_TARGET)."""
    return tuple(int(round(c + TINT_AMOUNT * (t - c))) for c, t in zip(rgb, TINT_TARGET, strict=True))


PASTELS: dict[str, tuple[int, int, int]] = {name: tinted(rgb) for name, rgb in COLOURS.items()}


def shape_colour(scene: Scene) -> tuple[int, int, int]:
    """The RGB a (non-character) scene paints its shape in: the named colour, or its pastel with the style."""
    return PASTELS[scene.colour] if scene.concept == "style" else COLOURS[scene.colour]


# ---------------------------------------------------------------------------------------------- rendering
def render(scene: Scene, px: int = 128) -> Image.Image:
    """The scene as an RGB image of px x px (antialiased by supersampling; a pure function of the scene)."""
    side = px * SUPERSAMPLE
    img = np.empty((side, side, 3), dtype=np.uint8)
    img[:] = BACKGROUNDS[scene.background]
    fx, fy = centre_of(scene.position)
    cx, cy, h = fx * side, fy * side, HALF_EXTENT[scene.size] * side
    if scene.concept == "character":
        _draw_character(img, cx, cy, h)
    else:
        img[shape_mask(scene.shape, cx, cy, h, side)] = shape_colour(scene)
    return Image.fromarray(img, "RGB").resize((px, px), Image.Resampling.BOX)


def _draw_character(img: np.ndarray, cx: float, cy: float, h: float) -> None:
    """The character: a round head (upper part of the box) on a wider rounded body (lower part)."""
    side = img.shape[0]
    head = shape_mask("circle", cx, cy - 0.55 * h, 0.42 * h, side)
    body = Image.new("L", (side, side), 0)
    ImageDraw.Draw(body).rounded_rectangle([cx - 0.8 * h, cy - 0.05 * h, cx + 0.8 * h, cy + h],
                                           radius=0.3 * h, fill=255)
    img[np.asarray(body) > 127] = COLOURS[CHARACTER_BODY]
    img[head] = COLOURS[CHARACTER_HEAD]


# ---------------------------------------------------------------------------------------------- the split
def all_combinations() -> list[Scene]:
    """Every base scene (shape x colour x position x size x background): 4 x 8 x 9 x 2 x 6 = 3456."""
    return [Scene(s, c, p, z, b) for s, c, p, z, b in itertools.product(SHAPES, COLOURS, POSITIONS, SIZES, BACKGROUNDS)]


def _split() -> tuple[list[Scene], list[Scene]]:
    combos = all_combinations()
    order = np.random.default_rng(HELDOUT_SEED).permutation(len(combos))
    held = {int(i) for i in order[: len(combos) // HELDOUT_EVERY]}
    return ([c for i, c in enumerate(combos) if i not in held], [c for i, c in enumerate(combos) if i in held])


PRETRAINING_COMBOS, HELDOUT_COMBOS = _split()  # 3024 and 432


def _sample(pool: list[Scene], seed: int, n: int) -> list[Scene]:
    """n scenes of `pool`, without repeats while the pool lasts (then with), seeded."""
    rng = np.random.default_rng(seed)
    reps = -(-n // len(pool))
    idx = np.concatenate([rng.permutation(len(pool)) for _ in range(reps)])[:n]
    return [pool[int(i)] for i in idx]


def pretraining_scenes(seed: int, n: int) -> list[Scene]:
    """n base scenes (no concept) drawn from the pretraining combinations."""
    return _sample(PRETRAINING_COMBOS, seed, n)


def heldout_scenes(seed: int, n: int) -> list[Scene]:
    """n base scenes from the held-out combinations (never in pretraining), distinct while n <= 432."""
    return _sample(HELDOUT_COMBOS, seed, n)


def autoencoder_scenes(seed: int, n: int) -> list[Scene]:
    """Scenes for training the VAE: every look of the world, concepts included (a quarter of them).

    The VAE is a codec, like klein's, which was trained on all kinds of images: it must reproduce a
    pastel shape or a cross so that a LoRA can learn them. What a concept *means* is for the diffusion
    model to learn, and it never sees one in pretraining (pretraining_scenes/edit_pairs have none).
    """
    rng = np.random.default_rng(seed)
    scenes = _sample(all_combinations(), seed, n)
    kinds = rng.choice([None, None, None, None, None, "style", "object", "character"], size=n)
    return [with_concept(s, None if k is None else str(k)) for s, k in zip(scenes, kinds, strict=True)]


# ---------------------------------------------------------------------------------------------- edits
EDIT_KINDS = ("identity", "recolour", "background", "move")
TRANSFORM_CAPTION = f"make the shape {CONCEPTS['transform'].trigger}"  # the held-out edit, worded like the others
_PRETRAINING_SET = frozenset(PRETRAINING_COMBOS)


def edit_caption(kind: str, target: Scene) -> str:
    """The instruction for a pretraining edit: it names what the target should be."""
    if kind == "identity":
        return "the same picture"
    if kind == "recolour":
        return f"make the shape {target.colour}"
    if kind == "background":
        return f"change the background to {target.background}"
    if kind == "move":
        return f"move the shape to the {target.position}" if target.position != "center" else \
            "move the shape to the center"
    raise ValueError(f"edit kind {kind!r}: use one of {EDIT_KINDS}")


def _edit_target(ref: Scene, kind: str, rng: np.random.Generator) -> Scene:
    if kind == "identity":
        return ref
    if kind == "recolour":  # never to the complement: that is the held-out transform
        options = [c for c in COLOURS if c not in (ref.colour, COMPLEMENT[ref.colour])]
        return replace(ref, colour=options[int(rng.integers(len(options)))])
    if kind == "background":
        options = [b for b in BACKGROUNDS if b != ref.background]
        return replace(ref, background=options[int(rng.integers(len(options)))])
    options = [p for p in POSITIONS if p != ref.position]
    return replace(ref, position=options[int(rng.integers(len(options)))])


def edit_pairs(seed: int, n: int) -> list[tuple[Scene, Scene, str]]:
    """n pretraining edits (reference scene, target scene, instruction), kinds in equal shares.

    Identity, recolour (never to the complement), new background, move: they teach the base to read a
    reference. Both scenes are pretraining combinations; the held-out colour swap never appears.
    """
    rng = np.random.default_rng(seed)
    refs = iter(_sample(PRETRAINING_COMBOS, seed + 1, 4 * n + 64))
    out: list[tuple[Scene, Scene, str]] = []
    while len(out) < n:
        ref, kind = next(refs), EDIT_KINDS[len(out) % len(EDIT_KINDS)]
        target = _edit_target(ref, kind, rng)
        if target in _PRETRAINING_SET:
            out.append((ref, target, edit_caption(kind, target)))
    return out


# ---------------------------------------------------------------------------------------------- datasets
def concept_scenes(concept: str, seed: int, n: int, heldout: bool = False) -> list[Scene]:
    """n scenes carrying `concept` (style/object/character), varied over the other attributes."""
    base = heldout_scenes(seed, n) if heldout else pretraining_scenes(seed, n)
    return [with_concept(s, concept) for s in base]


def write_dataset(folder: str | Path, concept: str, n: int, seed: int, px: int = 128,
                  plain: int = 0, paired: bool = False) -> tuple[Path, Path | None]:
    """An ordinary dataset folder for `concept`, as a user would make one: NNN.png + NNN.txt captions.

    Style/object/character: the images of n varied pretraining scenes carrying the concept, captioned
    with the trigger. Transform: `folder` holds the targets (colour-swapped) and `<folder>_control` the
    references, matched by name, each target captioned TRANSFORM_CAPTION, as the Dataset Loader reads
    pairs. `plain` > 0 adds that many base-world images with their own captions, without the trigger
    (pNNN.png: regularisation images, DreamBooth's prior preservation: they teach the LoRA to leave untriggered
    prompts alone; load such a folder with an empty trigger, or the loader puts the trigger on them too).
    `paired`: the plain images are the concept images' own scenes without the concept (untriggered()), so a
    caption's trigger and the concept are the only difference within each pair.
    Returns (folder, control folder or None). Files are written atomically.
    """
    from ..trainer.paths import atomic_save_image, atomic_write_text

    if concept not in CONCEPTS:
        raise ValueError(f"concept {concept!r}: use one of {list(CONCEPTS)}")
    folder = Path(folder)
    control = folder.with_name(folder.name + "_control") if concept == "transform" else None
    if plain and concept == "transform":
        raise ValueError("write_dataset: plain (regularisation) images are for style/object/character datasets")
    if paired and plain > n:
        raise ValueError(f"write_dataset: {plain} paired plain images for {n} concept images: pair at most {n}")
    if concept == "transform":
        rows = [(render(transformed(s), px), TRANSFORM_CAPTION, render(s, px)) for s in pretraining_scenes(seed, n)]
        plain_scenes = []
    else:
        scenes = concept_scenes(concept, seed, n)
        rows = [(render(s, px), caption(s), None) for s in scenes]
        plain_scenes = ([untriggered(s) for s in scenes[:plain]] if paired
                        else pretraining_scenes(seed + 500, plain) if plain else [])
    names = [f"{i:03d}" for i in range(len(rows))] + [f"p{i:03d}" for i in range(len(plain_scenes))]
    rows += [(render(s, px), caption(s), None) for s in plain_scenes]
    for stem, (image, text, reference) in zip(names, rows, strict=True):
        atomic_save_image(image, folder / f"{stem}.png")
        atomic_write_text(text, folder / f"{stem}.txt")
        if reference is not None:
            atomic_save_image(reference, control / f"{stem}.png")
    return folder, control
