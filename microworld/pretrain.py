"""Reproduce the micro models' pretraining (seeded): taef2 VAE, then the FLUX.2 micro diffusion model.

1. VAE (taef2 architecture) on the world's images, every look of it (microworld.world.autoencoder_scenes):
   reconstruction loss (MSE + L1) with a light pull of each latent channel to mean 0 / std 1 (the latents
   feed the flow objective unscaled: ComfyUI's Flux2 latent format is the identity) and latent noise, so
   the decoder also decodes imperfect samples.
2. The diffusion model (klein's 5 + 20 blocks at hidden 128) on the pretraining scenes and their captions,
   with the pack's own objective and schedule (trainer/training/objective.py: logit-normal sigmas shifted
   for 64 image tokens, velocity MSE), caption dropout for CFG, and every few steps a batch of reference
   edits (world.edit_pairs: identity, recolour, background, move; never the held-out colour swap) fed as
   FLUX.2 reference latents, as trainer/training/loop.py feeds an image-to-image dataset. An EMA of the
   weights is what is saved. The text encoder is the frozen random one (microworld/models.py): the
   te_probe below measures that it tells the world's prompts apart.
3. Evaluation: the saved files are placed in a ComfyUI models folder, loaded by the stock loaders and
   sampled at the pack's sampler settings on held-out prompt combinations; microworld.reader scores them.

    python -m klein_lora_studio.microworld.pretrain --out DIR [--cpu] [--vae-steps N] [--dit-steps N] ...

writes into DIR: the weight files, manifest.json, pretrain.json (config, loss curves, probe and evaluation)
and eval_grid.png. Copy the first four into microworld/weights/ to commit a new pretraining.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import random
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from . import models, reader, world


@dataclass
class PretrainConfig:
    seed: int = 16
    px: int = 128
    mix_px: int = 0  # > 0: every mix_every-th step trains on the same scenes rendered at this size instead
    mix_every: int = 4  # (a model moved to a new px keeps working at mix_px, where the CPU tests sample)
    vae_steps: int = 1500
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_images: int = 6000
    vae_latent_reg: float = 0.05
    vae_latent_noise: float = 0.1
    vae_budget_s: float = 0.0  # > 0: stop the VAE training when this many seconds have passed
    dit_steps: int = 3000
    dit_batch: int = 256
    dit_lr: float = 6e-4
    dit_warmup: int = 150
    dit_min_lr: float = 0.1  # the cosine decay ends at this share of dit_lr
    edit_every: int = 4  # every 4th step trains a batch of reference edits
    edit_pairs: int = 6000
    dit_scenes: int = 0  # > 0: train on this many pretraining scenes only (a smoke run); 0: all 3024
    recon_images: int = 256  # held-out scenes the VAE round trip is read on
    probe_heldout: int = 432  # held-out captions the text-encoder probe is scored on (0: no probe)
    caption_dropout: float = 0.1
    caption_noise: float = 0.0  # share of text-to-image samples whose caption carries a made-up word (world.noisy_caption)
    noise_captions: int = 3000  # distinct noisy captions drawn (each of a random pretraining scene), encoded once
    ema: float = 0.995
    grad_clip: float = 1.0
    time_budget_s: float = 0.0  # > 0: stop the diffusion training when this many seconds have passed
    eval_prompts: int = 144
    eval_steps: int = 50  # the pack's Base settings (trainer/evaluation/sampling.py)
    eval_cfg: float = 4.0
    eval_batch: int = 48
    workers: int = 8
    resume: str = ""  # a finished run's --out folder: keep its VAE, continue its diffusion model for dit_steps more
    te_file: str = ""  # the text encoder from a file (made where the manifest's checksum was) instead of its seed


# ------------------------------------------------------------------------------------------- data
def _render_one(args: tuple[world.Scene, int]) -> np.ndarray:
    return np.asarray(world.render(*args), dtype=np.uint8)


def render_all(scenes: list[world.Scene], px: int, workers: int) -> torch.Tensor:
    """(N, 3, px, px) uint8 images, rendered in parallel (rendering is pure, so the order is all that matters)."""
    jobs = [(s, px) for s in scenes]
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            arrays = list(pool.map(_render_one, jobs, chunksize=64))
    else:
        arrays = [_render_one(j) for j in jobs]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _lr(step: int, steps: int, base: float, warmup: int, floor: float, elapsed: float = 0.0,
        budget: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to `floor` x base over the steps, or over the time budget when that
    runs out first (so a run cut short by its budget still ends at the low learning rate)."""
    if step < warmup:
        return base * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    if budget > 0:
        t = max(t, elapsed / budget)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def _curve(losses: list[float], every: int = 25) -> list[list[float]]:
    """[step, mean loss of the `every` steps up to it] rows."""
    return [[i + every, float(np.mean(losses[i:i + every]))] for i in range(0, len(losses), every)]


