"""Frozen blocks streamed from CPU memory (`offload_blocks`): the first blocks stay on the card, the others live in
pinned host memory and are copied host -> device one block ahead of use, in the forward and in backward's
recompute, on a copy stream of their own, into one of two device buffers that the next fetch but one writes again
(what backward saved of a copy is read before that); nothing is copied back (the weights are frozen). A use sets
each copy as an object of its own in the
module, never into the block's Parameter (`_Slot` says why: the first GPU run). The LoRA parameters, the non-block
layers and the resident blocks stay on the card.

What is reused from ComfyUI and what is not:
- Between uses a streamed block is in ComfyUI's own low-VRAM form: its weights in (pinned) CPU memory and
  `comfy_cast_weights` on, as `ModelPatcher.load(lowvram_model_memory=...)` leaves the layers it offloads. Anything
  else that runs the model meanwhile (the checkpoint sampler) goes through ComfyUI's per-layer cast
  (`comfy.ops.cast_bias_weight`), and host memory is pinned with `comfy.model_management.pin_memory`, within
  ComfyUI's pinned-memory budget. (The live sampler's compiled blocks then trace that per-layer path; on the GPU
  that is untested so far.)
- The steps do not use that per-layer path: it casts each linear on the compute stream's schedule just before the
  product (no block ahead), and autograd keeps every cast weight alive from the forward to the backward, so all
  streamed weights would sit on the card at the peak. Nor ComfyUI's choice of what to offload: `load()` offloads
  by layer size over the whole model, not whole blocks, and its offload streams (`get_offload_stream`) rotate and
  sync per layer and return none under torch.compile. Here a whole block is staged on one copy stream, ordered with
  an event, and a streamed block always runs under non-reentrant checkpointing (trainer/model/checkpointing.py),
  so between its forward and its recompute no weight of it is held.
- Nor `comfy.model_management.cast_to` for the copies: it allocates a new tensor per copy. Here every fetch copies
  into one of two device buffers made once per run (`_CopyBuffers`), each the size of the largest streamed block, so
  the card's use is fixed for the whole run: allocating per fetch on the copy stream and handing each copy to the
  compute stream (`record_stream`) left the caching allocator two pools that churn at every block, and the first
  GPU soak under a 4 GiB cap ran out of memory after a few hundred steps that way (bench/RESULTS.md). A buffer is
  written again only after the compute stream has passed everything issued before the fetch (an event), which
  covers the last block that used it: its backward is issued before the recompute that asks for the next copy.

Prefetch order: forward, the next streamed block; in backward (the recompute), the previous one. The last
streamed block stays for its own recompute, which comes first in backward, and the first stays for the next
step's forward, which begins with it. On the CPU nothing is saved by streaming, so it runs only when forced
(`KLEIN_LORA_STREAM_ON_CPU=1`, the tests): the "device copy" is then a separate tensor, so a test can see the
weights fetched before use, absent between uses and freed after.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from . import offload_plan

FORCE_ON_CPU_ENV = "KLEIN_LORA_STREAM_ON_CPU"
ALIGN = 256  # bytes: where each tensor of a block starts in a copy buffer (any dtype's view is aligned there)


def forced_on_cpu() -> bool:
    return os.environ.get(FORCE_ON_CPU_ENV, "") == "1"


def execution_order(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks as a flux forward runs them: double blocks, then single blocks."""
    return [*diffusion_model.double_blocks, *diffusion_model.single_blocks]


def _set(module: torch.nn.Module, name: str, is_param: bool, value: torch.Tensor) -> None:
    if is_param:
        module._parameters[name].data = value  # the Parameter object stays (peft and the block keep it)
    else:
        module._buffers[name] = value


def _tensors(module: torch.nn.Module) -> Iterator[tuple[str, bool, torch.Tensor]]:
    for name, p in module._parameters.items():
        if p is not None:
            yield name, True, p
    for name, b in module._buffers.items():
        if b is not None:
            yield name, False, b


@dataclass
class _Slot:
    """One frozen tensor of a streamed block: where it is set, its host copy, and the object set between uses (the
    module's own Parameter, whose data is the host copy, or the host buffer itself).

    A use sets a new object in its place (`put`), never the Parameter's `.data`. Under checkpointing, autograd hands
    a saved frozen parameter to the saved-tensor hooks as the Parameter object itself, and the recompute's hook keeps
    a tensor that needs no grad as it is (ops such as rms_norm or a product save their weight argument; compiled
    blocks save their parameter inputs); the block's backward reads it after the recompute's use has ended. A `.data`
    swap back to the host then changed what backward read into the host tensor (the first GPU run of issue 19:
    "CheckpointError: Recomputed values ... have different metadata", an fp8 [128] norm scale saved on cuda:0, cpu
    when checked). A copy set as an object of its own stays what autograd saved, until backward frees it.
    """

    module: torch.nn.Module
    name: str
    is_param: bool
    host: torch.Tensor
    home: torch.Tensor

    def put(self, value: torch.Tensor) -> None:
        (self.module._parameters if self.is_param else self.module._buffers)[self.name] = value

    def at_home(self) -> None:
        self.put(self.home)

    def device_copy(self, copy: torch.Tensor) -> torch.Tensor:
        """The object a use sets: a Parameter of its own for a parameter (the block's code and torch.compile's
        guards see the type they saw before), the copy itself for a buffer."""
        return torch.nn.Parameter(copy, requires_grad=False) if self.is_param else copy


