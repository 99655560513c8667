"""Make ComfyUI's flux blocks safe to differentiate, and checkpoint them per block.

ComfyUI's Double/SingleStreamBlock update the residual stream in place (`x += ...`) after a
LayerNorm has saved that same tensor for backward. Under CUDA autocast the norm saves an fp32 copy,
so inference-oriented code never notices; in fp32 (the CPU) backward fails with "modified by an
inplace operation" (ComfyUI's own trainer fails the same way there). `inplace_safe_norms` gives each
block LayerNorm a private copy of its input for the duration of the run, only where autocast would
not already have made one.

Gradient checkpointing goes through ComfyUI's own block-replace hook.

The blocks are wrapped per call through `transformer_options["patches_replace"]["dit"]`, so nothing on
the model changes. The wrapper calls the block module it was built for instead of the hook's
`original_block` closure: that closure reads the loop variable `block` when it runs, and by the time
backward recomputes it the loop has moved on to the last block.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint


def _private_input(module, args):
    x = args[0]
    if torch.is_autocast_enabled(x.device.type) and x.dtype != torch.float32:
        return None  # autocast hands layer_norm a float32 copy already
    return (x.clone(), *args[1:])


@contextmanager
def inplace_safe_norms(diffusion_model: torch.nn.Module):
    """Pre-hooks on every LayerNorm inside the blocks, removed on exit."""
    handles = [m.register_forward_pre_hook(_private_input)
               for blocks in (diffusion_model.double_blocks, diffusion_model.single_blocks)
               for m in blocks.modules() if isinstance(m, torch.nn.LayerNorm)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _double(block: torch.nn.Module):
    def run(args: dict, extra: dict) -> dict:
        opts = dict(args["transformer_options"])  # snapshot: forward_orig mutates the dict per block
        mask = args.get("attn_mask")

        def fwd(img, txt, vec, pe):  # clones: the block adds into its inputs in place
            return block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, attn_mask=mask, transformer_options=opts)

        img, txt = checkpoint(fwd, args["img"], args["txt"], args["vec"], args["pe"], use_reentrant=False)
        return {"img": img, "txt": txt}
    return run


def _single(block: torch.nn.Module):
    def run(args: dict, extra: dict) -> dict:
        opts = dict(args["transformer_options"])
        mask = args.get("attn_mask")

        def fwd(img, vec, pe):
            return block(img.clone(), vec=vec, pe=pe, attn_mask=mask, transformer_options=opts)

        return {"img": checkpoint(fwd, args["img"], args["vec"], args["pe"], use_reentrant=False)}
    return run


def checkpointing_options(diffusion_model: torch.nn.Module) -> dict:
    """transformer_options that recompute every block's activations in backward."""
    method = getattr(getattr(diffusion_model, "params", None), "default_ref_method", None)
    if method == "index_timestep_zero":
        raise ValueError("gradient checkpointing does not support the 'index_timestep_zero' reference method: "
                         "turn gradient_checkpointing off or use the model's default reference method.")
    replace = {("double_block", i): _double(b) for i, b in enumerate(diffusion_model.double_blocks)}
    replace.update({("single_block", i): _single(b) for i, b in enumerate(diffusion_model.single_blocks)})
    return {"patches_replace": {"dit": replace}}
