"""Captions: read (bounded), the trigger put first, cut to what the text encoder takes, tag shuffles.

klein's reference pipelines encode at most 512 tokens of a prompt (diffusers' Flux2 pipelines,
`max_sequence_length=512`); ComfyUI's tokenizer takes any length, and a caption of thousands of
tokens costs memory quadratic in its length in every attention layer of the text encoder. So a
longer caption is cut at 512 tokens, naming the file, and a file far larger than any caption is
refused before it is read whole.

The tag helpers are pure functions of a string and a seeded `random.Random`, so a run is
reproducible and the variants (and their cache entries) are the same every run.
"""
from __future__ import annotations

import logging
import math
import random
import re
from functools import lru_cache
from pathlib import Path

MAX_TOKENS = 512  # what the reference pipelines encode
MAX_CAPTION_BYTES = 64 * 1024  # 512 tokens are a few KB in any script; a larger file is not a caption
SHUFFLE_VARIANTS = 4  # tag-shuffled encodings kept per caption (the caption as written + up to 3 shuffles)


def has_trigger(caption: str, trigger: str) -> bool:
    return re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, flags=re.IGNORECASE) is not None


def with_trigger(caption: str, trigger: str) -> str:
    caption = caption.strip()
    if not trigger or has_trigger(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


class CaptionTooLarge(ValueError):
    """A caption file far larger than any caption: refused before it is read whole."""


def read_caption(path: Path) -> str:
    """The caption text; a clear error for a file that is not UTF-8 or far too large to be a caption."""
    with open(path, "rb") as f:
        raw = f.read(MAX_CAPTION_BYTES + 1)
    if len(raw) > MAX_CAPTION_BYTES:
        size = Path(path).stat().st_size
        raise CaptionTooLarge(f"caption {path} is {size:,} bytes, more than a caption can be ({MAX_CAPTION_BYTES:,}; the "
                         f"text encoder reads {MAX_TOKENS} tokens, a few KB): is it the right file? Shorten it to a "
                         "few sentences.")
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"caption {path} is not UTF-8 text ({e.reason} at byte {e.start}): re-save it as UTF-8.") from e


@lru_cache(maxsize=1)
def _comfy_tokenizer():
    """klein's tokenizer (Qwen) from the files ComfyUI ships; None where ComfyUI cannot be imported (not booted)."""
    try:
        from comfy.text_encoders.flux import Qwen3Tokenizer

        return Qwen3Tokenizer().tokenizer
    except Exception:  # noqa: BLE001 - ImportError, or ComfyUI failing to start outside a booted process
        logging.debug("Klein dataset: no klein tokenizer to count caption tokens with", exc_info=True)
        return None


def encoder_tokenizer(clip):
    """The Hugging Face tokenizer behind a ComfyUI CLIP (klein: Qwen), or None."""
    outer = getattr(clip, "tokenizer", None)
    inner = getattr(outer, getattr(outer, "clip", ""), None)
    return getattr(inner, "tokenizer", None)


def fit_caption(caption: str, tokenizer=None, limit: int = MAX_TOKENS) -> tuple[str, int]:
    """(caption cut to `limit` tokens, its token count before the cut, 0 when not counted); unchanged when it fits.

    `tokenizer` None: ComfyUI's klein tokenizer, loaded only when a caption is long enough to need it.
    """
    if len(caption.encode("utf-8")) <= limit:  # every token is at least one byte
        return caption, 0
    tokenizer = tokenizer if tokenizer is not None else _comfy_tokenizer()
    if tokenizer is None:
        return caption, 0
    ids = tokenizer(caption, add_special_tokens=False)["input_ids"]
    if len(ids) <= limit:
        return caption, len(ids)
    return tokenizer.decode(ids[:limit]).strip(), len(ids)


def cut_note(name: str, tokens: int, limit: int = MAX_TOKENS) -> str:
    return (f"{name}: the caption has {tokens} tokens and is cut to the text encoder's {limit} (as klein's "
            "reference pipelines): shorten it, or put what matters first.")


# ---------------------------------------------------------------- tags


def split_tags(caption: str) -> list[str]:
    return [t.strip() for t in caption.split(",") if t.strip()]


def shuffle_tags(caption: str, trigger: str, rng: random.Random) -> str:
    """The comma-separated tags in random order, the trigger's tag first (added when missing).

    Shuffling stops the model tying meaning to tag position; the trigger stays first so it keeps
    one position and binds to the concept.
    """
    tags = split_tags(caption)
    if not trigger:
        rng.shuffle(tags)
        return ", ".join(tags)
    first = [t for t in tags if has_trigger(t, trigger)] or [trigger]
    rest = [t for t in tags if not has_trigger(t, trigger)]
    rng.shuffle(rest)
    return ", ".join(first + rest)


def caption_variants(caption: str, trigger: str, count: int = SHUFFLE_VARIANTS) -> list[str]:
    """The caption as written plus up to count-1 distinct tag shuffles (trigger tag first), seeded by the caption.

    Seeding by the caption text makes the variants, and so their cache entries, the same every run.
    """
    out = [caption]
    rng = random.Random(caption)
    tries = 0
    while len(out) < min(count, math.factorial(max(1, len(split_tags(caption))))) and tries < 8 * count:
        v = shuffle_tags(caption, trigger, rng)
        if v not in out:
            out.append(v)
        tries += 1
    return out
