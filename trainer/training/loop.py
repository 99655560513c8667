"""The training run: one LoRA on a ComfyUI klein MODEL from an encoded dataset.

Reads in the order of the work: check the model, place it, inject the layers, then step
(batch -> sigma -> noisy input -> velocity loss -> update), saving checkpoints as it goes.
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..data.dataset import KleinDataset, stack_contexts
from ..lora.layers import SAVE_DTYPES, AdapterSpec, LoraHandle, adapter_metadata, lora_layers, lora_metadata
from ..model import attention, block_stream, compile_support, fp8_compute, offload_plan
from ..model.checkpointing import block_options, inplace_safe_norms
from ..model.model_check import flux2_problem
from ..model.sizes import size_key
from ..model.targets import KleinTargets
from ..paths import atomic_save_safetensors, remove_stale_temps, unique_run_name
from . import objective, resume, sharding
from .batches import BatchOrder
from .config import COMPILE_CHOICES, OPTIMIZERS, TrainConfig  # noqa: F401 - the loop's settings, named here too
from .distributed import Ranks
from .run_files import RunFiles, parse_step


@dataclass
class TrainHooks:
    """How the run reports: the node wires these to ComfyUI's progress bar and Cancel."""

    on_step: Callable[[int, int, float], None] = lambda step, total, loss: None
    check_cancel: Callable[[], None] = lambda: None
    # (step, file, live model): the live model is a ModelPatcher whose forward includes the LoRA as trained
    # so far (peft layers), valid only during the call: sample with it under torch.no_grad(), patch nothing.
    on_checkpoint: Callable[[int, Path, object], None] = lambda step, path, live: None
    # stop at the peak (cfg.early_stop_patience > 0), rank 0 only: the run's files once they are known and its
    # first step (> 1 when resumed), then after each checkpoint but the last the verdict: None goes on, a
    # StopDecision (trainer/evaluation/early_stop.py: .step, .keep_step, .reason) ends the run there
    on_begin: Callable[[int, RunFiles], None] = lambda first_step, files: None
    stop_check: Callable[[int], object] = lambda step: None


@dataclass
class TrainResult:
    lora: dict[str, torch.Tensor]
    losses: list[float]
    lora_path: Path
    checkpoints: list[Path] = field(default_factory=list)
    run_name: str = ""
    seconds: float = 0.0
    sharded_base: bool = False
    base_bytes_here: int = 0  # frozen base weights this process held (its shard when sharded)
    stopped: object = None  # the StopDecision that ended the run at its peak; `lora` is then its kept checkpoint's


def check_klein(patcher) -> None:
    """A clear error for a MODEL the trainer cannot train (SD1.5, FLUX.1, ...)."""
    import comfy.model_base

    model = getattr(patcher, "model", None)
    if not isinstance(model, comfy.model_base.Flux2):
        kind = type(model).__name__ if model is not None else type(patcher).__name__
        raise ValueError(f"the MODEL input is a {kind} model, not FLUX.2 [klein]: load a klein Base diffusion model "
                         "(e.g. flux-2-klein-base-4b) with Load Diffusion Model (UNETLoader).")
    dm = model.diffusion_model
    if (problem := flux2_problem(len(dm.double_blocks), len(dm.single_blocks), dm.hidden_size)) is not None:
        raise ValueError(f"the MODEL input is {problem}.")


def base_model_file(patcher) -> str:
    init = getattr(patcher, "cached_patcher_init", None)
    if init and init[1] and isinstance(init[1][0], str):
        return Path(init[1][0]).name
    return "unknown"


def uses_fp8_matmuls(diffusion_model: torch.nn.Module) -> bool:
    """Loaded with weight_dtype fp8_e4m3fn_fast: ComfyUI's fp8 matmul ops (they quantise inputs in place)."""
    import comfy.ops

    return any(isinstance(m, comfy.ops.fp8_ops.Linear) for m in diffusion_model.modules())


