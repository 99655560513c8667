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

from ..data.buckets import BucketBatchSampler
from ..data.dataset import KleinDataset, stack_contexts
from ..lora.layers import SAVE_DTYPES, LoraHandle, lora_layers, lora_metadata
from ..model import compile_support
from ..model.checkpointing import block_options, inplace_safe_norms
from ..model.model_check import KNOWN_SIZES, flux2_problem
from ..model.targets import KleinTargets
from ..paths import atomic_save_safetensors, remove_stale_temps, unique_run_name
from . import objective, resume, sharding
from .distributed import Ranks

OPTIMIZERS = ("AdamW", "Adafactor", "AdamW8bit")  # AdamW8bit: torchao's 8-bit optimizer states (low-VRAM mode)
COMPILE_CHOICES = ("auto", "on", "off")  # auto: compile the blocks on CUDA, not on the CPU


@dataclass
class TrainConfig:
    rank: int
    alpha: float
    learning_rate: float
    steps: int
    batch_size: int = 1
    seed: int = 0
    optimizer: str = "AdamW"
    save_every: int = 0
    gradient_checkpointing: bool = False
    output_name: str = "klein_lora"
    save_dtype: str = "bf16"
    max_grad_norm: float = 1.0
    recipe: str = "custom"
    compile_blocks: str = "auto"
    resume_from: str = ""  # "latest", a checkpoint of the run, or "" for a new run (see trainer/resume.py)
    keep_states: int = 2  # training states kept beside the checkpoints (0: all); each is ~3x the fp32 LoRA
    low_vram: bool = False  # gradient checkpointing + 8-bit AdamW; load the base with weight_dtype fp8 for the rest
    shard_base: str = "auto"  # several processes: shard the frozen base over them (FSDP, trainer/sharding.py)

    @property
    def recompute(self) -> bool:
        return self.gradient_checkpointing or self.low_vram

    @property
    def optimizer_used(self) -> str:
        return "AdamW8bit" if self.low_vram and self.optimizer == "AdamW" else self.optimizer

    def validate(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps is {self.steps}: train for at least 1 step (the recipes use 250-1200).")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate is {self.learning_rate}: it must be above 0 (the recipes use 1e-4 to 3e-4).")
        if self.learning_rate > 1e-2:
            logging.warning("Klein LoRA: learning_rate %g is far above the recipes' 1e-4..3e-4; expect divergence.",
                            self.learning_rate)
        if self.batch_size < 1:
            raise ValueError(f"batch_size is {self.batch_size}: use 1 or more.")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer '{self.optimizer}' is not one of {list(OPTIMIZERS)}.")
        if self.compile_blocks not in COMPILE_CHOICES:
            raise ValueError(f"compile_blocks '{self.compile_blocks}' is not one of {list(COMPILE_CHOICES)}.")
        if self.keep_states < 0:
            raise ValueError(f"keep_states is {self.keep_states}: use 0 (keep all) or more.")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"save_dtype '{self.save_dtype}' is not one of {list(SAVE_DTYPES)}.")
        if self.shard_base not in sharding.SHARD_CHOICES:
            raise ValueError(f"shard_base '{self.shard_base}' is not one of {list(sharding.SHARD_CHOICES)}.")


@dataclass
class TrainHooks:
    """How the run reports: the node wires these to ComfyUI's progress bar and Cancel."""

    on_step: Callable[[int, int, float], None] = lambda step, total, loss: None
    check_cancel: Callable[[], None] = lambda: None
    # (step, file, live model): the live model is a ModelPatcher whose forward includes the LoRA as trained
    # so far (peft layers), valid only during the call: sample with it under torch.no_grad(), patch nothing.
    on_checkpoint: Callable[[int, Path, object], None] = lambda step, path, live: None


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


