"""Ground-truth metrics over a set of samples, from the reader (every number recomputable from images).

For a concept LoRA (style / object / character), prompts come in pairs on held-out scenes: the
triggered prompt (caption of the concept scene) and the same prompt without its trigger (the base
scene it stands for).
  strength     share of triggered samples in which the reader finds the concept
  leakage      share of untriggered samples in which it finds the concept anyway
  flexibility  attribute accuracy of the triggered samples: they still follow the prompt's other
               attributes (position, size, background; colour and shape where the concept keeps them)
  base_accuracy the same accuracy on the untriggered samples (what the prompt alone gets)
For an image-to-image LoRA, on held-out references: the transform error (mean absolute error to the
expected target) against two baselines a LoRA must beat to have learned anything: returning the
reference unchanged (identity) and returning the mean of the training targets (mean target).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from . import reader, world


@dataclass(frozen=True)
class ConceptScore:
    concept: str
    n: int
    strength: float
    leakage: float
    flexibility: float
    base_accuracy: float
    per_attribute: dict[str, float]  # triggered samples' accuracy per attribute

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class TransformScore:
    n: int
    error: float
    identity_error: float
    mean_target_error: float
    colour_accuracy: float  # the reader finds the swapped colour
    kept_accuracy: float  # ... and the reference's shape, position and background are kept
    per_attribute: dict = field(default_factory=dict)  # each attribute of the expected target alone (colour: swapped)

    def as_dict(self) -> dict:
        return asdict(self)


def attribute_accuracy(readings: list[reader.Reading], scenes: list[world.Scene]) -> dict[str, float]:
    """Per attribute, the share of readings agreeing with their scene (attributes the scenes define)."""
    hits: dict[str, list[bool]] = {}
    for rd, scene in zip(readings, scenes, strict=True):
        for k, ok in reader.attributes_match(rd, scene).items():
            hits.setdefault(k, []).append(ok)
    return {k: float(np.mean(v)) for k, v in sorted(hits.items())}


def _mean_accuracy(per: dict[str, float]) -> float:
    return float(np.mean(list(per.values()))) if per else 0.0


def score_concept(concept: str, triggered: list[tuple[world.Scene, object]],
                  untriggered: list[tuple[world.Scene, object]]) -> ConceptScore:
    """Score (scene, image) samples of triggered and untriggered prompts for `concept`."""
    if concept not in ("style", "object", "character"):
        raise ValueError(f"concept {concept!r}: score_concept scores 'style', 'object' or 'character'")
    if not triggered or not untriggered:
        raise ValueError("score_concept needs triggered and untriggered samples (got an empty list)")
    t_read = [reader.read(im) for _, im in triggered]
    u_read = [reader.read(im) for _, im in untriggered]
    per = attribute_accuracy(t_read, [s for s, _ in triggered])
    base = attribute_accuracy(u_read, [s for s, _ in untriggered])
    return ConceptScore(concept=concept, n=len(triggered),
                        strength=float(np.mean([r.concept_present(concept) for r in t_read])),
                        leakage=float(np.mean([r.concept_present(concept) for r in u_read])),
                        flexibility=_mean_accuracy(per), base_accuracy=_mean_accuracy(base), per_attribute=per)


def mean_image(images: list) -> np.ndarray:
    """The pixel mean of images (read at the reader's size): the mean-target baseline."""
    return np.mean([reader.as_array(im) for im in images], axis=0)


def score_transform(samples: list, references: list[world.Scene], train_targets: list) -> TransformScore:
    """Score image-to-image samples, one per held-out reference scene, against world.transformed(ref)."""
    if not samples or len(samples) != len(references):
        raise ValueError(f"score_transform needs one sample per reference (got {len(samples)} samples for "
                         f"{len(references)} references)")
    expected = [world.transformed(s) for s in references]
    wanted = [world.render(s) for s in expected]
    mean_target = mean_image(train_targets)
    readings = [reader.read(im) for im in samples]
    colour_ok = [rd.colour == e.colour for rd, e in zip(readings, expected, strict=True)]
    kept = [ok and rd.shape == e.shape and rd.position == e.position and rd.background == e.background
            for ok, rd, e in zip(colour_ok, readings, expected, strict=True)]
    return TransformScore(
        n=len(samples),
        error=float(np.mean([reader.image_error(im, w) for im, w in zip(samples, wanted, strict=True)])),
        identity_error=float(np.mean([reader.image_error(world.render(r), w)
                                      for r, w in zip(references, wanted, strict=True)])),
        mean_target_error=float(np.mean([reader.image_error(mean_target, w) for w in wanted])),
        colour_accuracy=float(np.mean(colour_ok)), kept_accuracy=float(np.mean(kept)),
        per_attribute=attribute_accuracy(readings, expected))
