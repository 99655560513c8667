"""The micro klein models, pretrained on the micro world, in ComfyUI's own formats.

- diffusion model: FLUX.2 with klein 4B's structure (5 double + 20 single blocks, so the pack's block map
  applies) at hidden 128 (one head of 128), context 3 x 64; BFL key names, bf16, so the stock UNETLoader
  detects it as Flux2. Committed: weights/klein-micro.safetensors.
- VAE: taef2's architecture (FLUX.2's 128-channel, 16x latent), trained on the world. ComfyUI's VAELoader
  reads taef2 only as the pair models/vae_approx/taef2_{encoder,decoder}.safetensors: a single file in
  models/vae with taesd keys is built as a 32-channel 8x TAESD (the channel count comes from the decoder's
  first conv, and `tae_latent_channels` metadata is a string, which TAESD rejects), so the pair is the only
  stock route. write_micro_models never overwrites a different taef2 pair (a user's real one): it stops
  and says what to do. Committed: weights/taef2_{encoder,decoder}.safetensors.
- text encoder: the tiny random Qwen3 of devtools/tiny_models.py (klein's layout, width 64, 28 layers,
  hidden layers 9/18/27 stacked), frozen. Its 151k-token embedding alone is 19 MB in fp16, so it is
  regenerated from its seed and checked against the manifest's sha256 instead of committed. Its
  tokenizer does not pad (klein's pads to 512 with the pad token): ComfyUI's Flux2 left-pads every
  conditioning to 512 with zeros (model_base.Flux2.extra_conds), as the trainer's dataset does, so the
  stock graph and the trainer see the same conditioning, and encoding costs ~30 tokens, not 512.
Needs ComfyUI importable (library mode or a running server's process).
"""
from __future__ import annotations

import hashlib
import json
import shutil
import types
from pathlib import Path

import torch

from ..devtools import tiny_models
from ..trainer.paths import _atomic_write, atomic_save_safetensors

MICRO = dict(hidden=128, double=5, single=20, context=3 * tiny_models.TE_WIDTH)
TE_SEED = 0
PAD_TOKEN = 151643  # Qwen3's pad token (comfy.text_encoders.flux.Qwen3_4BModel)
TE_MIN_TOKENS = 0  # no tokenizer padding: ComfyUI's Flux2 (and the trainer) pad with zeros to 512
WEIGHTS = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS / "manifest.json"
UNET_FILE = "klein-micro.safetensors"
TE_FILE = "klein-micro-te.safetensors"
TAEF2_FILES = {"encoder": "taef2_encoder.safetensors", "decoder": "taef2_decoder.safetensors"}


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """A checksum of tensors' names, shapes, dtypes and bytes (for weights regenerated, not committed)."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().to("cpu").contiguous()
        h.update(f"{k}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def read_manifest() -> dict:
    if not MANIFEST.is_file():
        raise FileNotFoundError(f"{MANIFEST} is missing: the micro models are not built; run "
                                "`python -m klein_lora_studio.microworld.pretrain` (see docs/quality.md).")
    return json.loads(MANIFEST.read_text(encoding="utf-8"))


def verify_committed(manifest: dict | None = None) -> dict[str, Path]:
    """The committed weight files, each checked against the manifest's sha256 (a clear error if one differs)."""
    manifest = manifest or read_manifest()
    out = {}
    for name, entry in manifest["files"].items():
        path = WEIGHTS / name
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (listed in {MANIFEST.name}): restore it from git.")
        got = file_sha256(path)
        if got != entry["sha256"]:
            raise ValueError(f"{path}: sha256 {got[:12]}... is not the manifest's {entry['sha256'][:12]}...: the "
                             "file was changed; restore it from git or re-run the pretraining.")
        out[name] = path
    return out


# ------------------------------------------------------------------------------------------- text encoder
def te_state_dict(check: bool = True) -> dict[str, torch.Tensor]:
    """The frozen random text encoder, regenerated from TE_SEED in fp16 (the dtype ComfyUI runs it in on CPU
    and GPU); checked against the manifest's sha256 when there is a manifest."""
    sd = {k: v.to(torch.float16) for k, v in tiny_models.tiny_te_state_dict(TE_SEED).items()}  # as ComfyUI runs it
    if check and MANIFEST.is_file():
        want = read_manifest()["text_encoder"]["sha256"]
        got = state_dict_sha256(sd)
        if got != want:
            raise ValueError(f"the regenerated micro text encoder's sha256 {got[:12]}... is not the one in "
                             f"{MANIFEST} ({want[:12]}...): this torch draws different random numbers; the "
                             "pretrained diffusion model would read the prompts wrongly.")
    return sd