def resolve_compile(choice: str, device_type: str, mixed_precision: bool, fp8_matmuls: bool,
                    sharded: bool = False) -> bool:
    """Whether to compile the blocks: 'auto' means on CUDA, unless the model cannot be traced for training."""
    why = None
    if sharded:  # the blocks' FSDP hooks (all-gather, free) run around each block call; not traced here
        why = "blocks sharded over processes (shard_base) train uncompiled"
    elif not mixed_precision:  # fp32 eager needs inplace_safe_norms; traced, the same in-place adds fail
        why = "compiled blocks need a bf16/fp16 model on CUDA"
    elif fp8_matmuls:  # measured on an H200: dynamo cannot trace their `clamp(out=...)` with gradients
        why = ("the model was loaded with weight_dtype fp8_e4m3fn_fast, whose fp8 matmuls cannot be compiled for "
               "training (load it with fp8_e4m3fn for compiled, low-VRAM training)")
    if choice == "on" and why and (fp8_matmuls or sharded):
        raise ValueError(f"compile_blocks 'on': {why}. Set compile_blocks to 'auto' or 'off'"
                         + (", or shard_base to 'off'." if sharded else "."))
    wanted = choice == "on" or (choice == "auto" and device_type == "cuda")
    if wanted and why:
        logging.warning("Klein LoRA: %s; training uncompiled.", why)
        return False
    return wanted


def _training_model(patcher, sharded_over: int = 0, streamed: bool = False):
    """A patcher whose weights are plain tensors on the compute device (not dynamic VRAM views).

    `sharded_over` N > 1: instead of ComfyUI loading the whole model onto the card, this process keeps
    1/N of the frozen weights there (trainer/training/sharding.py); the model stays sharded after the run (the
    command line's processes own their model). `streamed`: the model stays in CPU memory, where ComfyUI's unload
    put it; the run's block streamer places the resident part on the card (trainer/model/block_stream.py).
    """
    import comfy.model_management as mm

    work = patcher
    if patcher.is_dynamic():
        logging.info("Klein LoRA: the MODEL uses dynamic VRAM; training on a non-dynamic copy of its weights.")
        work = patcher.clone(disable_dynamic=True)
    if sharded_over > 1:
        _make_differentiable(work.model.diffusion_model)
        sharding.shard_model(work.model.diffusion_model, work.load_device, sharded_over)
        work.model.model_sampling.to(work.load_device)
        return work
    if streamed:
        if work.patches:
            raise ValueError("offload_blocks streams the base's own weights, and this MODEL carries weight patches (a "
                             "LoRA or model merge applied before the trainer): connect the base model itself, or set "
                             "offload_blocks to 'off'.")
        block_stream.unload_from_comfy(work.model)
        _make_differentiable(work.model.diffusion_model)
        work.model.model_sampling.to(work.load_device)
        return work
    try:
        mm.load_models_gpu([work], force_full_load=True)
    except torch.OutOfMemoryError as e:
        size = sharding.weight_bytes(work.model.diffusion_model) / 2**30
        raise torch.OutOfMemoryError(
            f"out of GPU memory putting the base model ({size:.1f} GiB of weights) on {work.load_device}: load it with "
            "weight_dtype fp8_e4m3fn and turn low_vram on (klein 9B then trains in ~11 GiB), set offload_blocks to "
            "'auto' (the blocks that do not fit stream from CPU memory), or train it on several "
            "GPUs with the base sharded over them (the trainer's gpus input or `accelerate launch`, shard_base "
            f"'auto'/'on'; README, 'Several GPUs'). (torch: {str(e).splitlines()[0] if str(e) else 'out of memory'})"
        ) from None
    _make_differentiable(work.model.diffusion_model)
    return work


def _inference_backed(t: torch.Tensor) -> bool:
    """An inference tensor, or one that only looks ordinary: `Module.to()` outside inference mode on weights
    made inside it (ComfyUI's load_models_gpu moving a model its loader built in the executor's inference
    mode) leaves parameters whose is_inference() is False but which have no version counter, so every
    matmul with them fails ("Inference tensors do not track version counter"; measured on an H200)."""
    if t.is_inference():
        return True
    try:
        t._version  # noqa: B018 - the probe: it raises for such tensors
    except RuntimeError:
        return True
    return False


@torch.no_grad()
def _make_differentiable(module: torch.nn.Module) -> None:
    """Swap inference-backed weights for ordinary tensors with the same values, one tensor at a time.

    ComfyUI's executor loads models under torch.inference_mode(); autograd cannot save such tensors
    for backward. ComfyUI's own trainer reloads a second full copy of the model instead; this costs
    one tensor's worth of memory at a time, and the model computes exactly what it did before.
    """
    for m in module.modules():
        for name, p in m._parameters.items():
            if p is not None and _inference_backed(p):
                m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=p.requires_grad)
        for name, b in m._buffers.items():
            if b is not None and _inference_backed(b):
                m._buffers[name] = b.clone()


