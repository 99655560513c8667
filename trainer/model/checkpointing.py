"""Make ComfyUI's flux blocks safe to differentiate, and checkpoint them per block.

ComfyUI's Double/SingleStreamBlock update the residual stream in place (`x += ...`) after a
LayerNorm has saved that same tensor for backward. Under CUDA autocast the norm saves an fp32 copy,
so inference-oriented code never notices; in fp32 (the CPU) backward fails with "modified by an
inplace operation" (ComfyUI's own trainer fails the same way there). `inplace_safe_norms` gives each
block LayerNorm a private copy of its input for the duration of the run, only where autocast would
not already have made one. Compiled blocks need none of this: torch.compile functionalises the
in-place adds and saves what backward needs itself.

Gradient checkpointing and torch.compile go through ComfyUI's own block-replace hook, so nothing on
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
    if x.device.type == "cuda" and torch.is_autocast_enabled("cuda") and x.dtype != torch.float32:
        return None  # CUDA autocast hands layer_norm a float32 copy already (CPU autocast does not)
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


class _Double(torch.nn.Module):
    """Calls a double block on clones of its residual inputs: the block adds into them in place."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, img, txt, vec, pe, mask, opts):
        return self.block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe, attn_mask=mask, transformer_options=opts)


class _Single(torch.nn.Module):
    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, img, vec, pe, mask, opts):
        return self.block(img.clone(), vec=vec, pe=pe, attn_mask=mask, transformer_options=opts)


def _streamed(wrapper: torch.nn.Module, streamer, index: int):
    """The wrapper called with its block's weights on the device (trainer/model/block_stream.py): the staging sits
    outside the compiled wrapper and inside the checkpointed function, so the recompute fetches them again."""
    def call(*args):
        with streamer.use(index):
            return wrapper(*args)
    return call


def _replacement(wrapper: torch.nn.Module, double: bool, recompute: bool, streamer=None, index: int = 0):
    block = wrapper if streamer is None else _streamed(wrapper, streamer, index)

    def run(args: dict, extra: dict) -> dict:
        opts = dict(args["transformer_options"])  # snapshot: forward_orig mutates the dict per block
        streams = (args["img"], args["txt"]) if double else (args["img"],)
        call = (block, *streams, args["vec"], args["pe"], args.get("attn_mask"), opts)
        out = checkpoint(*call, use_reentrant=False) if recompute else block(*call[1:])
        return {"img": out[0], "txt": out[1]} if double else {"img": out}
    return run


def block_options(diffusion_model: torch.nn.Module, recompute: bool, compile_blocks: bool, streamer=None) -> dict:
    """transformer_options that run every block through a wrapper: recomputed in backward and/or compiled, and
    for the blocks a `streamer` streams, fetched around each call and always recomputed (without it autograd would
    hold each streamed weight from the forward to the backward, trainer/model/block_stream.py).

    The wrappers are new modules holding the model's blocks: compiling them leaves the model itself
    untouched (no compiled-call state on shared modules). Cloning the residual inputs inside the
    wrapper keeps the compiled graph's in-place add off tensors that backward still needs.
    """
    streamed = set(streamer.streamed) if streamer is not None else set()
    if not (recompute or compile_blocks or streamed):
        return {}
    method = getattr(getattr(diffusion_model, "params", None), "default_ref_method", None)
    if (recompute or streamed) and method == "index_timestep_zero":
        raise ValueError("gradient checkpointing (which offload_blocks uses for the streamed blocks) does not support "
                         "the 'index_timestep_zero' reference method: turn gradient_checkpointing off and set "
                         "offload_blocks to 'off', or use the model's default reference method.")
    replace = {}
    order = 0  # the block's index in execution order (double blocks, then single blocks)
    for kind, blocks, wrap in (("double_block", diffusion_model.double_blocks, _Double),
                               ("single_block", diffusion_model.single_blocks, _Single)):
        for i, block in enumerate(blocks):
            wrapper = wrap(block)
            if compile_blocks:
                wrapper.compile()
            stream = streamer if order in streamed else None
            replace[(kind, i)] = _replacement(wrapper, kind == "double_block", recompute or stream is not None,
                                              stream, order)
            order += 1
    return {"patches_replace": {"dit": replace}}