# ------------------------------------------------------------------------------------------- VAE
def new_taef2(seed: int, device) -> torch.nn.Module:
    """ComfyUI's TAESD at taef2's shapes, initialised as devtools/tiny_models.py initialises it."""
    from comfy.taesd.taesd import TAESD

    from ..devtools import tiny_models

    tae = TAESD(latent_channels=128)
    parts = tiny_models.taef2_state_dicts(seed)
    tae.taesd_encoder.load_state_dict(parts["encoder"])
    tae.taesd_decoder.load_state_dict(parts["decoder"])
    return tae.to(device)


def vae_loss(tae, x: torch.Tensor, cfg: PretrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """x: (B, 3, H, W) in [0, 1]. Reconstruction of the (noised) latent plus the channel-statistics pull."""
    z = tae.taesd_encoder(x)
    noise = torch.randn(z.shape, generator=generator).to(z.device, z.dtype)
    rec = tae.taesd_decoder(z + cfg.vae_latent_noise * noise)
    zf = z.float()
    mean, std = zf.mean(dim=(0, 2, 3)), zf.std(dim=(0, 2, 3))
    reg = (mean.pow(2) + (std - 1).pow(2)).mean()
    mse = torch.nn.functional.mse_loss(rec.float(), x.float())
    l1 = (rec.float() - x.float()).abs().mean()
    return mse + l1 + cfg.vae_latent_reg * reg, {"mse": float(mse.detach()), "reg": float(reg.detach())}


def train_vae(images: torch.Tensor, cfg: PretrainConfig, device, autocast) -> tuple[torch.nn.Module, dict]:
    """Train taef2 on `images` (N, 3, H, W uint8, on `device`); returns it (eval mode) and its loss record."""
    tae = new_taef2(cfg.seed, device).train()
    opt = torch.optim.AdamW(tae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    losses, mses, start = [], [], time.perf_counter()
    for step in range(cfg.vae_steps):
        elapsed = time.perf_counter() - start
        if cfg.vae_budget_s > 0 and elapsed > cfg.vae_budget_s:
            logging.info("vae: time budget of %.0fs reached at step %d", cfg.vae_budget_s, step)
            break
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg.vae_steps, cfg.vae_lr, 50, 0.05, elapsed, cfg.vae_budget_s)
        idx = torch.randint(len(images), (cfg.vae_batch,), generator=g)
        x = images[idx.to(images.device)].float() / 255.0
        with autocast:
            loss, parts = vae_loss(tae, x, cfg, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tae.parameters(), cfg.grad_clip)
        opt.step()
        losses.append(float(loss.detach()))
        mses.append(parts["mse"])
        if step % 100 == 0 or step == cfg.vae_steps - 1:
            logging.info("vae step %d/%d loss %.4f mse %.5f reg %.4f", step, cfg.vae_steps, losses[-1], parts["mse"],
                         parts["reg"])
    record = {"steps": len(losses), "seconds": time.perf_counter() - start, "final_loss": float(np.mean(losses[-50:])),
              "final_mse": float(np.mean(mses[-50:])), "curve": _curve(losses), "mse_curve": _curve(mses)}
    return tae.eval(), record


@torch.no_grad()
def encode_images(tae, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([tae.taesd_encoder(images[i:i + batch].float() / 255.0).float()
                      for i in range(0, len(images), batch)])


@torch.no_grad()
def decode_latents(tae, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
    return torch.cat([tae.taesd_decoder(latents[i:i + batch]).float().clamp(0, 1)
                      for i in range(0, len(latents), batch)])


# ------------------------------------------------------------------------------------------- text
def encode_captions(clip, captions: list[str]) -> torch.Tensor:
    """(N, 512, 192) float32 on the CPU: each caption as the trainer's dataset encodes it (zero left-padded)."""
    from ..trainer.data.dataset import CONTEXT_TOKENS, pad_context

    return torch.stack([pad_context(c, CONTEXT_TOKENS) for c in models.encode_texts(clip, captions)])


def te_probe(contexts: torch.Tensor, scenes: list[world.Scene], train: list[bool], tail: int = 32) -> dict:
    """Does the frozen random text encoder tell the world's prompts apart? Measured two ways on the
    (zero left-padded) conditionings: the largest cosine similarity between two different captions, and a
    ridge-regression probe per attribute fitted on pretraining captions and scored on held-out ones (new
    combinations of seen values). Uses the last `tail` tokens, where every caption's words are."""
    x = contexts[:, -tail:].flatten(1).double()
    xn = x / x.norm(dim=1, keepdim=True)
    cos = xn @ xn.T
    cos.fill_diagonal_(-1.0)
    tr = torch.tensor(train)
    x = x - x[tr].mean(0)
    a = x[tr]
    gram_inv = torch.linalg.solve(a @ a.T + torch.eye(len(a), dtype=a.dtype), torch.eye(len(a), dtype=a.dtype))
    out = {"max_cosine_between_different_captions": float(cos.max()), "captions": len(scenes),
           "probe_train": int(tr.sum()), "probe_test": int((~tr).sum())}
    for attr, values in (("colour", list(world.COLOURS)), ("shape", list(world.SHAPES)),
                         ("position", list(world.POSITIONS)), ("size", list(world.SIZES)),
                         ("background", list(world.BACKGROUNDS))):
        y = torch.tensor([values.index(getattr(s, attr)) for s in scenes])
        onehot = torch.eye(len(values), dtype=a.dtype)[y]
        w = a.T @ (gram_inv @ onehot[tr])  # ridge (lambda 1) in its dual form: features >> samples
        pred = (x[~tr] @ w).argmax(1)
        out[f"probe_{attr}_heldout_accuracy"] = float((pred == y[~tr]).double().mean())
    return out


# ------------------------------------------------------------------------------------------- diffusion model
def new_dit(seed: int, device) -> torch.nn.Module:
    """klein's structure at hidden 128, adaLN-zero style: the shared modulations and the final projection
    start at zero (each block starts as the identity), every other weight normal(0, fan_in^-1/2), norms 1."""
    from ..devtools import tiny_models

    dm = tiny_models.flux2_module(**models.MICRO, device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dm.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif "modulation" in name or name.startswith("final_layer."):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
    return dm.to(device)


@dataclass
class DitData:
    """Everything the diffusion training draws from, on the training device."""
    latents: torch.Tensor  # (N, 128, px / 16, px / 16): one per rendered scene
    contexts: torch.Tensor  # (C, 512, 192): one per distinct caption; row 0 is the empty caption
    t2i: torch.Tensor  # (M, 2): (latent index, caption index) of the pretraining scenes
    edits: torch.Tensor  # (E, 3): (reference latent, target latent, caption index)
    mix_latents: torch.Tensor | None = None  # the same scenes at mix_px (None: one resolution)
    noisy: torch.Tensor | None = None  # (K, 2): (latent index, noisy caption index), drawn with caption_noise


def dit_batch(data: DitData, cfg: PretrainConfig, step: int, g: torch.Generator):
    """(x0, context, reference or None) for one step; caption dropout swaps in the empty caption (row 0).
    One in mix_every of the text-to-image steps and one in mix_every of the edit steps draw the latents at mix_px.
    (Phase 4 of the committed base ran before the edit steps were counted apart: with edit_every = mix_every = 4 its
    edits never came at 128 px.)"""
    edit = cfg.edit_every > 0 and len(data.edits) > 0 and step % cfg.edit_every == cfg.edit_every - 1
    turn = step // cfg.edit_every if edit else step
    mix = data.mix_latents is not None and turn % cfg.mix_every == min(1, cfg.mix_every - 1)
    latents = data.mix_latents if mix else data.latents
    rows = data.edits if edit else data.t2i
    pick = rows[torch.randint(len(rows), (cfg.dit_batch,), generator=g)]
    if not edit and data.noisy is not None and cfg.caption_noise > 0:
        swap = torch.rand(cfg.dit_batch, generator=g) < cfg.caption_noise
        pick[swap] = data.noisy[torch.randint(len(data.noisy), (int(swap.sum()),), generator=g)]
    caption = pick[:, -1].clone()
    caption[torch.rand(cfg.dit_batch, generator=g) < cfg.caption_dropout] = 0
    dev = latents.device
    x0 = latents[pick[:, 1 if edit else 0].to(dev)]
    ref = latents[pick[:, 0].to(dev)] if edit else None
    return x0, data.contexts[caption.to(dev)], ref


def train_dit(data: DitData, cfg: PretrainConfig, device, autocast, init: dict | None = None,
              seed_offset: int = 0) -> tuple[dict, dict]:
    """The pack's objective (trainer/training/objective.py) on full weights; returns (EMA state dict, record).
    `init` continues from saved weights (a resumed pretraining; its draws are seeded past the earlier steps)."""
    from ..trainer.model.checkpointing import inplace_safe_norms
    from ..trainer.training import objective
    from ..trainer.training.loop import comfy_training_mode

    dm = new_dit(cfg.seed, device)
    if init is not None:
        dm.load_state_dict({k: v.float() for k, v in init.items()})
    dm.train()
    names = [k for k, _ in dm.named_parameters()]
    params = [p for _, p in dm.named_parameters()]
    ema = [p.detach().clone().float() for p in params]
    opt = torch.optim.AdamW(dm.parameters(), lr=cfg.dit_lr, betas=(0.9, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed + 1 + seed_offset)
    losses, kinds, start = [], [], time.perf_counter()
    with comfy_training_mode(), inplace_safe_norms(dm):
        for step in range(cfg.dit_steps):
            if cfg.time_budget_s > 0 and time.perf_counter() - start > cfg.time_budget_s:
                logging.info("dit: time budget of %.0fs reached at step %d", cfg.time_budget_s, step)
                break
            for group in opt.param_groups:
                group["lr"] = _lr(step, cfg.dit_steps, cfg.dit_lr, cfg.dit_warmup, cfg.dit_min_lr,
                                  time.perf_counter() - start, cfg.time_budget_s)
            x0, ctx, ref = dit_batch(data, cfg, step, g)
            sigma = objective.sample_sigmas(len(x0), x0.shape[-1] * x0.shape[-2], g, device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            xt, target = objective.noisy_input(x0, noise, sigma)
            extra = {} if ref is None else {"ref_latents": [ref]}
            with autocast:
                pred = dm(xt, sigma, ctx, transformer_options={}, **extra)
            loss = objective.flow_loss(pred, target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(dm.parameters(), cfg.grad_clip)
            opt.step()
            decay = min(cfg.ema, (1 + step) / (10 + step))
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.float() for p in params], 1 - decay)
            losses.append(loss.detach())  # read back every 100 steps: a sync per step would stall the GPU
            kinds.append(ref is not None)
            if step % 100 == 0:
                logging.info("dit step %d/%d loss %.4f (%.0fs)", step, cfg.dit_steps, float(losses[-1]),
                             time.perf_counter() - start)
    losses = torch.stack(losses).float().cpu().tolist() if losses else []
    t2i = [v for v, e in zip(losses, kinds, strict=True) if not e]
    edit = [v for v, e in zip(losses, kinds, strict=True) if e]
    record = {"steps": len(losses), "seconds": time.perf_counter() - start,
              "final_loss": float(np.mean(losses[-100:])), "final_t2i_loss": float(np.mean(t2i[-75:])),
              "final_edit_loss": float(np.mean(edit[-25:])) if edit else None, "curve": _curve(losses)}
    return dict(zip(names, ema, strict=True)), record


# ------------------------------------------------------------------------------------------- the run
def build_data(cfg: PretrainConfig, tae, clip, device) -> tuple[DitData, dict]:
    """Render and encode each scene the training uses once, encode each caption once, index the rows."""
    t2i_scenes = world.pretraining_scenes(cfg.seed, cfg.dit_scenes) if cfg.dit_scenes else world.PRETRAINING_COMBOS
    edits = world.edit_pairs(cfg.seed, cfg.edit_pairs)
    scenes = sorted(set(t2i_scenes) | {r for r, _, _ in edits} | {t for _, t, _ in edits}, key=world.caption)
    index = {s: i for i, s in enumerate(scenes)}
    start = time.perf_counter()
    latents = encode_images(tae, render_all(scenes, cfg.px, cfg.workers).to(device))
    mix = encode_images(tae, render_all(scenes, cfg.mix_px, cfg.workers).to(device)) if cfg.mix_px else None
    rng = np.random.default_rng(cfg.seed + 7)
    noisy = [(s, world.noisy_caption(s, rng)) for s in world.pretraining_scenes(cfg.seed + 7, cfg.noise_captions)
             if s in index] if cfg.caption_noise > 0 else []
    captions = [""] + sorted({world.caption(s) for s in t2i_scenes} | {c for _, _, c in edits} | {c for _, c in noisy})
    cap_index = {c: i for i, c in enumerate(captions)}
    contexts = encode_captions(clip, captions)
    t2i = torch.tensor([[index[s], cap_index[world.caption(s)]] for s in t2i_scenes])
    edit_rows = torch.tensor([[index[r], index[t], cap_index[c]] for r, t, c in edits]).reshape(-1, 3)
    noisy_rows = torch.tensor([[index[s], cap_index[c]] for s, c in noisy]) if noisy else None
    channel_std = latents.std(dim=(0, 2, 3))
    stats = {"scenes": len(scenes), "latent_mean": float(latents.mean()), "latent_std": float(latents.std()),
             "latent_channel_std_min": float(channel_std.min()), "latent_channel_std_max": float(channel_std.max()),
             "captions": len(captions), "t2i_rows": len(t2i), "edit_rows": len(edit_rows),
             "noisy_rows": len(noisy), "noisy_examples": [c for _, c in noisy[:8]],
             "seconds": time.perf_counter() - start}
    if cfg.probe_heldout:
        held = world.HELDOUT_COMBOS[:cfg.probe_heldout]
        train = t2i_scenes[::3] if not cfg.dit_scenes else t2i_scenes
        probe_ctx = torch.cat([contexts[[cap_index[world.caption(s)] for s in train]],
                               encode_captions(clip, [world.caption(s) for s in held])])
        stats["te_probe"] = te_probe(probe_ctx, list(train) + list(held), [True] * len(train) + [False] * len(held))
    return DitData(latents, contexts.to(device), t2i, edit_rows, mix, noisy_rows), stats


def reconstruction_check(tae, cfg: PretrainConfig, device) -> dict:
    """The reader on VAE round trips of held-out scenes: do the latents carry colour, shape and position?"""
    n = cfg.recon_images
    scenes = world.heldout_scenes(cfg.seed, n)
    images = render_all(scenes, cfg.px, cfg.workers).to(device)
    rec = decode_latents(tae, encode_images(tae, images))
    pil = [_pil(r) for r in rec]
    return {"images": n, **score(pil, scenes), "mae": float((rec.cpu() - images.cpu().float() / 255).abs().mean())}


def _pil(chw: torch.Tensor):
    from PIL import Image

    return Image.fromarray((chw.permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8))


def score(images: list, scenes: list[world.Scene]) -> dict[str, float]:
    """Share of images whose reading matches the scene, per attribute (microworld.reader)."""
    matches = [reader.attributes_match(reader.read(im), s) for im, s in zip(images, scenes, strict=True)]
    return {k: float(np.mean([m[k] for m in matches])) for k in matches[0]}


def load_taef2(folder: Path, device) -> torch.nn.Module:
    """A saved taef2 pair (this script's output) as the TAESD module the training uses."""
    tae = new_taef2(0, "cpu")
    for part, name in models.TAEF2_FILES.items():
        getattr(tae, f"taesd_{part}").load_state_dict({k: v.float() for k, v in models.load_file(folder / name).items()})
    return tae.to(device).eval()


def save_weights(out: Path, tae, dit_sd: dict[str, torch.Tensor]) -> dict[str, Path]:
    from ..trainer.paths import atomic_save_safetensors

    paths = {"unet": atomic_save_safetensors(models.to_bfl(dit_sd), out / models.UNET_FILE)}
    for part, name in models.TAEF2_FILES.items():
        sd = {k: v.detach().to("cpu", torch.float16).contiguous()
              for k, v in getattr(tae, f"taesd_{part}").state_dict().items()}
        paths[part] = atomic_save_safetensors(sd, out / name)
    return paths


def evaluate(weights: Path, models_dir: Path, cfg: PretrainConfig, n: int, px: int,
             suffix: str = "") -> tuple[dict, list]:
    """Sample n held-out prompts at px x px through the stock loaders (from `models_dir`, ComfyUI's models/
    folder) at the pack's sampler settings; score them with the reader. `suffix` is appended to every
    prompt (an untrained trigger: does an unknown word break the prompt-following?)."""
    models.write_micro_models(models_dir, weights_dir=weights)
    model, clip, vae = models.load_micro_models(models_dir)
    scenes = world.heldout_scenes(cfg.seed, n)
    start = time.perf_counter()
    images = models.generate(model, clip, vae, [world.caption(s) + suffix for s in scenes], seed=cfg.seed,
                             steps=cfg.eval_steps, cfg=cfg.eval_cfg, px=px, batch=cfg.eval_batch)
    result = {"prompts": n, "px": px, "suffix": suffix, "steps": cfg.eval_steps, "cfg": cfg.eval_cfg, "sampler": "euler",
              "seconds": time.perf_counter() - start, **score(images, scenes)}
    return result, list(zip(images, scenes, strict=True))


def eval_grid(samples: list, path: Path, columns: int = 12) -> Path:
    """Samples (first rows) labelled by what the reader saw wrong: the picture a reader can check by eye."""
    from PIL import Image, ImageDraw

    from ..trainer.paths import atomic_save_image

    cell = 128
    rows = -(-len(samples) // columns)
    grid = Image.new("RGB", (columns * cell, rows * (cell + 12)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, (im, scene) in enumerate(samples):
        x, y = (i % columns) * cell, (i // columns) * (cell + 12)
        grid.paste(im.resize((cell, cell)), (x, y))
        wrong = [k for k, ok in reader.attributes_match(reader.read(im), scene).items() if not ok]
        draw.text((x + 2, y + cell), "ok" if not wrong else "x " + ",".join(w[:3] for w in wrong), fill=(0, 0, 0))
    return atomic_save_image(grid, path)


def text_encoder(cfg: PretrainConfig) -> tuple[object, dict]:
    """The micro CLIP and its record: the checksum of the weights used, and whether this torch regenerates them."""
    import comfy.utils

    from ..devtools import tiny_models

    regenerated = models.te_state_dict(check=False)
    used = comfy.utils.load_torch_file(cfg.te_file) if cfg.te_file else regenerated
    sha = models.state_dict_sha256(used)
    info = {"seed": models.TE_SEED, "sha256": sha, "trained": False, "dtype": "float16",
            "regenerated_here_matches": models.state_dict_sha256(regenerated) == sha,
            "regenerated_by": "microworld.models.te_state_dict (devtools.tiny_models.tiny_te_state_dict(seed), fp16)",
            "config": tiny_models.tiny_te_config(), "tokenizer_min_length": models.TE_MIN_TOKENS}
    return models.micro_clip(cfg.te_file or None), info


def manifest(out: Path, cfg: PretrainConfig, record: dict) -> dict:
    files = {p.name: {"sha256": models.file_sha256(p), "bytes": p.stat().st_size}
             for p in (out / models.UNET_FILE, *(out / n for n in models.TAEF2_FILES.values()))}
    return {"files": files, "seed": cfg.seed, "config": asdict(cfg),
            "diffusion_model": {**models.MICRO, "params": record["dit"]["params"], "steps": record["dit"]["total_steps"],
                                "phases": [h["dit"]["steps"] for h in record.get("history", [])]
                                + [record["dit"]["steps"]],
                                "final_loss": record["dit"]["final_loss"], "dtype": "bfloat16 (EMA weights)"},
            "vae": {"architecture": "taef2", "steps": record["vae"]["steps"], "final_loss": record["vae"]["final_loss"],
                    "final_mse": record["vae"]["final_mse"], "dtype": "float16"},
            "text_encoder": record["text_encoder"],
            "torch": torch.__version__}


def run(cfg: PretrainConfig, out: Path, device: torch.device) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    record: dict = {"config": asdict(cfg), "device": str(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu")}
    previous = json.loads((Path(cfg.resume) / "pretrain.json").read_text(encoding="utf-8")) if cfg.resume else None
    if previous is None:
        tae, record["vae"] = train_vae(render_all(world.autoencoder_scenes(cfg.seed, cfg.vae_images), cfg.px,
                                                  cfg.workers).to(device), cfg, device, autocast)
        record["vae"]["reconstruction_reader"] = reconstruction_check(tae, cfg, device)
        logging.info("vae: %s", record["vae"]["reconstruction_reader"])
    else:
        tae, record["vae"] = load_taef2(Path(cfg.resume), device), dict(previous["vae"])
        tuned = Path(cfg.resume) / "tune_vae.json"  # the pair fine-tuned by tune_vae.py since the last phase
        if tuned.exists():
            tune = json.loads(tuned.read_text(encoding="utf-8"))
            record["vae"]["tuned"] = {**tune, "curve": tune["curve"][::5]}
        if cfg.px != previous["config"].get("px", 128):  # the same (fully convolutional) VAE at the new size
            record["vae"][f"reconstruction_reader_{cfg.px}px"] = reconstruction_check(tae, cfg, device)
            logging.info("vae at %d px: %s", cfg.px, record["vae"][f"reconstruction_reader_{cfg.px}px"])
    clip, record["text_encoder"] = text_encoder(cfg)
    data, record["data"] = build_data(cfg, tae, clip, device)
    if previous is not None and "te_probe" in previous["data"]:
        record["data"].setdefault("te_probe", previous["data"]["te_probe"])
    logging.info("data: %s", {k: v for k, v in record["data"].items()})
    init = models.from_bfl(models.load_file(Path(cfg.resume) / models.UNET_FILE)) if previous is not None else None
    done = previous["dit"].get("total_steps", previous["dit"]["steps"]) if previous is not None else 0
    dit_sd, record["dit"] = train_dit(data, cfg, device, autocast, init, seed_offset=done)
    record["dit"]["total_steps"] = done + record["dit"]["steps"]
    record["dit"]["params"] = sum(v.numel() for v in dit_sd.values())
    if previous is not None:  # every earlier phase, oldest first, each with its config and loss curve
        earlier = previous.get("history") or ([previous["previous"]] if "previous" in previous else [])
        record["history"] = earlier + [{k: previous[k] for k in ("config", "dit", "device") if k in previous}]
    save_weights(out, tae, dit_sd)
    man = manifest(out, cfg, record)
    (out / "manifest.json").write_text(json.dumps(man, indent=1), encoding="utf-8")
    _write_record(out, record)
    if cfg.eval_prompts:
        import folder_paths

        record["eval"], samples = evaluate(out, Path(folder_paths.models_dir), cfg, cfg.eval_prompts, cfg.px)
        logging.info("eval: %s", record["eval"])
        if cfg.mix_px:  # the other resolution the model was trained at (the CPU tests sample at 128 px)
            record["eval_mix"], _ = evaluate(out, Path(folder_paths.models_dir), cfg, cfg.eval_prompts, cfg.mix_px)
            logging.info("eval at %d px: %s", cfg.mix_px, record["eval_mix"])
            man["eval_mix"] = record["eval_mix"]
        trigger = f", in {world.CONCEPTS['style'].trigger} style"  # never trained: the base should ignore it
        record["eval_trigger"], _ = evaluate(out, Path(folder_paths.models_dir), cfg, min(cfg.eval_prompts, 96),
                                             cfg.mix_px or cfg.px, suffix=trigger)
        logging.info("eval with %r: %s", trigger, record["eval_trigger"])
        man["eval_trigger"] = record["eval_trigger"]
        eval_grid(samples[:96], out / "eval_grid.png")
        man["eval"] = record["eval"]
        (out / "manifest.json").write_text(json.dumps(man, indent=1), encoding="utf-8")
    _write_record(out, record)
    return record


def _write_record(out: Path, record: dict) -> None:
    from ..trainer.paths import atomic_write_text

    atomic_write_text(json.dumps(record, indent=1), out / "pretrain.json")


def main(argv: list[str] | None = None) -> dict:
    from ..trainer.jobs import comfy_library, runner

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the weights, manifest and records")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (a smoke run at small step counts)")
    parser.add_argument("--comfyui", default=None, help="ComfyUI folder (default: COMFYUI_PATH)")
    for f in fields(PretrainConfig):
        parser.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{f.name: getattr(args, f.name) for f in fields(PretrainConfig)})
    args.out.mkdir(parents=True, exist_ok=True)
    base = args.out / "comfy"  # the evaluation's ComfyUI models/ folder (and ComfyUI's other folders)
    comfy_library.boot(runner.find_comfyui(args.comfyui), base, cpu=args.cpu)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    return run(cfg, args.out, device)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    main()