@contextmanager
def comfy_training_mode():
    """ComfyUI's switch to differentiable kernels (e.g. RoPE without comfy_kitchen), reset afterwards.
    (Attention runs on one pinned backend for forward and recompute: trainer/model/attention.py.)"""
    import comfy.model_management as mm

    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


@contextmanager
def _dynamo_limits(enabled: bool):
    """Every block is its own compiled wrapper; allow them all without hitting dynamo's recompile cap."""
    if not enabled:
        yield
        return
    import torch._dynamo

    knobs = [k for k in ("recompile_limit", "cache_size_limit") if hasattr(torch._dynamo.config, k)]
    saved = {k: getattr(torch._dynamo.config, k) for k in knobs}
    for k in knobs:
        setattr(torch._dynamo.config, k, max(64, saved[k]))
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(torch._dynamo.config, k, v)


def _make_optimizer(name: str, params, lr: float) -> torch.optim.Optimizer:
    if name == "Adafactor":
        return torch.optim.Adafactor(params, lr=lr)
    if name == "AdamW8bit":
        try:
            from torchao.optim import AdamW8bit  # block-wise 8-bit moments: 1/4 of AdamW's state memory
        except ImportError as e:
            raise ValueError("optimizer AdamW8bit (and low_vram) needs torchao: `pip install torchao`, or pick "
                             "AdamW.") from e
        return AdamW8bit(params, lr=lr, weight_decay=0.0)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def train_step(dm, work, batch_x0, batch_ctx, generator, device, dtype, options, autocast,
               batch_ref: torch.Tensor | None = None, part: slice | None = None) -> torch.Tensor:
    """One forward/backward on a batch; returns the (detached) loss.

    `part` (data parallel, trainer/training/distributed.py): the sigmas and noise are drawn for the whole global
    batch, as one process draws them, and only this process's slice of the batch is trained, so N
    processes see exactly the samples, sigmas and noise of the one-process run.

    `batch_ref` (image-to-image) is the clean control latent of each item. It goes in exactly as ComfyUI's
    ReferenceLatent conditioning does at sampling time: `ref_latents=[ref]` on the flux model, which appends
    the reference tokens at klein's "index" position (time coordinate 10) and cuts the output back to the
    noisy target tokens, so only the target carries loss.
    """
    tokens = batch_x0.shape[-1] * batch_x0.shape[-2]
    sigma = objective.sample_sigmas(batch_x0.shape[0], tokens, generator, device)
    noise = torch.randn(batch_x0.shape, generator=generator)
    if part is not None:
        sigma, noise, batch_x0, batch_ctx = sigma[part], noise[part], batch_x0[part], batch_ctx[part]
        batch_ref = batch_ref[part] if batch_ref is not None else None
    noise = noise.to(device)
    x0 = batch_x0.to(device)
    xt, target = objective.noisy_input(x0, noise, sigma)
    timestep = work.model.model_sampling.timestep(sigma).float()
    extra = {} if batch_ref is None else {"ref_latents": [batch_ref.to(device, dtype)]}
    with autocast:
        pred = dm(xt.to(dtype), timestep, batch_ctx.to(device, dtype), transformer_options=options, **extra)
    loss = objective.flow_loss(pred, target)
    loss.backward()
    return loss.detach()


@dataclass
class _Placed:
    """The model as the steps run it: the working patcher, its device and dtype, and how its blocks run."""

    work: object
    device: torch.device
    dtype: torch.dtype
    autocast: object
    compiled: bool
    options: dict
    sharded: bool
    base_compute: str  # 'bf16' or 'fp8': the frozen base's products (cfg.base_compute resolved for the device)
    streamer: block_stream.BlockStreamer | None = None  # offload_blocks: the blocks streamed from CPU memory

    def streaming(self):
        """The streamer's placement for the run (entered after the LoRA and fp8 layers), or nothing."""
        return self.streamer.streaming(self.dm) if self.streamer is not None else nullcontext()

    @property
    def dm(self):
        return self.work.model.diffusion_model


@dataclass
class _RunState:
    """What a run carries from one step to the next, and saves in its training state."""

    files: RunFiles
    meta: dict[str, str]
    generator: torch.Generator
    caption_rng: random.Random
    batches: BatchOrder
    losses: list[float] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)
    first: int = 1


