"""The whole user graph under a card-size memory cap (issue 17 item 8, issue 19 item 3), one process per configuration.

1. Real-size random model files in a temporary ComfyUI models folder, in the formats the stock loaders take
   (bench/random_models.py: klein diffusion model, Qwen3-4B/8B text encoder in bf16 or ComfyUI's mixed fp8, the
   FLUX.2 VAE), made on the GPU when there is one; the time and size of each file are in the row. `--model tiny`
   writes the pack's tiny models instead (devtools/tiny_models.py: taef2, the dev text-encoder loader).
2. A small dataset (`--images` of `--res`², captions) in ComfyUI's input folder.
3. The process capped to the card (`--cap-gib`, after the files are written) with
   torch.cuda.set_per_process_memory_fraction, as bench_lowvram.py does. `--cap-mode ballast` (default) first fills
   the card beyond the cap, so that the driver, which ComfyUI asks where it places and unloads models, reports the
   small card too (the ballast is subtracted from every figure); `fraction` is the cap alone, with ComfyUI started
   with --reserve-vram (total - cap) so load_models_gpu plans for the card (`--no-comfy-sees-cap`: without).
4. The shipped low-VRAM style workflow (example_workflows/api/klein_style_lora_low_vram_api.json, from
   devtools/workflows.py style_lora_low_vram) with the loader names pointed at the files, the style recipe's rank,
   alpha and learning rate for `--steps` steps, a checkpoint and the prompt suite sampled every `--every` steps with
   `--sample-steps` steps, and `offload_blocks` from `--offload`; validated and run by ComfyUI's own executor
   (execution.validate_prompt, execution.PromptExecutor, as the server's prompt worker runs a queued prompt), in
   ComfyUI booted as a library with the pack loaded as a custom node (trainer/jobs/comfy_library.py).

Phases: loading (the loader nodes), text_encoding (captions and the suite's prompts), vae_encoding (the Dataset
Loader's images), training_setup (the trainer node up to its first step: the model onto the card, LoRA, compile,
the base model's samples), training_steps, sampling (the suite at each checkpoint), decoding (their VAE decode),
other. The phase follows ComfyUI's `executing` messages, the trainer's own progress events (nodes/progress_log.py
record) and four of the pack's functions wrapped in the copy of the pack ComfyUI loaded (encode_caption,
encode_prompts, sample_latents, decode). At every phase change the allocator's peak is read and reset, so each
phase's peak allocated/reserved is exact; a 20 ms sampler thread adds a trace. Also: s/step of the steps without
sampling between them, wall time per phase, finished or the error (out of memory: the node and phase), and which
models comfy.model_management.current_loaded_models holds (and how much of each is on the card) when training
starts, when each checkpoint's sampling starts and after its decode. On CPU the memory fields are null.

usage: bench_user_graph.py --model klein4b|klein9b|tiny [--res 1024] [--cap-gib 16] [--cap-mode ballast|fraction]
                           [--offload off|auto] [--te-dtype fp8_e4m3fn|bf16] [--steps 60] [--every 20]
                           [--sample-steps 20] [--images 8] [--tag NAME] [--keep DIR]
       writes $OUT/bench_user_graph_<model>_<tag>.json (OUT: default a temp folder) and prints `ROW {json}`
CPU smoke run: --model tiny --res 64 --steps 4 --every 2 --sample-steps 2 (tests/test_bench_user_graph.py)
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GIB = 2**30
NODE_PHASES = {"UNETLoader": "loading", "CLIPLoader": "loading", "VAELoader": "loading",
               "KleinTinyCLIPLoader": "loading", "KleinDatasetLoader": "vae_encoding",
               "KleinLoRATrainer": "training_setup"}
PHASES = ("loading", "text_encoding", "vae_encoding", "training_setup", "training_steps", "sampling", "decoding",
          "other")
# (module of the pack, function, phase while it runs)
TAGGED = (("trainer.data.dataset", "encode_caption", "text_encoding"),
          ("trainer.evaluation.sampling", "encode_prompts", "text_encoding"),
          ("trainer.evaluation.sampling", "sample_latents", "sampling"),
          ("trainer.evaluation.sampling", "decode", "decoding"))
DATASET = "klein_style_dataset"
_HELD: list = []  # the ballast of --cap-mode ballast


def _make_importable() -> None:
    spec = importlib.util.spec_from_file_location("klein_package_root", REPO / "devtools" / "package_root.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.make_importable(REPO)
    sys.path.insert(0, str(HERE))


def _cuda():
    import torch

    return torch.cuda if torch.cuda.is_available() else None


class PhaseClock:
    """The run's current phase (a stack: wrapped calls nest inside a node's phase), its wall time and exact
    allocator peaks per phase, and a sampled memory trace."""

    def __init__(self, ballast: int = 0, interval: float = 0.02):
        self.cuda, self.ballast, self.interval = _cuda(), ballast, interval
        self.stack = ["other"]
        self.stats: dict[str, dict] = {}
        self.t = time.perf_counter()
        self.t0 = self.t
        self.failed_in: str | None = None
        self.trace: list[list] = []  # [seconds, phase, max allocated GiB, max reserved GiB] per second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @property
    def phase(self) -> str:
        return self.stack[-1]

    def _gib(self, n: int) -> float:
        return (n - self.ballast) / GIB

    def _close(self) -> None:
        now = time.perf_counter()
        s = self.stats.setdefault(self.phase, {"wall_s": 0.0, "intervals": 0, "peak_allocated_gib": None,
                                               "peak_reserved_gib": None})
        s["wall_s"] += now - self.t
        s["intervals"] += 1
        if self.cuda is not None:
            for key, value in (("peak_allocated_gib", self.cuda.max_memory_allocated()),
                               ("peak_reserved_gib", self.cuda.max_memory_reserved())):
                s[key] = max(s[key] or 0.0, self._gib(value))
            self.cuda.reset_peak_memory_stats()
        self.t = now

    def set_base(self, phase: str) -> None:
        if self.stack[0] != phase:
            self._close()
            self.stack[0] = phase

    @contextlib.contextmanager
    def inside(self, phase: str):
        self._close()
        self.stack.append(phase)
        try:
            yield
        except BaseException:
            self.failed_in = self.failed_in or phase
            raise
        finally:
            self._close()
            self.stack.pop()

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            second = int(time.perf_counter() - self.t0)
            alloc, res = self._gib(self.cuda.memory_allocated()), self._gib(self.cuda.memory_reserved())
            if self.trace and self.trace[-1][0] == second and self.trace[-1][1] == self.phase:
                self.trace[-1][2], self.trace[-1][3] = max(self.trace[-1][2], alloc), max(self.trace[-1][3], res)
            else:
                self.trace.append([second, self.phase, alloc, res])

    def start(self) -> None:
        if self.cuda is not None:
            self.cuda.reset_peak_memory_stats()
            self._thread.start()

    def stop(self) -> None:
        self._close()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def loaded_models() -> list[dict]:
    """What ComfyUI's model management holds now: each model's kind, device and the part of it on that device."""
    import comfy.model_base
    import comfy.model_management as mm

    out = []
    for lm in mm.current_loaded_models:
        patcher = lm.model
        if patcher is None:
            continue
        kind = ("text_encoder" if getattr(patcher, "is_clip", False) else
                "diffusion_model" if isinstance(patcher.model, comfy.model_base.BaseModel) else "vae")
        out.append({"kind": kind, "class": type(patcher.model).__name__, "device": str(lm.device),
                    "on_device_gib": round(lm.model_loaded_memory() / GIB, 3)})
    return out


class RunWatch:
    """The executor's messages (the `server` it reports to) and the trainer's events: phases, steps, snapshots."""

    def __init__(self, prompt: dict, clock: PhaseClock):
        self.prompt, self.clock = prompt, clock
        self.client_id, self.last_node_id = "bench", None
        self.finished, self.error = False, None
        self.steps: list[tuple[int, float, int]] = []  # (step, time, samplings so far)
        self.samplings, self.checkpoints, self.sample_events = 0, 0, 0
        self.snapshots: list[dict] = []
        self._resnap = False

    def send_sync(self, event, data, sid=None) -> None:
        if event == "executing" and isinstance(data, dict) and data.get("node") is not None:
            self.clock.set_base(NODE_PHASES.get(self.prompt[str(data["node"])]["class_type"], "other"))
            self.last_node_id = data["node"]
        elif event == "execution_error":
            self.error = {"node": data.get("node_id"), "node_type": data.get("node_type"),
                          "phase": self.clock.failed_in or self.clock.phase, "type": data.get("exception_type"),
                          "message": str(data.get("exception_message"))[:800]}
        elif event == "execution_success":
            self.finished = True

    def snapshot(self, label: str) -> None:
        step = self.steps[-1][0] if self.steps else 0
        self.snapshots.append({"at": label, "step": step, "phase": self.clock.phase, "models": loaded_models()})

    def trainer_event(self, event: str, data: dict) -> None:
        if event == "klein_lora.progress":
            self.steps.append((data["step"], time.perf_counter(), self.samplings))
            self.clock.set_base("training_steps")
            if len(self.steps) == 1 or self._resnap:
                self.snapshot("training_start" if len(self.steps) == 1 else "training_after_sampling")
                self._resnap = False
        elif event == "klein_lora.checkpoint":
            self.checkpoints += 1
        elif event == "klein_lora.samples":
            self.sample_events += 1

    def tagged(self, fn, phase: str):
        def wrapper(*args, **kwargs):
            if phase == "sampling":
                self.samplings += 1
                self.snapshot("sampling_start")
            with self.clock.inside(phase):
                out = fn(*args, **kwargs)
            if phase == "decoding":
                self.snapshot("after_decoding")
                self._resnap = bool(self.steps)
            return out
        return wrapper

    def step_time(self) -> dict:
        """s/step over consecutive steps with no sampling between them, the first step (compilation) left out."""
        gaps = [b[1] - a[1] for a, b in zip(self.steps, self.steps[1:], strict=False) if a[2] == b[2] and a[0] >= 1]
        gaps = gaps[1:] if len(gaps) > 2 else gaps
        return {"s_per_step": statistics.median(gaps) if gaps else None,
                "s_per_step_mean": statistics.fmean(gaps) if gaps else None, "timed_steps": len(gaps)}


def boot(a, base: Path):
    """ComfyUI as a library with the pack as a custom node; with a fraction cap, --reserve-vram (total - cap)."""
    import torch
    from klein_lora_studio.devtools.server import prepare_base
    from klein_lora_studio.trainer.jobs import comfy_library

    try:
        import av  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(HERE / "avstub"))
    extra, cuda = [], torch.cuda.is_available()
    if cuda and a.cap_gib and a.cap_mode == "fraction" and a.comfy_sees_cap:
        total = torch.cuda.get_device_properties(0).total_memory / GIB
        extra = ["--reserve-vram", f"{max(0.0, total - a.cap_gib):.3f}"]
    os.environ["KLEIN_LORA_DEV_NODES"] = "1" if a.model == "tiny" else "0"
    prepare_base(base)
    comfy = os.environ.get("COMFYUI_PATH") or str(REPO / ".comfy")
    nodes = comfy_library.boot(comfy, base, cpu=not cuda, builtin_nodes=True, extra_args=extra,
                               extra_model_paths=False)
    if not comfy_library.load_custom_node(nodes, base / "custom_nodes" / "klein_lora_studio"):
        raise RuntimeError(f"the pack did not load as a custom node from {base / 'custom_nodes'}")
    return nodes, extra


def write_files(a, models_dir: Path) -> tuple[dict, dict]:
    """The model files (names for the loaders) and what writing them cost."""
    import torch

    t0 = time.perf_counter()
    if a.model == "tiny":
        from klein_lora_studio.devtools import tiny_models

        tiny_models.write_tiny_models(models_dir)
        names = {"unet": tiny_models.UNET_FILE, "clip": tiny_models.TE_FILE, "vae": "taef2"}
        written = {p.name: {"bytes": p.stat().st_size} for p in models_dir.rglob("*.safetensors")}
    else:
        import random_models

        device = "cuda" if torch.cuda.is_available() else "cpu"
        files = random_models.write_models(models_dir, a.model, a.te_dtype, device)
        names, written = {"unet": files.unet, "clip": files.clip, "vae": files.vae}, files.written
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    info = {"files": written, "write_s": time.perf_counter() - t0,
            "disk_gib": sum(w["bytes"] for w in written.values()) / GIB}
    logging.info("model files: %.2f GiB in %.1f s", info["disk_gib"], info["write_s"])
    return names, info


def write_dataset(input_dir: Path, n: int, res: int) -> None:
    from klein_lora_studio.devtools.datasets import write_concept_dataset

    write_concept_dataset(input_dir / DATASET, n=n, size=res)


def cap(a) -> int:
    """Cap the process to the card (after the files are written); the ballast's bytes (0 without one).

    Both modes set torch.cuda.set_per_process_memory_fraction. `ballast` first fills the card beyond the cap, because
    ComfyUI reads free memory from the driver where it places a model (text_encoder_initial_device puts a text
    encoder on the card when the driver says it fits; free_memory unloads by the driver's figure): with the ballast
    the driver reports the small card to ComfyUI and the trainer alike. `fraction` alone relies on --reserve-vram."""
    import torch

    if not (a.cap_gib and torch.cuda.is_available()):
        return 0
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    size = 0
    if a.cap_mode == "ballast":
        free, _ = torch.cuda.mem_get_info()
        size = max(0, free - int(a.cap_gib * GIB))
        _HELD.append(torch.empty(size, dtype=torch.uint8, device="cuda"))  # held for the whole run
    torch.cuda.set_per_process_memory_fraction(min(1.0, (size + a.cap_gib * GIB) / total))
    return size


def make_prompt(a, names: dict) -> dict:
    """The shipped low-VRAM style workflow, its loaders pointed at the files and the trainer set for the bench."""
    from klein_lora_studio.devtools.workflows import api_path, to_tiny
    from klein_lora_studio.trainer.training.recipes import RECIPES

    api = json.loads(api_path("klein_style_lora_low_vram").read_text(encoding="utf-8"))
    if a.model == "tiny":
        api = to_tiny(api, DATASET, steps=a.steps, resolution=a.res, save_every=a.every, output_name="bench_graph")
    style = RECIPES["style"]
    for node in api.values():
        t, inp = node["class_type"], node["inputs"]
        if t == "UNETLoader":
            inp["unet_name"] = names["unet"]
        elif t in ("CLIPLoader", "KleinTinyCLIPLoader"):
            inp["clip_name"] = names["clip"]
        elif t == "VAELoader":
            inp["vae_name"] = names["vae"]
        elif t == "KleinDatasetLoader":
            inp.update(folder=DATASET, resolution=a.res)
        elif t == "KleinLoRATrainer":
            inp.update({"recipe": "custom", "recipe.rank": style.rank, "recipe.alpha": style.alpha,
                        "recipe.learning_rate": style.learning_rate, "recipe.steps": a.steps, "save_every": a.every,
                        "sample_steps": a.sample_steps, "offload_blocks": a.offload, "output_name": "bench_graph"})
    return api


def _pack_module(nodes, name: str):
    """A module of the copy of the pack ComfyUI loaded (under its own name), whose functions the graph calls."""
    root = nodes.NODE_CLASS_MAPPINGS["KleinLoRATrainer"].__module__.split(".")[0]
    return importlib.import_module(f"{root}.{name}")


def watch(nodes, w: RunWatch) -> dict:
    """Route the pack's events and tagged calls to `w`; returns the streamer record (blocks streamed)."""
    for module, fn, phase in TAGGED:
        m = _pack_module(nodes, module)
        setattr(m, fn, w.tagged(getattr(m, fn), phase))
    log = _pack_module(nodes, "nodes.progress_log")
    record = log.record

    def tee(event, data):
        w.trainer_event(event, data)
        return record(event, data)
    log.record = tee
    stream = _pack_module(nodes, "trainer.model.block_stream").BlockStreamer
    place, found = stream.place, {}

    def spy(self, dm):
        found.update(streamed_blocks=len(self.streamed), blocks=len(self.blocks))
        return place(self, dm)
    stream.place = spy
    return found


def execute(prompt: dict, w: RunWatch) -> None:
    """ComfyUI's own validation and executor, with the cache the server's prompt worker sets up (main.py)."""
    import comfy.cli_args
    import comfy.model_management as mm
    import execution

    args = comfy.cli_args.args
    ram = min(10.0, max(2.0, mm.total_ram * 0.10 / 1024.0))
    kind = (execution.CacheType.CLASSIC if args.cache_classic else execution.CacheType.LRU if args.cache_lru > 0
            else execution.CacheType.NONE if args.cache_none else execution.CacheType.RAM_PRESSURE)
    executor = execution.PromptExecutor(w, cache_type=kind, cache_args={
        "lru": args.cache_lru, "ram": ram, "ram_inactive": min(128.0, mm.total_ram / 1024.0)})
    prompt_id = str(uuid.uuid4())
    valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid:
        raise RuntimeError(f"ComfyUI refused the workflow: {error}; {json.dumps(node_errors)[:1500]}")
    executor.execute(prompt, prompt_id, {"client_id": w.client_id}, outputs)


def _verdict(w: RunWatch) -> dict:
    """The loaded models at the start of training and at the first checkpoint's sampling after it."""
    def at(label: str):
        return next((s for s in w.snapshots if s["at"] == label), None)

    def on_card(snap, kind: str):
        return None if snap is None else any(m["kind"] == kind and "cuda" in m["device"] and m["on_device_gib"] > 0
                                             for m in snap["models"])
    start = at("training_start")
    sampling = next((s for s in w.snapshots if s["at"] == "sampling_start" and s["step"] >= 1), None)
    decoded = next((s for s in w.snapshots if s["at"] == "after_decoding" and s["step"] >= 1), None)
    out = {"loaded_at_training_start": start and start["models"], "loaded_at_sampling": sampling and sampling["models"],
           "loaded_after_decoding": decoded and decoded["models"]}
    if _cuda() is not None:
        out.update(te_on_card_during_steps=on_card(start, "text_encoder"), vae_on_card_during_steps=on_card(start, "vae"),
                   vae_on_card_at_decode=on_card(decoded, "vae"))
    return out


def run(a) -> dict:
    import torch

    t_start = time.perf_counter()
    base = Path(a.keep) if a.keep else Path(tempfile.mkdtemp(prefix="bench-graph-"))
    try:
        nodes, extra = boot(a, base)
        import folder_paths

        names, files = write_files(a, Path(folder_paths.models_dir))
        write_dataset(Path(folder_paths.get_input_directory()), a.images, a.res)
        ballast = cap(a)
        prompt = make_prompt(a, names)
        clock = PhaseClock(ballast)
        w = RunWatch(prompt, clock)
        streamer = watch(nodes, w)
        clock.start()
        t0 = time.perf_counter()
        try:
            execute(prompt, w)
        finally:
            clock.stop()
        graph_s = time.perf_counter() - t0
        samples_dir = Path(folder_paths.get_output_directory()) / "klein_lora_samples"
        grids = sorted(p.name for p in samples_dir.glob("*.png")) if samples_dir.is_dir() else []
        phases = {p: clock.stats[p] for p in PHASES if p in clock.stats}
        peaks = [s["peak_allocated_gib"] for s in phases.values() if s["peak_allocated_gib"] is not None]
        row = dict(model=a.model, res=a.res, cap_gib=a.cap_gib or None, cap_mode=a.cap_mode, offload=a.offload,
                   te_dtype=a.te_dtype if a.model != "tiny" else "tiny", steps=a.steps, every=a.every,
                   sample_steps=a.sample_steps, images=a.images, finished=w.finished and w.error is None,
                   error=w.error, phases=phases, phase_order=list(PHASES),
                   peak_allocated_gib=max(peaks) if peaks else None,
                   peak_reserved_gib=max((s["peak_reserved_gib"] or 0.0) for s in phases.values()) if peaks else None,
                   steps_done=w.steps[-1][0] if w.steps else 0, checkpoints=w.checkpoints,
                   checkpoint_samples=w.sample_events, sample_grids=grids, samplings=w.samplings,
                   **w.step_time(), **_verdict(w), snapshots=w.snapshots, streamer=streamer or None,
                   comfy_args=extra, ballast_gib=ballast / GIB if ballast else None, graph_s=graph_s,
                   model_files=files, mem_trace=clock.trace, device=torch.cuda.get_device_name(0)
                   if torch.cuda.is_available() else "cpu", torch=torch.__version__)
        row["wall_s"] = time.perf_counter() - t_start
        return row
    finally:
        if not a.keep:
            shutil.rmtree(base, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("klein4b", "klein9b", "tiny"), default="klein4b")
    ap.add_argument("--res", type=int, default=1024)
    ap.add_argument("--cap-gib", type=float, default=0.0, help="card size to emulate (0: no cap)")
    ap.add_argument("--cap-mode", choices=("ballast", "fraction"), default="ballast",
                    help="ballast: the card beyond the cap filled first, and the fraction cap; fraction: the cap alone")
    ap.add_argument("--comfy-sees-cap", action=argparse.BooleanOptionalAction, default=True,
                    help="fraction cap: start ComfyUI with --reserve-vram (total - cap)")
    ap.add_argument("--offload", choices=("off", "auto"), default="off", help="the trainer's offload_blocks")
    ap.add_argument("--te-dtype", choices=("fp8_e4m3fn", "bf16"), default="fp8_e4m3fn")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--every", type=int, default=20)
    ap.add_argument("--sample-steps", type=int, default=20)
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--tag", default="")
    ap.add_argument("--keep", default="", help="ComfyUI base folder to use and keep (default: a temp one, removed)")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    _make_importable()
    row = run(a)
    tag = a.tag or f"{a.res}_cap{a.cap_gib:g}_{a.offload}"
    out = Path(os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench-out-"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bench_user_graph_{a.model}_{tag}.json"
    path.write_text(json.dumps(row, indent=1), encoding="utf-8")
    logging.info("wrote %s", path)
    print("ROW " + json.dumps({k: v for k, v in row.items() if k not in ("mem_trace", "snapshots")}), flush=True)
    return 0 if row["finished"] else 1


if __name__ == "__main__":
    sys.exit(main())
