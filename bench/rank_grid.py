"""The workshop's rank x steps grid through the pack's own Klein Rank x Steps Grid node (issue 18 item 3), on the
micro models: one held-out prompt, one seed, one image per LoRA, rows by rank and columns by steps (read from each
file's metadata), as a user's graph would make it.

    python bench/rank_grid.py --base BASE --prompt "..." --out docs/images/grid.png LORA.safetensors [LORA ...]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import quality  # noqa: E402  (bench/quality.py: boots ComfyUI as a library, the pack importable)


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("loras", nargs="+", type=Path, help="LoRA files (the trainer's checkpoints and final files)")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--out", type=Path, required=True, help="the grid's PNG")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", type=Path, default=None,
                    help="the ComfyUI base the LoRAs were trained in (the node reads LoRAs from its models/loras only)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    quality.boot_comfy(args.base or Path(tempfile.mkdtemp(prefix="klein-grid-")))
    from klein_lora_studio.microworld import quality as q
    from klein_lora_studio.nodes.rank_steps_grid import KleinRankStepsGrid
    from klein_lora_studio.trainer.evaluation import sampling as sp
    from klein_lora_studio.trainer.paths import atomic_save_image

    models = q.load_models("micro")
    out = KleinRankStepsGrid.execute(models.unet(), models.clip, models.vae, "\n".join(str(p) for p in args.loras),
                                     args.prompt, args.steps, sp.BASE_CFG, args.seed, 128)
    image = sp.to_pil(out.args[0][0])
    return atomic_save_image(image, args.out)


if __name__ == "__main__":
    main()