def train_lora(patcher, dataset: KleinDataset, targets: KleinTargets, cfg: TrainConfig, out_dir: Path,
               hooks: TrainHooks | None = None, ranks: Ranks | None = None) -> TrainResult:
    """Train, save checkpoints (and the full training state) every `cfg.save_every` steps and the final LoRA;
    leave `patcher` as it was. With `cfg.resume_from`, continue a saved run exactly where its state left it.

    `ranks` (data parallel, see trainer/training/distributed.py): each process trains its slice of every global
    batch of `cfg.batch_size` and the LoRA gradients are averaged; rank 0 alone writes checkpoints and states and
    calls `hooks.on_checkpoint`, the others wait for it. The saved state is the same for any process count. When
    the base is sharded over the processes (`cfg.shard_base`, trainer/training/sharding.py) the model stays sharded
    afterwards: that is for the command line's processes, which own their model.
    """
    hooks, ranks = hooks or TrainHooks(), ranks or Ranks()
    _check_inputs(patcher, dataset, cfg, ranks)
    files, resumed, state_file, changes = _open_run(Path(out_dir), cfg, targets, dataset, ranks)
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        placed = _place(patcher, cfg, ranks, dataset, targets)
        meta = _run_metadata(patcher, placed, dataset, targets, cfg, ranks)
        if resumed is not None:
            _note_resume(meta, resumed, state_file, changes)
        generator = torch.Generator().manual_seed(cfg.seed)
        run = _RunState(files, meta, generator, random.Random(f"{cfg.seed}:captions"),  # captions apart from noise
                        BatchOrder(dataset, cfg.batch_size, generator, cfg.seed))
        with lora_layers(placed.dm, targets.modules, cfg.rank, cfg.alpha, seed=cfg.seed,
                         spec=AdapterSpec.of(cfg)) as lora, \
                (nullcontext() if placed.compiled else inplace_safe_norms(placed.dm)), \
                comfy_training_mode(), _dynamo_limits(placed.compiled), \
                attention.run_attention(placed.dm, placed.device, placed.dtype), \
                fp8_compute.apply_base_compute(placed.dm, placed.base_compute, placed.device), placed.streaming():
            opt = _make_optimizer(cfg.optimizer_used, lora.parameters(), cfg.learning_rate)
            if resumed is not None:
                _restore(run, resumed, lora, opt, cfg)
                logging.info("Klein LoRA: resuming run '%s' from %s at step %d of %d", files.run, state_file.name,
                             resumed["step"], cfg.steps)
            if cfg.early_stop_patience and ranks.is_main:
                hooks.on_begin(run.first, files)
            stop = None
            for step in range(run.first, cfg.steps + 1):
                _train_one_step(step, run, placed, lora, opt, dataset, cfg, hooks, ranks)
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    _save_checkpoint(step, run, placed, lora, opt, dataset, targets, cfg, hooks, ranks)
                    if cfg.early_stop_patience and (stop := _stop_verdict(step, hooks, ranks)) is not None:
                        break
            final = (_save_stopped(stop, run, cfg, ranks) if stop is not None
                     else _save_final(run, placed, lora, opt, dataset, targets, cfg, hooks, ranks))
    seconds = time.perf_counter() - start
    logging.info("Klein LoRA: %d steps in %.1fs, final loss %.4f, saved %s", len(run.losses) - run.first + 1,
                 seconds, run.losses[-1], files.lora)
    return TrainResult(final, run.losses, files.lora, run.checkpoints, files.run, seconds, placed.sharded,
                       sharding.local_bytes(placed.dm), stop)


def _check_inputs(patcher, dataset: KleinDataset, cfg: TrainConfig, ranks: Ranks) -> None:
    cfg.validate()
    ranks.check_batch(cfg.batch_size)
    check_klein(patcher)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: connect a Klein Dataset Loader with at least one image.")


def _open_run(out_dir: Path, cfg: TrainConfig, targets: KleinTargets, dataset: KleinDataset, ranks: Ranks):
    """The run's files and, resuming, its saved state: (files, state or None, state file, allowed changes).
    A new run gets a name no earlier run has; a resumed one goes on under its own name, in its own folder."""
    resumed, state_file, changes = None, None, {}
    if cfg.resume_from.strip():
        state_file = resume.find_state(out_dir, cfg.output_name, cfg.resume_from)
        resumed = resume.load_state(state_file)
        files = resume.checked_run(resumed, state_file, out_dir)
        changes = resume.check_compatible(resumed, state_file, cfg, targets.modules, dataset)
    else:
        files = RunFiles(out_dir, ranks.broadcast(unique_run_name(out_dir, cfg.output_name) if ranks.is_main else None))
    if ranks.is_main:
        remove_stale_temps(files.checkpoints_dir, files.step_prefix)  # left by a killed writer: never renamed into place
        remove_stale_temps(out_dir, files.lora.name)
    return files, resumed, state_file, changes


