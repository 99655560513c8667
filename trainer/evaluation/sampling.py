"""Validate with prompts, not just loss: sample a fixed prompt suite from each checkpoint.

klein Base samples with 50 steps, CFG 4.0 and an empty negative on FLUX.2's resolution-dependent
schedule (ComfyUI's Flux2Scheduler: comfy_extras.nodes_flux.get_schedule). Sampling goes through
ComfyUI's own machinery (comfy.sample.sample_custom with the `euler` sampler object) so a grid cell is
the image a user's KSampler graph would give. Every cell uses the same seed: rows differ only by the
prompt, columns only by the checkpoint, so any change between cells is the LoRA's doing.

The default suite follows the seed workshop: a woman portrait, a mountain landscape, a man portrait and
one other subject, each with and without the trigger (the untriggered rows show leakage).
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..lora.formats import read_lora_file as read_lora  # noqa: F401 - the nodes' name for it
from ..model import attention

BASE_STEPS = 50
BASE_CFG = 4.0
PREVIEW_STEPS = 8
LATENT_CHANNELS = 128
LATENT_SCALE = 16
BASE_LABEL = "base (no LoRA)"

DEFAULT_SUBJECTS: tuple[tuple[str, str], ...] = (
    ("woman", "a cinematic portrait photo of a woman, soft window light"),
    ("mountains", "a mountain landscape at sunrise, wide view"),
    ("man", "a portrait photo of a man outdoors"),
    ("other", "a red vintage car parked on a city street"),
)


@dataclass(frozen=True)
class SuitePrompt:
    """One row of the grid."""

    label: str  # short row label, e.g. "woman + trigger"
    subject: str  # the subject's key: the triggered and untriggered rows of one subject share it
    text: str
    triggered: bool


@dataclass
class SampleSettings:
    steps: int = BASE_STEPS
    cfg: float = BASE_CFG
    seed: int = 0
    width: int = 1024
    height: int = 1024
    sampler: str = "euler"

    def validate(self) -> None:
        for name in ("width", "height"):
            v = getattr(self, name)
            if v < 16 or v % 16:
                raise ValueError(f"sample {name} {v} is not a multiple of 16 (klein's latent is 16x smaller): "
                                 f"use {max(16, v // 16 * 16)} or {v // 16 * 16 + 16}.")
        if self.steps < 1:
            raise ValueError(f"sample steps is {self.steps}: use 1 or more (klein Base: 50, preview: {PREVIEW_STEPS}).")


def parse_subjects(text: str) -> list[tuple[str, str]]:
    """User prompts, one per line (`label: prompt` or just the prompt); empty means the default suite."""
    subjects = []
    for i, line in enumerate(ln.strip() for ln in (text or "").splitlines()):
        if not line or line.startswith("#"):
            continue
        label, sep, prompt = line.partition(":")
        if sep and label.strip() and len(label.strip()) <= 24 and prompt.strip():
            subjects.append((label.strip(), prompt.strip()))
        else:
            subjects.append((f"prompt {i + 1}", line))
    return subjects or list(DEFAULT_SUBJECTS)


def prompt_suite(trigger: str, subjects: Sequence[tuple[str, str]] | None = None,
                 untriggered: bool = True) -> list[SuitePrompt]:
    """Each subject with the trigger first (as the captions have it) and, when asked, without it."""
    from ..data.captions import with_trigger

    rows = []
    for label, text in subjects or DEFAULT_SUBJECTS:
        rows.append(SuitePrompt(f"{label} + {trigger}" if trigger else label, label, with_trigger(text, trigger), True))
        if untriggered and trigger:
            rows.append(SuitePrompt(f"{label}, no trigger", label, text, False))
    return rows


def flux2_sigmas(steps: int, width: int, height: int) -> torch.Tensor:
    """FLUX.2's schedule for this image size, exactly as ComfyUI's Flux2Scheduler node computes it."""
    from comfy_extras.nodes_flux import get_schedule

    return get_schedule(steps, round(width * height / (LATENT_SCALE * LATENT_SCALE)))


def encode_prompts(clip, prompts: Sequence[SuitePrompt]) -> tuple[list, list]:
    """(positive conditionings in suite order, the empty negative): encoded once, reused for every checkpoint."""
    cache: dict[str, list] = {}
    for p in prompts:
        if p.text not in cache:
            cache[p.text] = clip.encode_from_tokens_scheduled(clip.tokenize(p.text))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    return [cache[p.text] for p in prompts], negative


def sample_latents(model, positives: Sequence, negative, settings: SampleSettings,
                   on_cell: Callable[[int], None] | None = None) -> list[torch.Tensor]:
    """One latent (C, h, w) per conditioning, all from the same seed, through comfy.sample.sample_custom, with
    attention on the card's fastest backend (trainer/model/attention.py; the trainer's own choice)."""
    import comfy.sample
    import comfy.samplers

    settings.validate()
    sigmas = flux2_sigmas(settings.steps, settings.width, settings.height)
    sampler = comfy.samplers.sampler_object(settings.sampler)
    empty = torch.zeros(1, LATENT_CHANNELS, settings.height // LATENT_SCALE, settings.width // LATENT_SCALE)
    latent = comfy.sample.fix_empty_latent_channels(model, empty)
    noise = comfy.sample.prepare_noise(latent, settings.seed)
    out = []
    with attention.run_attention(model.model.diffusion_model, model.load_device, model.model.get_dtype_inference()):
        for i, positive in enumerate(positives):
            s = comfy.sample.sample_custom(model, noise, settings.cfg, sampler, sigmas, positive, negative, latent,
                                           disable_pbar=True, seed=settings.seed)
            out.append(s[0].detach().to("cpu", torch.float32))
            if on_cell is not None:
                on_cell(i)
    return out


def decode(vae, latents: Sequence[torch.Tensor]) -> torch.Tensor:
    """IMAGE tensor (N, H, W, 3) in [0, 1] through the given VAE."""
    images = [vae.decode(lat[None]).to("cpu", torch.float32)[:1] for lat in latents]
    return torch.cat(images)[..., :3].clamp(0, 1)


def to_pil(image: torch.Tensor):
    """One (H, W, 3) float image in [0, 1] as a PIL image."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((image.clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))