class BlockStreamer:
    """Streams the frozen tensors of the blocks at `streamed` (indices in execution order) to `device`."""

    def __init__(self, blocks: Sequence[torch.nn.Module], streamed: Sequence[int], device: torch.device,
                 comfy_model=None):
        self.blocks, self.streamed, self.device = list(blocks), sorted(streamed), torch.device(device)
        self.comfy_model = comfy_model  # the ComfyUI BaseModel, let go of by ComfyUI's loader around the run
        self.copy_stream = None
        self._slots: dict[int, list[_Slot]] = {}
        self._staged: dict[int, tuple[list[torch.Tensor], object]] = {}
        self._active: dict[int, list[torch.Tensor]] = {}
        self._moved: list[tuple[torch.nn.Module, str, bool, torch.Tensor]] = []
        self._pinned: list[torch.Tensor] = []
        self._cast_flags: dict[int, list[tuple[torch.nn.Module, bool, bool]]] = {}  # (module, own attribute, value)
        self._offsets: dict[int, list[int]] = {}  # block -> where each of its slots starts in a copy buffer
        self._buffers: list[torch.Tensor] = []  # the copy buffers, made at the first fetch
        self._buffer_bytes = 0  # one buffer: the largest streamed block's layout
        self._buffer_of: dict[int, int] = {}  # block -> the buffer its live copies are in
        self.fetches = 0  # block copies made (a test and the bench read these)
        self.max_live = 0  # most blocks with a device copy at once

    # ------------------------------------------------------------ placement for the run

    @contextmanager
    def streaming(self, diffusion_model: torch.nn.Module):
        """Place the model for the run (after the LoRA and fp8 layers are in), put everything back on exit."""
        self.place(diffusion_model)
        try:
            yield self
        finally:
            self.restore()

    def place(self, diffusion_model: torch.nn.Module) -> None:
        owner = {id(m): i for i in self.streamed for m in self.blocks[i].modules()}
        if self.device.type == "cuda":
            self.copy_stream = torch.cuda.Stream(self.device)
        for module in diffusion_model.modules():
            block = owner.get(id(module))
            for name, is_param, t in list(_tensors(module)):
                if is_param and t.requires_grad:  # the LoRA: resident and trainable, trained values kept at the end
                    module._parameters[name].data = t.data.to(self.device)
                elif block is None:
                    data = t.data if is_param else t
                    self._moved.append((module, name, is_param, data))
                    _set(module, name, is_param, data.to(self.device))
                else:
                    host = self._host(module, name, is_param, t)
                    home = module._parameters[name] if is_param else host
                    self._slots.setdefault(block, []).append(_Slot(module, name, is_param, host, home))
            if block is not None and getattr(type(module), "comfy_cast_weights", None) is not None:  # ComfyUI's ops
                own = "comfy_cast_weights" in vars(module)
                self._cast_flags.setdefault(block, []).append((module, own, module.comfy_cast_weights))
                module.comfy_cast_weights = True  # ComfyUI's mark of a layer whose weights live off the card
        layouts = {block: _layout(slots) for block, slots in self._slots.items()}
        self._offsets = {block: offsets for block, (offsets, _) in layouts.items()}
        self._buffer_bytes = max((size for _, size in layouts.values()), default=0)
        streamed = sum(s.host.nbytes for slots in self._slots.values() for s in slots)
        logging.info("Klein LoRA: %d of %d blocks stream from CPU memory (%.2f GiB), %d stay on %s",
                     len(self.streamed), len(self.blocks), streamed / 2**30, len(self.blocks) - len(self.streamed),
                     self.device)

    def _host(self, module: torch.nn.Module, name: str, is_param: bool, t: torch.Tensor) -> torch.Tensor:
        """The tensor's home between uses: itself when it is in CPU memory (pinned in place on CUDA), else a copy."""
        data = t.data if is_param else t
        if data.device.type != "cpu":
            self._moved.append((module, name, is_param, data))
            data = data.to("cpu")
            _set(module, name, is_param, data)
        if self.copy_stream is not None:
            import comfy.model_management as mm

            if mm.pin_memory(data):
                self._pinned.append(data)
        return data

    def restore(self) -> None:
        """Every tensor back as it was (the originals themselves), ComfyUI's flags as they were."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy into a buffer still on its way when the buffers are let go
        self._forget_in_comfy()
        self._active.clear()
        self._staged.clear()
        self._buffers, self._buffer_of, self._offsets = [], {}, {}
        for slots in self._slots.values():
            for s in slots:
                s.at_home()
        for module, name, is_param, original in reversed(self._moved):
            _set(module, name, is_param, original)
        for flags in self._cast_flags.values():
            for module, own, flag in flags:
                if own:
                    module.comfy_cast_weights = flag
                else:
                    vars(module).pop("comfy_cast_weights", None)  # the class's value again, as before the run
        if self._pinned:
            import comfy.model_management as mm

            for t in self._pinned:
                mm.unpin_memory(t)
        self._slots, self._moved, self._pinned, self._cast_flags = {}, [], [], {}

    def _forget_in_comfy(self) -> None:
        """Let ComfyUI unload what its loader holds of this model (the checkpoint sampler loads it), so its
        bookkeeping matches the weights the run puts back."""
        if self.comfy_model is not None:
            unload_from_comfy(self.comfy_model)

    # ------------------------------------------------------------ one block's use

    @contextmanager
    def use(self, index: int):
        """The block's weights on the device for the call, the next block's on their way."""
        if index not in self._slots:
            yield
            return
        self.acquire(index)
        try:
            yield
        finally:
            self.release(index)

    def acquire(self, index: int) -> None:
        copies, event = self._staged.pop(index, None) or self._fetch(index)
        if event is not None:
            torch.cuda.current_stream(self.device).wait_event(event)
        for slot, c in zip(self._slots[index], copies, strict=True):
            slot.put(c)
        self._cast_flag(index, False)
        self._active[index] = copies
        ahead = self._ahead(index)
        if ahead is not None and ahead not in self._staged and ahead not in self._active:
            self._staged[ahead] = self._fetch(ahead)
        self.max_live = max(self.max_live, len(self._active) + len(self._staged))

    def release(self, index: int) -> None:
        copies = self._active.pop(index)
        for slot in self._slots[index]:
            slot.at_home()  # what autograd saved of the copies stays the copies (see _Slot)
        self._cast_flag(index, True)
        backward = _in_backward()
        if (not backward and index == self.streamed[-1] and torch.is_grad_enabled()) or \
                (backward and index == self.streamed[0]):
            self._staged[index] = (copies, None)  # used next (its recompute / the next step): already on the card

    def _ahead(self, index: int) -> int | None:
        pos = self.streamed.index(index)
        if _in_backward():
            return self.streamed[pos - 1] if pos > 0 else None
        if pos + 1 < len(self.streamed):
            return self.streamed[pos + 1]
        return None if torch.is_grad_enabled() else self.streamed[0]  # sampling: the next forward's first

    def _fetch(self, index: int) -> tuple[list[torch.Tensor], object]:
        """The block's tensors copied into a free buffer (views at fixed offsets); on CUDA the copies wait for the
        compute stream to pass what was issued so far (the buffer's previous block) and end with an event."""
        self.fetches += 1
        slots = self._slots[index]
        buffer = self._free_buffer(index)
        views = [buffer[at:at + s.host.nbytes].view(s.host.dtype).view(s.host.shape)
                 for s, at in zip(slots, self._offsets[index], strict=True)]
        if self.copy_stream is None:  # the CPU (forced): the buffer stands for device memory
            for view, s in zip(views, slots, strict=True):
                view.copy_(s.host)
            return [s.device_copy(v) for s, v in zip(slots, views, strict=True)], None
        passed = torch.cuda.Event()
        passed.record(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(passed)
            for view, s in zip(views, slots, strict=True):
                view.copy_(s.host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return [s.device_copy(v) for s, v in zip(slots, views, strict=True)], event

    def _free_buffer(self, index: int) -> torch.Tensor:
        """A copy buffer no live block's copies are in (the block in use and the one staged: two at most, so two
        buffers; another is made only if more are ever live at once)."""
        busy = {self._buffer_of[b] for b in (*self._active, *self._staged) if b in self._buffer_of and b != index}
        free = next((i for i in range(len(self._buffers)) if i not in busy), None)
        if free is None:
            self._buffers.append(torch.empty(self._buffer_bytes, dtype=torch.uint8, device=self.device))
            free = len(self._buffers) - 1
        self._buffer_of[index] = free
        return self._buffers[free]

    def _cast_flag(self, index: int, off_card: bool) -> None:
        """comfy_cast_weights on between uses (ComfyUI casts per layer), as it was while the block runs here."""
        for module, _own, flag in self._cast_flags.get(index, ()):
            module.comfy_cast_weights = True if off_card else flag

    def live_blocks(self) -> int:
        return len(self._active) + len(self._staged)


def _layout(slots: Sequence[_Slot]) -> tuple[list[int], int]:
    """Where each slot's tensor starts in a copy buffer, and the bytes the block takes there."""
    offsets, end = [], 0
    for s in slots:
        offsets.append(end)
        end += -(-s.host.nbytes // ALIGN) * ALIGN
    return offsets, end


def _in_backward() -> bool:
    """Inside autograd's backward (a checkpointed block's recompute runs there): the order is reversed."""
    return torch._C._current_graph_task_id() != -1


def free_device_bytes(device: torch.device) -> int:
    """ComfyUI's free memory on the card, within the process's cap where one is set
    (torch.cuda.set_per_process_memory_fraction: how the benches emulate a smaller card, which ComfyUI's own
    figure, read from the driver, does not see)."""
    import comfy.model_management as mm

    free = int(mm.get_free_memory(device))
    fraction = getattr(torch.cuda, "get_per_process_memory_fraction", lambda d: 1.0)(device)
    if fraction < 1.0:
        cap = int(fraction * torch.cuda.get_device_properties(device).total_memory)
        free = min(free, cap - torch.cuda.memory_allocated(device))
    return free


def unload_from_comfy(comfy_model) -> None:
    """ComfyUI's own unload of `comfy_model` wherever its loader holds it (weights back to the offload device)."""
    import comfy.model_management as mm

    for i in range(len(mm.current_loaded_models) - 1, -1, -1):
        loaded = mm.current_loaded_models[i]
        if loaded.model is not None and loaded.model.model is comfy_model:
            mm.current_loaded_models.pop(i).model_unload()


# ------------------------------------------------------------ how many blocks stay (the trainer's decision)

@dataclass(frozen=True)
class RunShape:
    """What the run needs beside the weights, for `auto`: its largest batch in tokens and its LoRA."""

    tokens: int
    batch: int
    lora_params: int
    optimizer: str
    recompute: bool


def block_bytes(diffusion_model: torch.nn.Module) -> tuple[list[int], int]:
    """(frozen bytes per block in execution order, frozen bytes outside the blocks)."""
    blocks = [sum(t.nbytes for _, _, t in _all_tensors(b) if not t.requires_grad) for b in execution_order(diffusion_model)]
    total = sum(t.nbytes for _, _, t in _all_tensors(diffusion_model) if not t.requires_grad)
    return blocks, total - sum(blocks)


def _all_tensors(module: torch.nn.Module) -> Iterator[tuple[str, bool, torch.Tensor]]:
    for m in module.modules():
        yield from _tensors(m)


def needs_bytes(diffusion_model: torch.nn.Module, shape: RunShape, streamed_from: int, dtype_bytes: int = 2) -> int:
    """Activations (streamed blocks always checkpointed) and the LoRA's training memory, estimated."""
    n = len(execution_order(diffusion_model))
    ckpt = [shape.recompute or i >= streamed_from for i in range(n)]
    return (offload_plan.activation_bytes(int(diffusion_model.hidden_size), shape.tokens, shape.batch, ckpt,
                                          dtype_bytes) + offload_plan.lora_bytes(shape.lora_params, shape.optimizer))


def choose_resident(choice: str, diffusion_model: torch.nn.Module, device: torch.device, shape: RunShape,
                    free_bytes: int | None) -> int:
    """Blocks kept on the card: every block for 'off' (and on the CPU, unless forced), the given number, or for
    'auto' the most that fit in `free_bytes` beside the run's estimated needs."""
    parsed = offload_plan.parse_choice(choice)
    blocks, fixed = block_bytes(diffusion_model)
    if parsed == offload_plan.OFF or (device.type == "cpu" and not forced_on_cpu()):
        return len(blocks)
    if parsed != offload_plan.AUTO:
        return min(int(parsed), len(blocks))
    if free_bytes is None:
        return len(blocks)

    def needs(n: int) -> int:
        return needs_bytes(diffusion_model, shape, n)
    n = offload_plan.resident_blocks(free_bytes, blocks, fixed, needs)
    if n == 0 and not offload_plan.fits(0, free_bytes, blocks, fixed, needs):
        need = offload_plan.planned_bytes(0, blocks, fixed, needs(0))
        logging.warning("Klein LoRA: offload_blocks 'auto': even with every block streamed the run needs an estimated "
                        "%.1f GiB and %.1f GiB are free; starting anyway (lower batch_size or the resolution if it "
                        "runs out of memory).", need / 2**30, free_bytes / 2**30)
    return n