def _place(patcher, cfg: TrainConfig, ranks: Ranks, dataset: KleinDataset, targets: KleinTargets) -> _Placed:
    """The model on its device, in the dtype and block mode (compiled, recomputed, streamed) the run trains it in."""
    shard = sharding.decide(cfg.shard_base, patcher.model.diffusion_model, patcher.load_device, ranks)
    _check_adapter(cfg, shard, patcher.model.get_dtype())  # before the base is placed or sharded
    streamed = _streamed_blocks(patcher, cfg, dataset, targets, shard)
    work = _training_model(patcher, ranks.world if shard else 0, bool(streamed))
    dm = work.model.diffusion_model
    streamer = (block_stream.BlockStreamer(block_stream.execution_order(dm), streamed, work.load_device, work.model)
                if streamed else None)
    # the compute dtype: fp8-stored weights (UNETLoader weight_dtype fp8_*) are cast per layer to this one
    device, dtype = work.load_device, work.model.get_dtype_inference()
    if cfg.low_vram and work.model.get_dtype().itemsize > 1:
        logging.warning("Klein LoRA: low_vram with %s base weights; load the model with weight_dtype fp8_e4m3fn "
                        "(Load Diffusion Model) to halve their memory.", work.model.get_dtype())
    mixed = device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if mixed else nullcontext()
    compiled = compile_support.usable(cfg.compile_blocks, device, resolve_compile(
        cfg.compile_blocks, device.type, mixed, uses_fp8_matmuls(dm), shard))
    return _Placed(work, device, dtype, autocast, compiled, block_options(dm, cfg.recompute, compiled, streamer), shard,
                   _base_compute(cfg.base_compute, device, shard, cfg.adapter), streamer)


def _run_shape(patcher, cfg: TrainConfig, dataset: KleinDataset, targets: KleinTargets) -> block_stream.RunShape:
    """The run's largest batch in tokens (image, reference and text) and its LoRA's size, for offload_blocks 'auto'."""
    dm = patcher.model.diffusion_model
    image = max(int(x.shape[-1] * x.shape[-2]) for x in dataset.latents)
    text = max(int(c.shape[0]) for c in dataset.contexts)
    params = 0
    for name in targets.modules:
        layer = dm.get_submodule(name)
        params += cfg.rank * (getattr(layer, "in_features", 0) + getattr(layer, "out_features", 0))
    return block_stream.RunShape(image * (2 if dataset.references else 1) + text, cfg.batch_size, params,
                                 cfg.optimizer_used, cfg.recompute)


def _streamed_blocks(patcher, cfg: TrainConfig, dataset: KleinDataset, targets: KleinTargets,
                     sharded: bool) -> list[int]:
    """The blocks (execution order) that stream from CPU memory; [] keeps today's placement, every block on the card.
    On CUDA ComfyUI first unloads this model and frees what the whole run would need (other models leave the card);
    'auto' then keeps the blocks that fit in the memory left free."""
    choice = offload_plan.parse_choice(cfg.offload_blocks)
    if choice == offload_plan.OFF:
        return []
    if sharded:
        if choice != offload_plan.AUTO:
            raise ValueError("offload_blocks does not combine with a base sharded over processes (shard_base): set "
                             "shard_base to 'off' or offload_blocks to 'off' or 'auto'.")
        return []
    import comfy.model_management as mm

    dm, device = patcher.model.diffusion_model, patcher.load_device
    shape = _run_shape(patcher, cfg, dataset, targets)
    free = None
    if device.type == "cuda":
        blocks, fixed = block_stream.block_bytes(dm)
        block_stream.unload_from_comfy(patcher.model)
        mm.free_memory(fixed + sum(blocks) + block_stream.needs_bytes(dm, shape, len(blocks)), device)
        free = block_stream.free_device_bytes(device)
    total = len(block_stream.execution_order(dm))
    resident = block_stream.choose_resident(cfg.offload_blocks, dm, device, shape, free)
    if resident >= total:
        logging.info("Klein LoRA: offload_blocks '%s': every block stays on %s.", cfg.offload_blocks, device)
    return list(range(resident, total))


