"""Teach the committed micro taef2 the pastel style, keeping the latents of everything else where they are.

    python -m klein_lora_studio.microworld.tune_vae --out DIR      # then: quality.load_models("micro", DIR)

The style concept became a palette (world.py: the shape's colour mixed 40% toward white), which the committed
VAE, trained when the style was stripes, has never seen: its round trip reads the pastel on 58% of held-out
style scenes and their colour on 54% (pastel red decodes yellowish), and its encoder crowds the eight pastels
together (latent distance 2-3 between pastels against >= 4.1 between any two pure colours). This fine-tunes
encoder and decoder together from the committed pair on world images of every look with the style at ~32%,
the usual reconstruction loss (MSE + L1 with latent noise 0.1), plus an anchor: on every image that is not
in the style, the squared distance of the latent to the committed encoder's. The diffusion model was
pretrained on those latents, so it keeps working unchanged (the unet is copied as it is). Seeded; on this
2-core CPU 400 steps of 8 took ~33 min. The output folder is a weights folder (unet, taef2 pair,
tune_vae.json with config, loss curve and the round-trip reading) that models.write_micro_models takes.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class TuneConfig:
    steps: int = 400
    batch: int = 8
    lr: float = 3e-4
    images: int = 1200
    style_share: float = 0.3  # share of the base scenes (concept None) turned into the style, on top of the mix
    anchor: float = 1.0  # weight of the latent anchor on the images that are not in the style
    latent_noise: float = 0.1  # as the pretraining's VAE
    scene_seed: int = 16  # world.autoencoder_scenes' seed (the pretraining's)
    seed: int = 0
    check_scenes: int = 144  # held-out scenes whose round trip is read at the end


def tune_scenes(cfg: TuneConfig) -> list:
    """Every look of the world (world.autoencoder_scenes), with more of the style than the pretraining mix."""
    from . import world

    rng = np.random.default_rng(1)
    scenes = world.autoencoder_scenes(cfg.scene_seed, cfg.images)
    return [world.with_concept(s, "style") if s.concept is None and rng.random() < cfg.style_share else s
            for s in scenes]


def tune(cfg: TuneConfig, device: str = "cpu"):
    """The fine-tuned TAESD module (eval mode, on the CPU) and its record."""
    import torch

    from . import models, pretrain

    torch.manual_seed(cfg.seed)
    tae = pretrain.load_taef2(models.WEIGHTS, device)
    scenes = tune_scenes(cfg)
    images = pretrain.render_all(scenes, 128, 1).to(device)
    with torch.no_grad():
        anchors = torch.cat([tae.taesd_encoder(images[i:i + 64].float() / 255) for i in range(0, len(images), 64)])
    enc, dec = tae.taesd_encoder.train(), tae.taesd_decoder.train()
    anchored = torch.tensor([s.concept != "style" for s in scenes], device=device)
    opt = torch.optim.AdamW([*dec.parameters(), *enc.parameters()], lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    curve, start = [], time.perf_counter()
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = pretrain._lr(step, cfg.steps, cfg.lr, 20, 0.05)
        idx = torch.randint(len(images), (cfg.batch,), generator=g).to(device)
        x = images[idx].float() / 255
        z = enc(x)
        keep = anchored[idx]
        drift = (z[keep] - anchors[idx][keep]).pow(2).mean() if keep.any() else z.sum() * 0
        rec = dec(z + cfg.latent_noise * torch.randn(z.shape, generator=g).to(device))
        loss = torch.nn.functional.mse_loss(rec, x) + (rec - x).abs().mean() + cfg.anchor * drift
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        curve.append([step, loss.detach(), drift.detach()])  # read back at the end: no sync per step
        if step % 50 == 0 or step == cfg.steps - 1:
            logging.info("tune_vae step %d/%d loss %.4f drift %.5f (%.0f s)", step, cfg.steps, float(curve[-1][1]),
                         float(curve[-1][2]), time.perf_counter() - start)
    curve = [[step, float(loss), float(drift)] for step, loss, drift in curve]
    record = {"device": str(device), "config": asdict(cfg), "seconds": time.perf_counter() - start,
              "curve": curve[::10] + curve[-1:],
              "style_share": float(np.mean([s.concept == "style" for s in scenes]))}
    return tae.cpu().eval(), record


def round_trip_reading(tae, n: int) -> dict:
    """The reader on round trips of n held-out scenes, plain and in the style: style present, colour right."""
    import torch

    from . import reader, world

    out = {}
    for concept in (None, "style"):
        scenes = [world.with_concept(s, concept) for s in world.heldout_scenes(7, n)]
        with torch.no_grad():
            x = torch.stack([torch.from_numpy(np.asarray(world.render(s), np.float32) / 255).permute(2, 0, 1)
                             for s in scenes])
            back = tae.taesd_decoder(tae.taesd_encoder(x)).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        reads = [reader.read(im) for im in back]
        out[concept or "plain"] = {"style_present": float(np.mean([r.style for r in reads])),
                                   "colour": float(np.mean([r.colour == s.colour for r, s in zip(reads, scenes,
                                                                                                  strict=True)]))}
    return out


def save(tae, record: dict, out: Path) -> None:
    import torch

    from ..trainer.paths import atomic_save_safetensors, atomic_write_text
    from . import models

    out.mkdir(parents=True, exist_ok=True)
    for name in (models.UNET_FILE, "pretrain.json"):  # a weights folder pretrain.py --resume continues from
        shutil.copy(models.WEIGHTS / name, out / name)
    for part, name in models.TAEF2_FILES.items():
        sd = {k: v.detach().to(torch.float16).contiguous() for k, v in getattr(tae, f"taesd_{part}").state_dict().items()}
        atomic_save_safetensors(sd, out / name)
    record["sha256"] = {name: models.file_sha256(out / name) for name in models.TAEF2_FILES.values()}
    atomic_write_text(json.dumps(record, indent=1) + "\n", out / "tune_vae.json")


def install(out: Path, into: Path) -> dict:
    """Put the tuned pair from `out` into the weights folder `into` (a pretraining's output, e.g. one resumed from
    an earlier tune's folder) and point its manifest at them: sha256 and size per file, the tune's record."""
    from ..trainer.paths import atomic_write_text
    from . import models

    man = json.loads((into / "manifest.json").read_text(encoding="utf-8"))
    for name in models.TAEF2_FILES.values():
        shutil.copy(out / name, into / name)
        man["files"][name] = {"sha256": models.file_sha256(into / name), "bytes": (into / name).stat().st_size}
    tuned = json.loads((out / "tune_vae.json").read_text(encoding="utf-8"))
    man["vae"]["tuned"] = {k: tuned[k] for k in ("config", "round_trip", "device", "seconds")}
    atomic_write_text(json.dumps(man, indent=1), into / "manifest.json")
    return man


def main(argv: list[str] | None = None) -> dict:
    import os
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="the weights folder to write")
    ap.add_argument("--into", type=Path, default=None, help="also install the pair into this weights folder (install())")
    for name, value in asdict(TuneConfig()).items():
        ap.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    from ..trainer.jobs import comfy_library

    device = "cuda" if torch.cuda.is_available() else "cpu"
    comfy_library.boot(os.environ.get("COMFYUI_PATH", ""), tempfile.mkdtemp(prefix="tune-vae-"), cpu=device == "cpu")
    cfg = TuneConfig(**{k: getattr(args, k) for k in asdict(TuneConfig())})
    tae, record = tune(cfg, device)
    record["round_trip"] = round_trip_reading(tae, cfg.check_scenes)
    logging.info("round trip: %s", record["round_trip"])
    save(tae, record, args.out)
    if args.into is not None:
        install(args.out, args.into)
    return record


if __name__ == "__main__":
    main()