def to_image_tensor(pil) -> torch.Tensor:
    """A PIL image as a ComfyUI IMAGE batch of one: (1, H, W, 3) float in [0, 1]."""
    import numpy as np

    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


@dataclass
class Column:
    """One checkpoint's samples: latents (for the metrics) and decoded images, in suite order."""

    label: str
    path: str | None
    step: int | None
    latents: list[torch.Tensor]
    images: torch.Tensor
    meta: dict[str, str] = field(default_factory=dict)


def report_path_within(report: Path, roots: Sequence[Path], fallback_dir: Path) -> Path:
    """Where an evaluation report may be written: `report` when it lies inside `roots` once links are
    resolved (a LoRA linked in from elsewhere resolves outside), else the same name in `fallback_dir`.

    The Checkpoint Sampler writes `<run>_eval.json` beside the LoRA; this keeps that write inside
    ComfyUI's models/ and output/ folders whatever the LoRA file links to.
    """
    import os

    from ..paths import is_within

    real = Path(os.path.realpath(report))
    if any(is_within(real, Path(os.path.realpath(r))) for r in roots):
        return real
    target = Path(fallback_dir) / Path(report).name
    logging.info("Klein eval: %s is outside ComfyUI's folders (a linked LoRA); the report goes to %s", real, target)
    return target


def lora_step(path: Path, meta: dict[str, str] | None = None) -> int | None:
    """The training step of a checkpoint: `_stepNNNNN` in its name, else the `steps` metadata."""
    from ..training.run_files import parse_step

    if (parsed := parse_step(Path(path).name)) is not None:
        return parsed[1]
    try:
        return int((meta or {}).get("steps", ""))
    except ValueError:
        return None