def _base_compute(choice: str, device: torch.device, sharded: bool, adapter: str = "lora") -> str:
    """cfg.base_compute for this device; the fp8 layers are not made for a base sharded over processes, nor
    for peft's LoKr/LoHa/DoRA layers, which read the base layer's weight that the fp8 copy replaces."""
    mode = fp8_compute.resolve_mode(choice, device)
    if mode == "fp8" and adapter != "lora":
        if choice == "fp8":
            raise ValueError(f"base_compute 'fp8' does not combine with adapter '{adapter}': peft's "
                             f"{AdapterSpec(adapter).label} layers read the base layer's weight, which fp8 products "
                             "replace by a quantised copy. Set base_compute to 'auto' or 'bf16', or adapter to 'lora'.")
        return "bf16"
    if mode == "fp8" and sharded:
        if choice == "fp8":
            raise ValueError("base_compute 'fp8' does not combine with a base sharded over processes (shard_base): "
                             "set shard_base to 'off' or base_compute to 'auto'.")
        return "bf16"
    return mode


def _check_adapter(cfg: TrainConfig, sharded: bool, weight_dtype: torch.dtype) -> None:
    """DoRA's file scale needs each base layer's whole weight on the process that writes it, in a dtype peft
    can add its update to; the other adapters train wherever LoRA does."""
    if cfg.adapter != "dora":
        return
    if sharded:
        raise ValueError("adapter 'dora' does not combine with a base sharded over processes (shard_base): DoRA's "
                         "saved scale is computed from each base layer's full weight, which only its shard's "
                         "process holds. Set shard_base to 'off' (each process holds the whole base) or pick "
                         "adapter 'lora', 'lokr' or 'loha'.")
    if weight_dtype.itemsize == 1:
        raise ValueError(f"adapter 'dora' needs the base in bf16/fp16/fp32 (it is {weight_dtype}): peft's DoRA adds "
                         "its update to the base weight to take its norms, which fp8 weights cannot. Load the model "
                         "with weight_dtype default, or pick adapter 'lora', 'lokr' or 'loha' for low-VRAM fp8.")


def _run_metadata(patcher, placed: _Placed, dataset: KleinDataset, targets: KleinTargets, cfg: TrainConfig,
                  ranks: Ranks) -> dict[str, str]:
    """The LoRA file's header: how it was trained, on what."""
    dm = placed.dm
    meta = lora_metadata(
        format="comfyui-bfl-lora", base_model=size_key(len(dm.double_blocks), len(dm.single_blocks), dm.hidden_size),
        base_model_file=base_model_file(patcher),
        rank=cfg.rank, alpha=cfg.alpha, learning_rate=cfg.learning_rate, steps=cfg.steps,
        batch_size=cfg.batch_size, seed=cfg.seed, optimizer=cfg.optimizer_used, recipe=cfg.recipe,
        trigger=dataset.trigger, dataset_size=len(dataset), resolution=dataset.resolution,
        target_groups=list(targets.groups), target_layers=targets.layers, targets=targets.modules,
        low_vram=cfg.low_vram, base_weight_dtype=str(placed.work.model.get_dtype()).removeprefix("torch."),
        gradient_checkpointing=cfg.recompute, compiled=placed.compiled, software="klein-lora-studio",
        base_compute=placed.base_compute, offload_blocks=cfg.offload_blocks,
        streamed_blocks=len(placed.streamer.streamed) if placed.streamer is not None else 0,
        task_kind="image-to-image" if dataset.references else "text-to-image",
        buckets=[f"{w}x{h}:{len(v)}" for (w, h), v in dataset.bucket_assignment().items()],
        repeats=dataset.repeats, caption_dropout=dataset.caption_dropout,
        shuffle_tags=bool(dataset.context_variants), data_parallel_processes=ranks.world, sharded_base=placed.sharded)
    meta.update(lora_metadata(**adapter_metadata(AdapterSpec.of(cfg))))  # nothing for plain LoRA
    return meta


def _note_resume(meta: dict[str, str], resumed: dict, state_file: Path, changes: dict) -> None:
    """A resumed run must be on the same base; its header records where it resumed and what changed."""
    if resumed["meta"].get("base_model") != meta["base_model"]:
        raise ValueError(f"resume_from {state_file.name}: the run trained a {resumed['meta'].get('base_model')} "
                         f"model, the MODEL input is {meta['base_model']}: connect the same base model.")
    history = json.loads(resumed["meta"].get("resumed_from", "[]"))
    meta["resumed_from"] = json.dumps([*history, {"state": state_file.name, "step": resumed["step"],
                                                  "changes": changes}])
    meta["resume_changes"] = json.dumps(changes)