def klein_size(diffusion_model) -> str:
    key = (len(diffusion_model.double_blocks), len(diffusion_model.single_blocks), diffusion_model.hidden_size)
    return KNOWN_SIZES.get(key, f"flux2-{key[0]}x{key[1]}-h{key[2]}")


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


def _training_model(patcher, sharded_over: int = 0):
    """A patcher whose weights are plain tensors on the compute device (not dynamic VRAM views).

    `sharded_over` N > 1: instead of ComfyUI loading the whole model onto the card, this process keeps
    1/N of the frozen weights there (trainer/sharding.py); the model stays sharded after the run (the
    command line's processes own their model).
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
    try:
        mm.load_models_gpu([work], force_full_load=True)
    except torch.OutOfMemoryError as e:
        size = sharding.weight_bytes(work.model.diffusion_model) / 2**30
        raise torch.OutOfMemoryError(
            f"out of GPU memory putting the base model ({size:.1f} GiB of weights) on {work.load_device}: load it with "
            "weight_dtype fp8_e4m3fn and turn low_vram on (klein 9B then trains in ~11 GiB), or train it on several "
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
def comfy_training_mode(recompute: bool = False):
    """ComfyUI's switch to differentiable kernels (e.g. RoPE without comfy_kitchen), reset afterwards.

    With recomputation (gradient checkpointing) cuDNN attention is left out of ComfyUI's SDPA backend
    list for the run: on an H100 at 512^2 the forward picked cuDNN and the recompute flash attention,
    whose saved statistics differ in shape, and torch.utils.checkpoint stopped with a CheckpointError
    (ComfyUI's own trainer fails the same way; measured in bench/RESULTS.md).
    """
    import comfy.model_management as mm
    import comfy.ops

    before = mm.in_training
    priority = getattr(comfy.ops, "SDPA_BACKEND_PRIORITY", None)
    saved = list(priority) if priority is not None else None
    mm.in_training = True
    if recompute and priority is not None:
        from torch.nn.attention import SDPBackend

        priority[:] = [b for b in priority if b != SDPBackend.CUDNN_ATTENTION]
    try:
        yield
    finally:
        mm.in_training = before
        if saved is not None:
            priority[:] = saved


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


class _BatchOrder:
    """Endless index batches whose position can be saved and restored, so a resumed run sees the same batches.

    One size, no repeats: every image once per epoch in an order drawn from the run's generator (the
    remainder of the current permutation is the position). Several sizes (aspect buckets) or repeats:
    the batches of BucketBatchSampler, one bucket at a time, reshuffled per epoch (epoch and index
    within it are the position).
    """

    def __init__(self, dataset: KleinDataset, batch_size: int, generator: torch.Generator, seed: int) -> None:
        assignment = dataset.bucket_assignment()
        self.plain = len(assignment) == 1 and dataset.repeats == 1
        self.n, self.batch_size, self.generator = len(dataset), batch_size, generator
        self.sampler = None if self.plain else BucketBatchSampler(assignment, batch_size, seed=seed,
                                                                  repeats=dataset.repeats)
        self.order: list[int] = []
        self.epoch, self.pos = 0, 0
        self._epoch: list[list[int]] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> list[int]:
        if self.plain:
            while len(self.order) < self.batch_size:
                self.order += torch.randperm(self.n, generator=self.generator).tolist()
            out, self.order = self.order[:self.batch_size], self.order[self.batch_size:]
            return out
        while True:
            if self._epoch is None:
                self._epoch = self.sampler.batches(self.epoch)
            if self.pos < len(self._epoch):
                self.pos += 1
                return self._epoch[self.pos - 1]
            self.epoch, self.pos, self._epoch = self.epoch + 1, 0, None

    def state_dict(self) -> dict:
        return {"plain": self.plain, "order": list(self.order), "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        """A changed batch size keeps the epoch; the position within it then counts batches of the new size."""
        if state["plain"] != self.plain:
            raise ValueError("resume_from: the saved batch order is for a dataset with "
                             f"{'one size' if state['plain'] else 'several sizes or repeats'}, this one has "
                             f"{'one size' if self.plain else 'several sizes or repeats'}: resume with the same dataset.")
        self.order, self.epoch, self.pos, self._epoch = list(state["order"]), state["epoch"], state["pos"], None


def _dataset_batches(dataset: KleinDataset, batch_size: int, generator: torch.Generator, seed: int) -> _BatchOrder:
    """Endless index batches: from one size at a time when the dataset has several (aspect buckets), with repeats."""
    return _BatchOrder(dataset, batch_size, generator, seed)


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

    `part` (data parallel, trainer/distributed.py): the sigmas and noise are drawn for the whole global
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


def train_lora(patcher, dataset: KleinDataset, targets: KleinTargets, cfg: TrainConfig, out_dir: Path,
               hooks: TrainHooks | None = None, ranks: Ranks | None = None) -> TrainResult:
    """Train, save checkpoints (and the full training state) every `cfg.save_every` steps and the final LoRA;
    leave `patcher` as it was. With `cfg.resume_from`, continue a saved run exactly where its state left it.

    `ranks` (data parallel, see trainer/distributed.py): each process trains its slice of every global batch of
    `cfg.batch_size` and the LoRA gradients are averaged; rank 0 alone writes checkpoints and states and calls
    `hooks.on_checkpoint`, the others wait for it. The saved state is the same for any process count. When the
    base is sharded over the processes (`cfg.shard_base`, trainer/sharding.py) the model stays sharded afterwards:
    that is for the command line's processes, which own their model.
    """
    hooks = hooks or TrainHooks()
    ranks = ranks or Ranks()
    cfg.validate()
    ranks.check_batch(cfg.batch_size)
    check_klein(patcher)
    if len(dataset) == 0:
        raise ValueError("the dataset is empty: connect a Klein Dataset Loader with at least one image.")
    resumed, changes, state_file = None, {}, None
    if cfg.resume_from.strip():
        state_file = resume.find_state(out_dir, cfg.output_name, cfg.resume_from)
        resumed = resume.load_state(state_file)
        changes = resume.check_compatible(resumed, state_file, cfg, targets.modules, dataset)
        run = resumed["run"]  # the run goes on under its own name, in its own folder
    else:
        run = ranks.broadcast(unique_run_name(out_dir, cfg.output_name) if ranks.is_main else None)
    ckpt_dir = out_dir / f"{run}_checkpoints"
    if ranks.is_main:
        remove_stale_temps(ckpt_dir, f"{run}_step")  # left by a killed writer: never renamed into place
        remove_stale_temps(out_dir, f"{run}.safetensors")
    start = time.perf_counter()
    with torch.inference_mode(False), torch.enable_grad():
        shard = sharding.decide(cfg.shard_base, patcher.model.diffusion_model, patcher.load_device, ranks)
        work = _training_model(patcher, ranks.world if shard else 0)
        dm = work.model.diffusion_model
        # the compute dtype: fp8-stored weights (UNETLoader weight_dtype fp8_*) are cast per layer to this one
        device, dtype = work.load_device, work.model.get_dtype_inference()
        if cfg.low_vram and work.model.get_dtype().itemsize > 1:
            logging.warning("Klein LoRA: low_vram with %s base weights; load the model with weight_dtype fp8_e4m3fn "
                            "(Load Diffusion Model) to halve their memory.", work.model.get_dtype())
        autocast = (torch.autocast(device.type, dtype=dtype)
                    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16) else nullcontext())
        compile_blocks = compile_support.usable(cfg.compile_blocks, device, resolve_compile(
            cfg.compile_blocks, device.type, not isinstance(autocast, nullcontext), uses_fp8_matmuls(dm), shard))
        options = block_options(dm, cfg.recompute, compile_blocks)
        meta = lora_metadata(
            format="comfyui-bfl-lora", base_model=klein_size(dm), base_model_file=base_model_file(patcher),
            rank=cfg.rank, alpha=cfg.alpha, learning_rate=cfg.learning_rate, steps=cfg.steps,
            batch_size=cfg.batch_size, seed=cfg.seed, optimizer=cfg.optimizer_used, recipe=cfg.recipe,
            trigger=dataset.trigger, dataset_size=len(dataset), resolution=dataset.resolution,
            target_groups=list(targets.groups), target_layers=targets.layers, targets=targets.modules,
            low_vram=cfg.low_vram, base_weight_dtype=str(work.model.get_dtype()).removeprefix("torch."),
            gradient_checkpointing=cfg.recompute, compiled=compile_blocks, software="klein-lora-studio",
            task_kind="image-to-image" if dataset.references else "text-to-image",
            buckets=[f"{w}x{h}:{len(v)}" for (w, h), v in dataset.bucket_assignment().items()],
            repeats=dataset.repeats, caption_dropout=dataset.caption_dropout,
            shuffle_tags=bool(dataset.context_variants), data_parallel_processes=ranks.world, sharded_base=shard)
        if resumed is not None:
            if resumed["meta"].get("base_model") != meta["base_model"]:
                raise ValueError(f"resume_from {state_file.name}: the run trained a {resumed['meta'].get('base_model')}"
                                 f" model, the MODEL input is {meta['base_model']}: connect the same base model.")
            history = json.loads(resumed["meta"].get("resumed_from", "[]"))
            meta["resumed_from"] = json.dumps([*history, {"state": state_file.name, "step": resumed["step"],
                                                          "changes": changes}])
            meta["resume_changes"] = json.dumps(changes)
        save_dtype = SAVE_DTYPES[cfg.save_dtype]
        generator = torch.Generator().manual_seed(cfg.seed)
        batches = _dataset_batches(dataset, cfg.batch_size, generator, cfg.seed)
        caption_rng = random.Random(f"{cfg.seed}:captions")  # dropout and tag-variant picks, apart from the noise
        losses: list[float] = []
        checkpoints: list[Path] = []
        first = 1
        with lora_layers(dm, targets.modules, cfg.rank, cfg.alpha, seed=cfg.seed) as lora, \
                (nullcontext() if compile_blocks else inplace_safe_norms(dm)), \
                comfy_training_mode(cfg.recompute), _dynamo_limits(compile_blocks):
            params = lora.parameters()
            opt = _make_optimizer(cfg.optimizer_used, params, cfg.learning_rate)
            if resumed is not None:
                lora.load_state_dict(resumed["lora"])
                opt.load_state_dict(resumed["optimizer"])
                for group in opt.param_groups:  # a changed learning rate applies from here (noted in meta)
                    if isinstance(group["lr"], torch.Tensor):
                        group["lr"].fill_(cfg.learning_rate)  # torchao keeps lr as a tensor and checks it stays one
                    else:
                        group["lr"] = cfg.learning_rate
                generator.set_state(resumed["generator"])
                caption_rng.setstate(resumed["caption_rng"])
                batches.load_state_dict(resumed["batches"])
                resume.set_global_rng_state(resumed["global_rng"])
                losses = list(resumed["losses"])
                checkpoints = [ckpt_dir / n for n in resumed["checkpoints"] if (ckpt_dir / n).is_file()]
                first = resumed["step"] + 1
                logging.info("Klein LoRA: resuming run '%s' from %s at step %d of %d", run, state_file.name,
                             resumed["step"], cfg.steps)

            def save_state(step: int) -> None:
                resume.save_state(resume.state_path(ckpt_dir, run, step), cfg=cfg, step=step, run=run,
                                  lora=lora.state_dict(torch.float32), optimizer=opt.state_dict(),
                                  generator=generator.get_state(), caption_rng=caption_rng.getstate(),
                                  batches=batches.state_dict(), losses=list(losses),
                                  checkpoints=[c.name for c in checkpoints], targets=list(targets.modules),
                                  dataset=resume.dataset_signature(dataset), meta=dict(meta))
                resume.prune_states(ckpt_dir, run, cfg.keep_states)

            for step in range(first, cfg.steps + 1):
                hooks.check_cancel()
                idx = next(batches)
                x0 = torch.stack([dataset.latents[i] for i in idx])
                ctx = stack_contexts([dataset.context_for(i, caption_rng) for i in idx])
                ref = torch.stack([dataset.references[i] for i in idx]) if dataset.references else None
                part = ranks.shard(len(idx)) if ranks.distributed else None
                oom = None
                try:
                    loss = train_step(dm, work, x0, ctx, generator, device, dtype, options, autocast, ref, part)
                    if part is not None:  # a rank that runs out of memory leaves the others waiting here
                        loss = ranks.average_gradients(params, part.stop - part.start, len(idx), loss)
                    if cfg.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                    opt.step()  # AdamW allocates its moments here, on the first step
                except torch.OutOfMemoryError as e:
                    oom = str(e).splitlines()[0] if str(e) else "out of memory"
                if oom is not None:  # raised outside the handler: the failed step's tensors are freed first
                    opt.zero_grad(set_to_none=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    raise torch.OutOfMemoryError(_oom_message(step, cfg, x0, checkpoints, ckpt_dir, run) +
                                                 f" (torch: {oom})")
                opt.zero_grad(set_to_none=True)
                losses.append(float(loss))
                hooks.on_step(step, cfg.steps, losses[-1])
                if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                    path = ckpt_dir / f"{run}_step{step:05d}.safetensors"
                    checkpoints.append(path)
                    if ranks.is_main:
                        _save(lora, path, save_dtype, {**meta, "steps": str(step)})
                        save_state(step)
                        with torch.no_grad():
                            hooks.on_checkpoint(step, path, work)
                    ranks.barrier()
            final = lora.state_dict(save_dtype)
            lora_path = out_dir / f"{run}.safetensors"
            if ranks.is_main:
                atomic_save_safetensors(final, lora_path, meta)
                if cfg.save_every:
                    save_state(cfg.steps)  # lets a finished run be extended: resume it with more steps
                with torch.no_grad():
                    hooks.on_checkpoint(cfg.steps, lora_path, work)
            ranks.barrier()
    logging.info("Klein LoRA: %d steps in %.1fs, final loss %.4f, saved %s", cfg.steps - first + 1,
                 time.perf_counter() - start, losses[-1], lora_path)
    return TrainResult(final, losses, lora_path, checkpoints, run, time.perf_counter() - start, shard,
                       sharding.local_bytes(dm))


def _oom_message(step: int, cfg: TrainConfig, x0: torch.Tensor, checkpoints: list[Path], ckpt_dir: Path,
                 run: str) -> str:
    """What to lower, in the order that saves the most, and what is kept."""
    h, w = x0.shape[-2] * 16, x0.shape[-1] * 16
    states = resume.list_states(ckpt_dir, run)
    kept = (f"the last checkpoint {checkpoints[-1].name} is kept" if checkpoints else "no checkpoint was saved yet")
    how = ("; resume it with resume_from 'latest' after lowering batch_size or turning gradient_checkpointing on "
           "(rank and the dataset must stay the same to resume)" if states else "")
    ckpt = "on" if cfg.recompute else "off"
    return (f"out of GPU memory in training step {step} (batch_size {cfg.batch_size}, {w}x{h} px, rank {cfg.rank}, "
            f"gradient_checkpointing {ckpt}). Lower batch_size, the resolution (Dataset Loader), or rank, or turn "
            f"gradient_checkpointing on (the low-VRAM mode: ~30% slower, much less memory); {kept}{how}.")


def _save(lora: LoraHandle, path: Path, dtype: torch.dtype, meta: dict[str, str]) -> Path:
    return atomic_save_safetensors(lora.state_dict(dtype), path, meta)
