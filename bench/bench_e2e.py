"""End to end (issue 5 item 5): the seed's style recipe on klein 4B with random weights, total wall time.

The run: rank 16, alpha 16, lr 3e-4, 600 steps at 1024², 20 training images (random latents, 512-token
contexts), 4 prompts sampled every 100 steps (50 steps, CFG 4, decoded). Both sides use the same random
weights, data and VAE (the real taef2 preview-VAE architecture with random weights: no weights reach
the GPU machine, and the full VAE's decode is the same for both).

  ours   trainer.training.loop.train_lora as KleinLoRATrainer runs it (style targets, compiled blocks), its
         LiveSampler on the checkpoint hook (compiled blocks, the suite's conditionings encoded once).
  comfy  ComfyUI's TrainLoraNode (600 steps, rank 16, lr 3e-4, bf16, no checkpointing: its fastest
         setting that fits), then KSampler + VAEDecode for the 4 prompts at each of the 6 checkpoints
         (TrainLoraNode cannot sample mid-run, so the samples are drawn after it: same work, same count).

usage: bench_e2e.py --impl ours|comfy [--steps 600] [--every 100] [--model tiny --res 256 --sample-steps 2]
       (writes $OUT/bench_e2e_<impl>.json)
Run the two on two GPUs at once: CUDA_VISIBLE_DEVICES=0 ... --impl ours & CUDA_VISIBLE_DEVICES=1 ... --impl comfy
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step as bs  # noqa: E402

PROMPTS = 4
IMAGES = 20


def setup(pcn, name: str, res: int):
    """Random 4B state dict, data, conditionings and the taef2 VAE (through ComfyUI's VAELoader)."""
    import folder_paths
    import torch
    from klein_lora_studio.devtools import tiny_models

    import nodes

    hidden, depth, single, ctx = pcn.SIZES[name]
    sd = {k: v.cpu() for k, v in pcn.random_sd(hidden, depth, single, ctx).items()}
    models = Path(tempfile.mkdtemp(prefix="e2e-models-"))  # one per process: the two impls run side by side
    tiny_models.write_tiny_models(models)  # taef2 (random) among them
    folder_paths.add_model_folder_path("vae_approx", str(models / "vae_approx"), is_default=True)
    vae = nodes.VAELoader().load_vae("taef2")[0]
    g = torch.Generator().manual_seed(0)
    latents = [torch.randn(128, res // 16, res // 16, generator=g) for _ in range(IMAGES)]
    contexts = [torch.randn(512, ctx, generator=g) for _ in range(IMAGES)]
    prompts = [[[torch.randn(1, 512, ctx, generator=g), {}]] for _ in range(PROMPTS)]
    negative = [[torch.randn(1, 512, ctx, generator=g), {}]]
    return sd, vae, latents, contexts, prompts, negative


def run_ours(pcn, name: str, res: int, steps: int, every: int, sample_steps: int) -> dict:
    import torch
    from klein_lora_studio.trainer.data.dataset import KleinDataset
    from klein_lora_studio.trainer.evaluation import sampling as sp
    from klein_lora_studio.trainer.model import targets as tg
    from klein_lora_studio.trainer.training import loop

    sd, vae, latents, contexts, prompts, negative = setup(pcn, name, res)
    t0 = time.perf_counter()
    patcher = bs.load_patcher(sd)
    data = KleinDataset(latents, contexts, ["style"] * IMAGES, [f"img{i}.png" for i in range(IMAGES)], res, "style",
                        "random")
    dm = patcher.model.diffusion_model
    preset = tg.PRESETS["style"]
    targets = tg.resolve_targets(preset.groups, preset.layers, tg.BlockCounts.of_model(dm), preset.streams,
                                 linear_names=tg.linear_layer_names(dm))
    suite = [sp.SuitePrompt(f"prompt {i}", f"p{i}", f"prompt {i}", True) for i in range(PROMPTS)]
    sampler = sp.LiveSampler(None, vae, suite, sp.SampleSettings(steps=sample_steps, cfg=4.0, seed=0, width=res, height=res),
                             conds=(prompts, negative))
    marks: dict[str, float] = {}
    sample_s = [0.0]

    def on_checkpoint(step, path, live):
        t = time.perf_counter()
        sampler(step, path, live)
        sample_s[0] += time.perf_counter() - t

    hooks = loop.TrainHooks(on_checkpoint=on_checkpoint,
                            on_step=lambda s, total, loss: marks.setdefault("first_step", time.perf_counter()))
    cfg = loop.TrainConfig(rank=16, alpha=16.0, learning_rate=3e-4, steps=steps, save_every=every, recipe="style",
                           output_name="e2e")
    with tempfile.TemporaryDirectory() as out, torch.inference_mode():
        result = loop.train_lora(patcher, data, targets, cfg, Path(out), hooks)
    total = time.perf_counter() - t0
    return dict(impl="ours", total_s=total, sampling_s=sample_s[0], training_s=total - sample_s[0],
                samples=len(sampler.columns) * PROMPTS, steps=steps, final_loss=result.losses[-1],
                peak_gib=bs.peak_gib(), to_first_step_s=marks["first_step"] - t0)


def run_comfy(pcn, name: str, res: int, steps: int, every: int, sample_steps: int) -> dict:
    import comfy.sd
    import comfy_extras.nodes_train as nt
    import torch

    import nodes

    sd, vae, latents, contexts, prompts, negative = setup(pcn, name, res)
    t0 = time.perf_counter()
    model = bs.load_patcher(sd)
    positive = [[contexts[0][None], {}]]
    with torch.inference_mode(False):
        trained = nt.TrainLoraNode.execute(
            model=[model], latents=[{"samples": torch.stack(latents)}], positive=[positive], batch_size=[1],
            steps=[steps], grad_accumulation_steps=[1], learning_rate=[3e-4], rank=[16], optimizer=["AdamW"],
            loss_function=["MSE"], seed=[0], training_dtype=["bf16"], lora_dtype=["bf16"],
            quantized_backward=[False], algorithm=["LoRA"], gradient_checkpointing=[False], checkpoint_depth=[1],
            offloading=[False], existing_lora=["[None]"], bucket_mode=[False], bypass_mode=[False])
    bs.cuda_sync()
    t1 = time.perf_counter()
    lora_model = comfy.sd.load_lora_for_models(model, None, trained[0], 1.0, 0)[0]  # what Load LoRA Model does
    n = 0
    empty = {"samples": torch.zeros(1, 128, res // 16, res // 16)}
    with torch.inference_mode():
        for _ in range(steps // every):
            for positive_i in prompts:
                latent = nodes.common_ksampler(lora_model, 0, sample_steps, 4.0, "euler", "simple", positive_i, negative,
                                               empty)[0]
                vae.decode(latent["samples"])
                n += 1
    bs.cuda_sync()
    total = time.perf_counter() - t0
    return dict(impl="comfy", total_s=total, training_s=t1 - t0, sampling_s=total - (t1 - t0), samples=n, steps=steps,
                peak_gib=bs.peak_gib())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--impl", choices=("ours", "comfy"), required=True)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--every", type=int, default=100)
    ap.add_argument("--model", default="klein4b", help="klein4b, or tiny for a CPU smoke run")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--sample-steps", type=int, default=50)
    a = ap.parse_args()
    pcn = bs.setup_comfy()
    fn = run_ours if a.impl == "ours" else run_comfy
    row = bs.guarded(fn, dict(model=a.model, res=a.res, gc=False, impl=a.impl), pcn, a.model, a.res, a.steps, a.every,
                   a.sample_steps)
    with open(os.path.join(bs.OUT, f"bench_e2e_{a.impl}.json"), "w") as f:
        json.dump(dict(env=bs.env_info(), row=row), f, indent=1)


if __name__ == "__main__":
    main()