def _restore(run: _RunState, resumed: dict, lora: LoraHandle, opt: torch.optim.Optimizer, cfg: TrainConfig) -> None:
    """Every RNG, the batch position, the weights and the optimizer as the state saved them."""
    lora.load_state_dict(resumed["lora"])
    opt.load_state_dict(resumed["optimizer"])
    for group in opt.param_groups:  # a changed learning rate applies from here (noted in meta)
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(cfg.learning_rate)  # torchao keeps lr as a tensor and checks it stays one
        else:
            group["lr"] = cfg.learning_rate
    run.generator.set_state(resumed["generator"])
    run.caption_rng.setstate(resumed["caption_rng"])
    run.batches.load_state_dict(resumed["batches"])
    resume.set_global_rng_state(resumed["global_rng"])
    run.losses = list(resumed["losses"])
    run.checkpoints = [run.files.checkpoints_dir / n for n in resumed["checkpoints"]
                       if (run.files.checkpoints_dir / n).is_file()]
    run.first = resumed["step"] + 1


def _train_one_step(step: int, run: _RunState, placed: _Placed, lora: LoraHandle, opt: torch.optim.Optimizer,
                    dataset: KleinDataset, cfg: TrainConfig, hooks: TrainHooks, ranks: Ranks) -> None:
    """One optimizer step on the next batch; an out-of-memory step says what to lower and what is kept."""
    hooks.check_cancel()
    idx = next(run.batches)
    x0 = torch.stack([dataset.latents[i] for i in idx])
    ctx = stack_contexts([dataset.context_for(i, run.caption_rng) for i in idx])
    ref = torch.stack([dataset.references[i] for i in idx]) if dataset.references else None
    part = ranks.shard(len(idx)) if ranks.distributed else None
    params = lora.parameters()
    oom = None
    try:
        loss = train_step(placed.dm, placed.work, x0, ctx, run.generator, placed.device, placed.dtype,
                          placed.options, placed.autocast, ref, part)
        if part is not None:  # a rank that runs out of memory leaves the others waiting here
            loss = ranks.average_gradients(params, part.stop - part.start, len(idx), loss)
        if cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()  # AdamW allocates its moments here, on the first step
    except torch.OutOfMemoryError as e:
        oom = str(e).splitlines()[0] if str(e) else "out of memory"
    opt.zero_grad(set_to_none=True)
    if oom is not None:  # raised outside the handler: the failed step's tensors are freed first
        if placed.device.type == "cuda":
            torch.cuda.empty_cache()
        raise torch.OutOfMemoryError(_oom_message(step, cfg, x0, run, placed.streamer) + f" (torch: {oom})")
    run.losses.append(float(loss))
    hooks.on_step(step, cfg.steps, run.losses[-1])


def _save_state(step: int, run: _RunState, lora: LoraHandle, opt: torch.optim.Optimizer, dataset: KleinDataset,
                targets: KleinTargets, cfg: TrainConfig, also: tuple[Path, ...] = ()) -> None:
    """The state of `step`, listing the run's checkpoints (and `also`, the final step's); older states pruned."""
    resume.save_state(run.files.state(step), cfg=cfg, step=step, run=run.files.run,
                      lora=lora.training_tensors(), optimizer=opt.state_dict(),
                      generator=run.generator.get_state(), caption_rng=run.caption_rng.getstate(),
                      batches=run.batches.state_dict(), losses=list(run.losses),
                      checkpoints=[c.name for c in (*run.checkpoints, *also)], targets=list(targets.modules),
                      dataset=resume.dataset_signature(dataset), meta=dict(run.meta))
    resume.prune_states(run.files, cfg.keep_states)


def _save_checkpoint(step: int, run: _RunState, placed: _Placed, lora: LoraHandle, opt: torch.optim.Optimizer,
                     dataset: KleinDataset, targets: KleinTargets, cfg: TrainConfig, hooks: TrainHooks,
                     ranks: Ranks) -> None:
    """Rank 0 writes the checkpoint and the state beside it and reports it; the other ranks wait."""
    path = run.files.checkpoint(step)
    run.checkpoints.append(path)
    if ranks.is_main:
        atomic_save_safetensors(lora.state_dict(SAVE_DTYPES[cfg.save_dtype]), path, {**run.meta, "steps": str(step)})
        _save_state(step, run, lora, opt, dataset, targets, cfg)
        with torch.no_grad():
            hooks.on_checkpoint(step, path, placed.work)
    ranks.barrier()


