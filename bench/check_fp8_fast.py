"""Does training work on a model loaded with weight_dtype fp8_e4m3fn_fast (ComfyUI's fp8 matmuls)?

One train_step on the tiny klein on CUDA, fp8_e4m3fn vs fp8_e4m3fn_fast, same inputs and LoRA init: the loss,
and the gradient norm of every LoRA A/B pair (fp8 matmuls may not pass gradients back to earlier layers).
usage (GPU machine, bench/README.md set-up): python3 bench/check_fp8_fast.py
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_step as bs  # noqa: E402


def step(sd, fast: bool) -> dict:
    import torch
    from klein_lora_studio.trainer.lora.layers import lora_layers
    from klein_lora_studio.trainer.model import targets as tg
    from klein_lora_studio.trainer.model.checkpointing import block_options
    from klein_lora_studio.trainer.training import loop

    patcher = bs.load_patcher(sd, torch.float8_e4m3fn, fast)
    with torch.inference_mode(False), torch.enable_grad():
        work = loop._training_model(patcher)
        dm = work.model.diffusion_model
        targets = tg.resolve_targets(tg.GROUPS, "attention", tg.BlockCounts.of_model(dm),
                                     linear_names=tg.linear_layer_names(dm))
        with lora_layers(dm, targets.modules, 4, 4, seed=0) as lora, loop.comfy_training_mode():
            g = torch.Generator().manual_seed(5)
            with torch.no_grad():
                for p in lora.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            x0 = torch.randn(2, 128, 32, 32, generator=g)
            ctx = torch.randn(2, 64, 192, generator=g)
            loss = loop.train_step(dm, work, x0, ctx, torch.Generator().manual_seed(9), work.load_device,
                                   work.model.get_dtype_inference(), block_options(dm, False, False),
                                   torch.autocast("cuda", dtype=torch.bfloat16))
            grads = [float(p.grad.norm()) if p.grad is not None else None for p in lora.parameters()]
    bs.free_comfy()
    return dict(fast=fast, loss=float(loss), grad_norms=grads)


def main() -> None:
    import torch
    from klein_lora_studio.devtools import tiny_models

    bs.setup_comfy()
    sd = {k: v.to(torch.bfloat16) for k, v in tiny_models.flux2_state_dict(**tiny_models.TINY).items()}
    rows = [bs.guarded(step, dict(model="tiny", res=512, gc=False, fast=f), sd, f) for f in (False, True)]
    with open(os.path.join(bs.OUT, "check_fp8_fast.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