def micro_clip(te_path: str | Path | None = None):
    """The micro text encoder as a ComfyUI CLIP (what CLIPTextEncode takes), without tokenizer padding."""
    import comfy.sd
    import comfy.utils
    from comfy.text_encoders.flux import KleinTokenizer, klein_te

    sd = comfy.utils.load_torch_file(str(te_path)) if te_path is not None else te_state_dict()
    target = types.SimpleNamespace(clip=klein_te(model_type="qwen3_4b"), tokenizer=KleinTokenizer, params={})
    clip = comfy.sd.CLIP(target, state_dict=[], tokenizer_data={"qwen3_4b_min_length": TE_MIN_TOKENS},
                         model_options={"qwen3_4b_model_config": tiny_models.tiny_te_config()}, disable_dynamic=True)
    missing, unexpected = clip.load_sd(sd)
    unexpected = [k for k in unexpected if not k.endswith("logit_scale")]  # ComfyUI adds it to every TE
    if missing or unexpected:
        raise RuntimeError(f"micro text encoder keys did not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return clip


def encode_text(clip, text: str) -> torch.Tensor:
    """(tokens, 192) conditioning of one prompt, unpadded (pad with trainer.data.dataset.pad_context)."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))[0][0][0].detach().to("cpu", torch.float32)


def encode_texts(clip, texts: list[str], batch: int = 256) -> list[torch.Tensor]:
    """encode_text of many prompts in one forward per `batch`: each prompt's tokens are one "section" of a
    ComfyUI prompt, right-padded with the pad token to a common length. The encoder is causal, so padding
    after a prompt does not change its tokens' states: the result is each prompt's own encoding."""
    pad = (PAD_TOKEN, 1.0)
    out: list[torch.Tensor] = []
    for start in range(0, len(texts), batch):
        sections = [clip.tokenize(t)["qwen3_4b"][0] for t in texts[start:start + batch]]
        length = max(len(s) for s in sections)
        tokens = {"qwen3_4b": [s + [pad] * (length - len(s)) for s in sections]}
        cond = clip.encode_from_tokens(tokens).detach().to("cpu", torch.float32)
        cond = cond.reshape(len(sections), length, -1)
        out += [cond[i, :len(s)] for i, s in enumerate(sections)]
    return out


# ------------------------------------------------------------------------------------------- files
def to_bfl(module_sd: dict[str, torch.Tensor], dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """A flux2 module's state dict in the released files' key names (norm scales as `.scale`)."""
    return {(k[:-7] + ".scale") if k.endswith("_norm.weight") else k: v.detach().to("cpu", dtype).contiguous()
            for k, v in module_sd.items()}


def from_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k[:-6] + ".weight") if k.endswith("_norm.scale") else k: v for k, v in sd.items()}


def _check_free(src: Path, dst: Path, what: str) -> None:
    """An existing `dst` is fine when identical to `src`; a different one (a user's real model) is never replaced."""
    if dst.exists() and file_sha256(dst) != file_sha256(src):
        raise FileExistsError(f"{dst} exists and is not the micro {what}: it may be a real model of yours, which "
                              "is never overwritten. Use another ComfyUI models folder for the micro models "
                              "(e.g. a sandbox started with --base-directory) or move that file away.")


def write_micro_models(models_dir: str | Path, weights_dir: str | Path | None = None) -> dict[str, Path]:
    """Put the micro models into a ComfyUI models/ folder: diffusion_models/klein-micro.safetensors,
    text_encoders/klein-micro-te.safetensors (regenerated, checksum-checked) and the taef2 pair in vae_approx/.
    Every destination is checked before anything is written; files already there and identical are kept.

    `weights_dir` defaults to the committed weights (checked against the manifest); the pretraining passes
    its fresh output folder instead.
    """
    models_dir = Path(models_dir)
    if weights_dir is None:
        verify_committed()
        weights_dir = WEIGHTS
    weights_dir = Path(weights_dir)
    copies = {"unet": (weights_dir / UNET_FILE, models_dir / "diffusion_models" / UNET_FILE, "diffusion model")}
    for part, name in TAEF2_FILES.items():
        copies[f"taef2_{part}"] = (weights_dir / name, models_dir / "vae_approx" / name, f"taef2 {part}")
    te = models_dir / "text_encoders" / TE_FILE
    sd = te_state_dict(check=weights_dir == WEIGHTS)
    if te.exists() and state_dict_sha256(load_file(te)) != state_dict_sha256(sd):
        raise FileExistsError(f"{te} exists and is not the micro text encoder: move it away (it is never overwritten).")
    for src, dst, what in copies.values():
        _check_free(src, dst, what)
    out = {key: dst if dst.exists() else _atomic_write(dst, lambda tmp, src=src: shutil.copyfile(src, tmp))
           for key, (src, dst, _) in copies.items()}
    out["te"] = te if te.exists() else atomic_save_safetensors(sd, te)
    return out


def load_file(path: str | Path) -> dict[str, torch.Tensor]:
    import safetensors.torch

    return safetensors.torch.load_file(str(path))


def load_micro_models(models_dir: str | Path):
    """(MODEL, CLIP, VAE) through the stock loaders: UNETLoader (detected as Flux2), VAELoader("taef2"), and the
    micro text encoder as a CLIP (CLIPLoader would build the full 4B Qwen3 from the key widths)."""
    import nodes

    (model,) = nodes.UNETLoader().load_unet(UNET_FILE, "default")
    (vae,) = nodes.VAELoader().load_vae("taef2")
    return model, micro_clip(Path(models_dir) / "text_encoders" / TE_FILE), vae


# ------------------------------------------------------------------------------------------- sampling
def encode_batch(clip, prompts: list[str]) -> torch.Tensor:
    """(B, 512, 192): each prompt's conditioning left-padded with zeros to 512 tokens, exactly as ComfyUI's
    Flux2 pads a single prompt's (and the trainer's dataset does), so a batch samples as the prompts one by one."""
    from ..trainer.data.dataset import CONTEXT_TOKENS, pad_context

    return torch.stack([pad_context(encode_text(clip, p), CONTEXT_TOKENS) for p in prompts])


def generate(model, clip, vae, prompts: list[str], seed: int = 0, steps: int | None = None, cfg: float | None = None,
             px: int = 128, batch: int = 16, references: list | None = None) -> list:
    """PIL images of `prompts` at the pack's sampler settings (euler, FLUX.2's schedule, CFG with an empty
    negative; klein Base's 50 steps and CFG 4 unless given), through comfy.sample.sample_custom. Prompt i
    gets the noise of seed + i. `references` (PIL images, one per prompt) are passed as FLUX.2 reference
    latents, as ComfyUI's ReferenceLatent node does."""
    from ..trainer.evaluation import sampling

    steps = sampling.BASE_STEPS if steps is None else steps
    cfg = sampling.BASE_CFG if cfg is None else cfg
    with torch.inference_mode():  # as ComfyUI's executor runs the sampler nodes
        return [im for start in range(0, len(prompts), batch)
                for im in _generate_batch(model, clip, vae, prompts[start:start + batch], seed + start, steps, cfg, px,
                                          None if references is None else references[start:start + batch])]


def _generate_batch(model, clip, vae, prompts: list[str], seed: int, steps: int, cfg: float, px: int,
                    references: list | None) -> list:
    import comfy.sample
    import comfy.samplers

    from ..trainer.evaluation import sampling

    sigmas = sampling.flux2_sigmas(steps, px, px)
    extra = {}
    if references is not None:
        pixels = torch.cat([sampling.to_image_tensor(im) for im in references])
        extra = {"reference_latents": [vae.encode(pixels)]}
    positive = [[encode_batch(clip, prompts), {"pooled_output": None, **extra}]]
    negative = [[encode_batch(clip, [""]), {"pooled_output": None, **extra}]]
    empty = torch.zeros(len(prompts), sampling.LATENT_CHANNELS, px // sampling.LATENT_SCALE, px // sampling.LATENT_SCALE)
    latent = comfy.sample.fix_empty_latent_channels(model, empty)
    noise = torch.cat([comfy.sample.prepare_noise(latent[:1], seed + i) for i in range(len(prompts))])
    out = comfy.sample.sample_custom(model, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive,
                                     negative, latent, disable_pbar=True, seed=seed)
    decoded = vae.decode(out.to(torch.float32)).to("cpu", torch.float32)[..., :3].clamp(0, 1)
    return [sampling.to_pil(im) for im in decoded]