def _save_final(run: _RunState, placed: _Placed, lora: LoraHandle, opt: torch.optim.Optimizer,
                dataset: KleinDataset, targets: KleinTargets, cfg: TrainConfig, hooks: TrainHooks,
                ranks: Ranks) -> dict[str, torch.Tensor]:
    """The final LoRA. With checkpoints on, the final step is a checkpoint too, and its state lists it: a run
    extended later (resume_from with more steps) rewrites the final LoRA, never the only copy of this one."""
    final = lora.state_dict(SAVE_DTYPES[cfg.save_dtype])
    if ranks.is_main:
        if cfg.save_every:
            last = atomic_save_safetensors(final, run.files.checkpoint(cfg.steps), run.meta)
            _save_state(cfg.steps, run, lora, opt, dataset, targets, cfg, also=(last,))  # a finished run extends
        atomic_save_safetensors(final, run.files.lora, run.meta)
        with torch.no_grad():
            hooks.on_checkpoint(cfg.steps, run.files.lora, placed.work)
    ranks.barrier()
    return final


def _stop_verdict(step: int, hooks: TrainHooks, ranks: Ranks):
    """Rank 0's stop decision after checkpoint `step`, the same on every rank (they all end the run together)."""
    verdict = hooks.stop_check(step) if ranks.is_main else None
    return ranks.broadcast(verdict) if ranks.distributed else verdict


def _save_stopped(stop, run: _RunState, cfg: TrainConfig, ranks: Ranks) -> dict[str, torch.Tensor]:
    """The run ended at its peak after checkpoint `stop.step` (saved with its state: resume_from 'latest' goes on
    from there): the final LoRA is the kept checkpoint's tensors, its header says where, why and what was kept."""
    from safetensors.torch import load_file

    keep = run.files.checkpoint(stop.keep_step)
    if keep not in run.checkpoints or not keep.is_file():
        logging.warning("Klein LoRA: the checkpoint to keep (step %d) is not among this run's files; keeping step %d's.",
                        stop.keep_step, stop.step)
        keep = run.files.checkpoint(stop.step)
    tensors = load_file(str(keep))
    if ranks.is_main:
        meta = {**run.meta, "steps": str(parse_step(keep.name)[1]), "early_stop_reason": stop.reason,
                "early_stop": json.dumps({"stopped_at_step": stop.step, "kept_step": parse_step(keep.name)[1],
                                          "kept": keep.name, "planned_steps": cfg.steps,
                                          "patience": cfg.early_stop_patience})}
        atomic_save_safetensors(tensors, run.files.lora, meta)
        logging.info("Klein LoRA: %s", stop.reason)
    ranks.barrier()
    return tensors


def _oom_message(step: int, cfg: TrainConfig, x0: torch.Tensor, run: _RunState,
                 streamer: block_stream.BlockStreamer | None = None) -> str:
    """What to lower, in the order that saves the most (only what the run does not do already), and what is kept."""
    h, w = x0.shape[-2] * 16, x0.shape[-1] * 16
    kept = (f"the last checkpoint {run.checkpoints[-1].name} is kept" if run.checkpoints
            else "no checkpoint was saved yet")
    ways = ["batch_size"] * (cfg.batch_size > 1) + ["the resolution (Dataset Loader)", "rank"]
    advice = f"Lower {', '.join(ways[:-1])} or {ways[-1]}"
    if not cfg.recompute:
        advice += ", or turn gradient_checkpointing on (the low-VRAM mode: ~30% slower, much less memory)"
    if streamer is None:
        advice += ", or stream the frozen base from CPU memory (offload_blocks 'auto')"
    elif len(streamer.streamed) < len(streamer.blocks):
        resident = len(streamer.blocks) - len(streamer.streamed)
        advice += f", or stream more of the frozen base (offload_blocks below the {resident} blocks kept on the GPU)"
    else:
        advice += " (every frozen block already streams from CPU memory)"
    fixes = ["lowering batch_size"] * (cfg.batch_size > 1) + ["turning gradient_checkpointing on"] * (not cfg.recompute)
    how = (f"; resume it with resume_from 'latest' after {' or '.join(fixes)} (rank and the dataset must stay the "
           "same to resume)" if run.files.states() and fixes else "")
    ckpt = "on" if cfg.recompute else "off"
    return (f"out of GPU memory in training step {step} (batch_size {cfg.batch_size}, {w}x{h} px, rank {cfg.rank}, "
            f"gradient_checkpointing {ckpt}). {advice}; {kept}{how}.")
