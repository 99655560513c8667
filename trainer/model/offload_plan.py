"""How many frozen blocks stay on the card when the rest stream from CPU memory (`offload_blocks`), in numbers.

Pure functions, no torch: the trainer measures the card's free memory and the model's block sizes, this module
turns them and the run's needs into a count. The needs are estimates from sizes (not measurements):

- activations: a checkpointed block keeps only its input stream (tokens x width) until backward, plus one
  block's forward and backward in flight while it is recomputed (`BLOCK_PEAK_WIDTHS` widths per token: a
  klein single block's linear1 writes 9 widths per token - q, k, v and the gated MLP's 6 -, linear2 reads 4, and
  autocast keeps float32 copies around the norms; measured, not derived: see the constant); a block that is not
  checkpointed keeps all of that for backward;
- the LoRA: its float32 parameters and gradients and the optimizer's moments (AdamW 8 bytes per parameter,
  torchao's AdamW8bit 2, Adafactor's factored moments ~0);
- in flight: the streamed block in use and the next one being copied (two of the largest streamed blocks);
- the caching allocator's reserve above what is allocated (`RESERVE_SHARE`): a card-size limit counts reserved
  memory, and a plan that fills the card with allocations alone runs out once fragmentation grows;
- `MARGIN`: what the estimates do not cover (cuBLAS workspaces, compiled kernels).

The resident blocks are the first ones in execution order (double blocks, then single blocks): the copy of the
first streamed block then overlaps the resident blocks' forward, and after the backward reaches the streamed
blocks' start the resident blocks' backward covers the copy that the next step's forward begins with.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence

OFF, AUTO = "off", "auto"
# Per token, in the compute dtype: one block's forward + backward working set. Measured on the H200 (bench/RESULTS.md,
# klein 4B 1024² streamed under 4 GiB, session 8): steady peak 3.418 GiB less the weights on the card, the copies in
# flight and the LoRA's state left ~1.44 GiB of activations, 55 widths of 4,608 tokens x 3,072; less the 25 kept
# block inputs, ~30 in flight (the first estimate, 24, planned 9B under 8 GiB into an out-of-memory first step).
BLOCK_PEAK_WIDTHS = 32
# The allocator's reserve over its allocated peak, measured uncapped on the same runs: klein 4B 6.20 GiB reserved for
# a 5.60 GiB peak (+10.7%), 9B 12.22 for 11.41 (+7.1%).
RESERVE_SHARE = 0.10
MARGIN = 512 * 2**20  # bytes the estimates leave free beyond that (workspaces, compiled kernels)
OPTIMIZER_MOMENT_BYTES = {"AdamW": 8, "AdamW8bit": 2, "Adafactor": 0}


def parse_choice(value: str) -> str | int:
    """'off', 'auto' or the number of resident blocks; a clear error naming the field otherwise."""
    text = str(value).strip().lower()
    if text in (OFF, AUTO):
        return text
    if text.isdigit():
        return int(text)
    raise ValueError(f"offload_blocks '{value}' is not 'off', 'auto' or a number of blocks to keep on the GPU "
                     "(0 or more): use 'off' to keep the whole base on the GPU, 'auto' to stream only what does "
                     "not fit.")


def image_tokens(height: int, width: int) -> int:
    """Latent tokens of a klein image (16 px per token side: the VAE's 8x and the 2x2 patches)."""
    return (height // 16) * (width // 16)


def activation_bytes(hidden: int, tokens: int, batch: int, checkpointed: Sequence[bool], dtype_bytes: int = 2) -> int:
    """Activation memory of one step: per block its kept input (checkpointed) or its whole working set, plus one
    block's working set in flight."""
    per_width = batch * tokens * hidden * dtype_bytes
    kept = sum(per_width if ckpt else BLOCK_PEAK_WIDTHS * per_width for ckpt in checkpointed)
    return kept + BLOCK_PEAK_WIDTHS * per_width


def lora_bytes(lora_params: int, optimizer: str) -> int:
    """The LoRA's float32 parameters and gradients and its optimizer's moments."""
    return lora_params * (4 + 4 + OPTIMIZER_MOMENT_BYTES.get(optimizer, 8))


def in_flight_bytes(streamed_blocks: Sequence[int]) -> int:
    """The streamed block in use and the next one on its way: two of the largest."""
    return 2 * max(streamed_blocks, default=0)


def device_bytes(resident: int, blocks: Sequence[int], fixed: int, needs: int) -> int:
    """The card's use with the first `resident` blocks kept: the non-block weights (`fixed`), those blocks, two
    streamed blocks in flight, and the run's needs."""
    return fixed + sum(blocks[:resident]) + in_flight_bytes(blocks[resident:]) + needs


def planned_bytes(resident: int, blocks: Sequence[int], fixed: int, needs: int, margin: int = MARGIN,
                  reserve: float = RESERVE_SHARE) -> int:
    """What the card must have free for the plan: its use, the allocator's reserve over it, and the margin."""
    return int(device_bytes(resident, blocks, fixed, needs) * (1 + reserve)) + margin


def fits(resident: int, free: int, blocks: Sequence[int], fixed: int, needs: Callable[[int], int],
         margin: int = MARGIN, reserve: float = RESERVE_SHARE) -> bool:
    return planned_bytes(resident, blocks, fixed, needs(resident), margin, reserve) <= free


def resident_blocks(free: int, blocks: Sequence[int], fixed: int, needs: Callable[[int], int],
                    margin: int = MARGIN, reserve: float = RESERVE_SHARE) -> int:
    """The most blocks (the first, in execution order) that fit in `free` bytes with the rest streamed; every block
    when the whole base fits, 0 when not even streaming everything fits (the run then starts and may still fit: the
    needs are estimates). `needs(n)`: the run's needs with `n` blocks resident (streamed blocks are checkpointed)."""
    return next((n for n in range(len(blocks), -1, -1) if fits(n, free, blocks, fixed, needs, margin, reserve)), 0)