@torch.no_grad()  # never differentiated; outside the executor's inference mode a GPU-moved VAE would fail otherwise
def sample_column(model, clip_conds: tuple[list, list], vae, settings: SampleSettings, label: str,
                  path: str | None = None, step: int | None = None, meta: dict[str, str] | None = None,
                  on_cell: Callable[[int], None] | None = None) -> Column:
    positives, negative = clip_conds
    latents = sample_latents(model, positives, negative, settings, on_cell)
    return Column(label, path, step, latents, decode(vae, latents), meta or {})


def sample_checkpoints(base_model, clip, vae, checkpoints: Sequence[Path], prompts: Sequence[SuitePrompt],
                       settings: SampleSettings, include_base: bool = True, strength: float = 1.0,
                       progress: Callable[[int, int], None] | None = None) -> list[Column]:
    """The base model's column first (the reference for every metric), then one column per checkpoint.

    Each checkpoint is applied with ComfyUI's stock comfy.sd.load_lora_for_models (as Load LoRA does),
    so the images are what the user will get from the file.
    """
    import comfy.sd

    conds = encode_prompts(clip, prompts)
    total = (len(checkpoints) + int(include_base)) * len(prompts)
    done = [0]

    def tick(_: int) -> None:
        done[0] += 1
        if progress is not None:
            progress(done[0], total)

    columns = []
    if include_base:
        columns.append(sample_column(base_model, conds, vae, settings, BASE_LABEL, step=0, on_cell=tick))
    for path in checkpoints:
        sd, meta = read_lora(Path(path))
        model, _ = comfy.sd.load_lora_for_models(base_model, None, sd, strength, 0)
        step = lora_step(Path(path), meta)
        label = f"step {step}" if step is not None else Path(path).stem
        columns.append(sample_column(model, conds, vae, settings, label, str(path), step, meta, on_cell=tick))
        logging.info("Klein eval: sampled %d prompts from %s", len(prompts), path)
    return columns


class CompiledBlocks:
    """torch.compile'd block wrappers for sampling, built once per diffusion model and reused at every checkpoint.

    Put on a clone of the model through ComfyUI's block-replace patches (as training does), so the model
    itself is untouched and the stock sampler (CFG with cond and uncond in one batch) runs them. Building the
    wrappers once matters: new wrappers would compile again (tens of seconds) at every checkpoint.
    """

    def __init__(self) -> None:
        self._dm = None
        self._patches: dict = {}

    def apply(self, model):
        from ..model.checkpointing import block_options

        dm = model.model.diffusion_model
        if self._dm is not dm:
            self._patches = block_options(dm, recompute=False, compile_blocks=True)["patches_replace"]["dit"]
            self._dm = dm
        compiled = model.clone()
        for (kind, index), patch in self._patches.items():
            compiled.set_model_patch_replace(patch, "dit", kind, index)
        return compiled


class LiveSampler:
    """Samples the suite from the trainer's live model at each checkpoint (TrainHooks.on_checkpoint).

    Prompts are encoded once, before training starts (the text encoder then never competes with the
    training model for memory). Call the instance with (step, path, live_model) from the hook: it samples
    under torch.no_grad() with the LoRA as trained so far, keeps the latents for the metrics and returns
    the images as PIL images in suite order.
    """

    def __init__(self, clip, vae, prompts: Sequence[SuitePrompt], settings: SampleSettings,
                 compile_blocks: bool | None = None, conds: tuple[list, list] | None = None):
        settings.validate()
        # compiled blocks on CUDA where torch.compile can run (as training): ~1.3x faster samples after one compilation
        if compile_blocks is None:
            from ..model.compile_support import compile_problem

            compile_blocks = torch.cuda.is_available() and compile_problem(torch.device("cuda")) is None
        self.compiled = CompiledBlocks() if compile_blocks else None
        self.vae = vae
        self.prompts = list(prompts)
        self.settings = settings
        if conds is None:
            with torch.inference_mode():
                conds = encode_prompts(clip, self.prompts)
        self.conds = conds  # (positives in suite order, negative); given pre-encoded by the benchmarks
        self.columns: list[Column] = []

    def _sampled(self, model):
        return self.compiled.apply(model) if self.compiled else model

    def __call__(self, step: int, path: Path, live_model) -> list:
        col = sample_column(self._sampled(live_model), self.conds, self.vae, self.settings, f"step {step}", str(path), step)
        self.columns.append(col)
        return [to_pil(img) for img in col.images]

    def base_column(self, base_model) -> Column:
        """The base model's samples (the metrics' reference); sample it before training starts."""
        return sample_column(self._sampled(base_model), self.conds, self.vae, self.settings, BASE_LABEL, step=0)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw, text: str, font, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split():
        trial = f"{line} {word}".strip()
        if line and draw.textlength(trial, font=font) > width:
            lines.append(line)
            line = word
        else:
            line = trial
    return [*lines, line] if line else lines


def grid_image(cells: Sequence[Sequence], row_labels: Sequence[str], col_labels: Sequence[str],
               title: str = ""):
    """A labelled grid (PIL): `cells[row][col]` PIL images, row labels on the left, column labels on top."""
    from PIL import Image, ImageDraw

    if len(cells) != len(row_labels) or any(len(r) != len(col_labels) for r in cells):
        raise ValueError(f"grid has {len(cells)} rows x {[len(r) for r in cells]} cells but {len(row_labels)} row "
                         f"labels and {len(col_labels)} column labels: they must match.")
    cw = max(im.width for row in cells for im in row)
    ch = max(im.height for row in cells for im in row)
    size = max(12, min(32, cw // 10))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(3 * size, min(12 * size, max(int(probe.textlength(t, font=font)) for t in row_labels) + size))
    col_lines = [_wrap(probe, t, font, cw - 8) for t in col_labels]
    top = (max(len(ls) for ls in col_lines) + 1) * (size + 4) + (size + 8 if title else 0)
    pad = 4
    img = Image.new("RGB", (left + len(col_labels) * (cw + pad) + pad, top + len(row_labels) * (ch + pad) + pad), "white")
    draw = ImageDraw.Draw(img)
    if title:
        draw.text((pad, pad), title, fill="black", font=font)
    for c, lines in enumerate(col_lines):
        y = top - len(lines) * (size + 4) - 4
        for ln in lines:
            draw.text((left + c * (cw + pad) + pad, y), ln, fill="black", font=font)
            y += size + 4
    for r, label in enumerate(row_labels):
        lines = _wrap(draw, label, font, left - size // 2)
        y = top + r * (ch + pad) + (ch - len(lines) * (size + 4)) // 2
        for ln in lines:
            draw.text((pad, y), ln, fill="black", font=font)
            y += size + 4
        for c, im in enumerate(cells[r]):
            img.paste(im, (left + c * (cw + pad) + pad, top + r * (ch + pad) + pad))
    return img


def columns_grid(columns: Sequence[Column], prompts: Sequence[SuitePrompt], title: str = ""):
    """Rows = prompts, columns = checkpoints (base first)."""
    cells = [[to_pil(col.images[r]) for col in columns] for r in range(len(prompts))]
    return grid_image(cells, [p.label for p in prompts], [c.label for c in columns], title)


def rank_steps_grid(entries: Sequence[tuple[dict[str, str], object]], title: str = ""):
    """The seed's comparison grid: rows = LoRA rank, columns = training steps, one image per LoRA.

    `entries` are (safetensors metadata, PIL image). Rank and steps come from the trainer's metadata;
    a file without them gets its own row/column labelled '?'. An empty cell (a rank trained for
    fewer step counts) stays grey.
    """
    from PIL import Image

    def num(meta: dict[str, str], key: str) -> int | None:
        try:
            return int(float(meta.get(key, "")))
        except ValueError:
            return None

    keyed = [(num(meta, "rank"), num(meta, "steps"), im) for meta, im in entries]
    ranks = sorted({r for r, _, _ in keyed}, key=lambda v: (v is None, v or 0))
    steps = sorted({s for _, s, _ in keyed}, key=lambda v: (v is None, v or 0))
    w = max(im.width for _, _, im in keyed)
    h = max(im.height for _, _, im in keyed)
    cells = [[Image.new("RGB", (w, h), (128, 128, 128)) for _ in steps] for _ in ranks]
    for r, s, im in keyed:
        cells[ranks.index(r)][steps.index(s)] = im
    return grid_image(cells, [f"rank {'?' if r is None else r}" for r in ranks],
                      [f"{'?' if s is None else s} steps" for s in steps], title)


def parse_strengths(text: str) -> list[float]:
    """'0.25, 0.5, 1' -> [0.25, 0.5, 1.0]; a clear error for anything else."""
    out = []
    for part in (p.strip() for p in (text or "").replace(";", ",").split(",")):
        if not part:
            continue
        try:
            out.append(float(part))
        except ValueError:
            raise ValueError(f"strengths: '{part}' is not a number; write them comma-separated, e.g. 0.25, 0.5, 1.0") from None
    if not out:
        raise ValueError("strengths is empty: write the weights to try, comma-separated, e.g. 0.25, 0.5, 0.75, 1.0")
    return out


def strength_sweep(base_model, clip, vae, lora_a: dict, lora_b: dict | None, strengths: Sequence[float], prompt: str,
                   settings: SampleSettings, names: tuple[str, str] = ("A", "B")):
    """One image per weight pair: rows = weight of LoRA A, columns = weight of LoRA B (one column without B).

    Both are applied with ComfyUI's stock load_lora_for_models, as two Load LoRA nodes would apply them,
    so the cell at (wa, wb) is what a merge of A x wa + B x wb gives (an exact merge equals that sum).
    """
    import comfy.sd

    conds = encode_prompts(clip, [SuitePrompt("prompt", "prompt", prompt, True)])
    cols = list(strengths) if lora_b is not None else [None]
    cells = []
    for wa in strengths:
        row = []
        for wb in cols:
            model, _ = comfy.sd.load_lora_for_models(base_model, None, lora_a, wa, 0)
            if wb is not None:
                model, _ = comfy.sd.load_lora_for_models(model, None, lora_b, wb, 0)
            row.append(to_pil(sample_column(model, conds, vae, settings, f"{wa}/{wb}").images[0]))
        cells.append(row)
    col_labels = [f"{names[1]} x {w:g}" for w in strengths] if lora_b is not None else [names[0]]
    return grid_image(cells, [f"{names[0]} x {w:g}" for w in strengths], col_labels, prompt[:80])


DISTILLED_STEPS, DISTILLED_CFG = 4, 1.0  # klein's distilled models: a few steps, no CFG


def check_same_size(base_model, distilled_model) -> None:
    """A LoRA trained on Base applies to the distilled model of the same size only."""
    def shape(m):
        dm = m.model.diffusion_model
        return len(dm.double_blocks), len(dm.single_blocks), dm.hidden_size

    if shape(base_model) != shape(distilled_model):
        (bd, bs, bh), (dd, ds, dh) = shape(base_model), shape(distilled_model)
        raise ValueError(f"the distilled model is {dd}+{ds} blocks of width {dh}, the base {bd}+{bs} of width {bh}: "
                         "connect the distilled klein of the same size (4B with 4B, 9B with 9B).")


def distilled_columns(distilled_model, clip, vae, checkpoints: Sequence[Path], prompts: Sequence[SuitePrompt],
                      settings: SampleSettings) -> list[Column]:
    """The same checkpoints on the distilled model, at its own schedule (4 steps, CFG 1), same seeds."""
    fast = SampleSettings(DISTILLED_STEPS, DISTILLED_CFG, settings.seed, settings.width, settings.height,
                          settings.sampler)
    columns = sample_checkpoints(distilled_model, clip, vae, checkpoints, prompts, fast)
    for c in columns:
        c.label = f"distilled: {c.label}"
    return columns
