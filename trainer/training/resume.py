"""The full training state beside each checkpoint, and continuing a run from it bit for bit.

`<run>_checkpoints/<run>_stepNNNNN.trainstate` sits beside the checkpoint of the same step. It holds
everything the next step depends on: the LoRA weights in float32 (the checkpoint may be bf16), the
optimizer's moments, the run's own noise/timestep generator, its caption RNG, the batch order and
position, the process-wide RNGs (torch CPU and CUDA, numpy, python), the losses so far, the config,
the targets and the dataset's shape. It is written with torch.save to a temp file renamed into place
(paths.atomic_save_torch) and read back with weights_only=True, so loading one runs no code.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import random
from pathlib import Path

import numpy as np
import torch

from ..paths import atomic_save_torch, is_within, safe_name
from .run_files import STATE_SUFFIX, RunFiles, parse_step  # noqa: F401 - STATE_SUFFIX: the state files' suffix

FORMAT = "klein-lora-train-state"
VERSION = 1
# A resumed run must match these: the saved tensors only fit a LoRA of the same shape and scale, and
# the optimizer's saved moments only fit the same optimizer.
FIXED = ("rank", "alpha", "optimizer", "adapter", "lokr_factor", "lokr_full_rank")
# Not compared: where the run came from, how it is saved next, and how the frozen base is laid out over the
# processes or between the card and CPU memory (sharded, streamed or not, the update is the same).
IGNORED = ("resume_from", "output_name", "shard_base", "offload_blocks")


def dataset_signature(dataset) -> dict:
    """What the saved batch order refers to: the number of items and the latent size of each."""
    return {"items": len(dataset), "sizes": [list(dataset.size_of(i)) for i in range(len(dataset))],
            "repeats": int(dataset.repeats)}


def global_rng_state() -> dict:
    """The process-wide RNGs, in tensors and plain values only (weights_only loading accepts nothing else)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"torch": torch.get_rng_state(), "python": random.getstate(),
           "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                     "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_global_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            logging.warning("Klein LoRA: the state has %d CUDA RNG states, this machine %d GPUs; CUDA RNGs not restored "
                            "(the trainer draws its noise from its own CPU generator, so the run is unaffected).",
                            len(cuda), torch.cuda.device_count())


def save_state(path: Path, **fields) -> Path:
    """Atomically write one state file; `fields` are the loop's (see train_lora)."""
    cfg = fields.pop("cfg")
    state = {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(cfg),
             "global_rng": global_rng_state(), **fields}
    return atomic_save_torch(state, path)


def load_state(path: Path) -> dict:
    path = Path(path)
    try:
        with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; the optimizer updates these in place
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"resume_from: {path} is not a readable training state ({type(e).__name__}: {e}). "
                         f"Pick an earlier one from {path.parent} or leave resume_from empty for a new run.") from e
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"resume_from: {path} is not a Klein LoRA training state (no '{FORMAT}' marker).")
    if state.get("version", 0) > VERSION:
        raise ValueError(f"resume_from: {path} was written by a newer Klein LoRA Studio (state version "
                         f"{state['version']} > {VERSION}): update the pack to resume it.")
    return state


def list_states(ckpt_dir: Path, run: str) -> list[Path]:
    """The run's state files in its checkpoints folder `ckpt_dir`, oldest step first."""
    return RunFiles(Path(ckpt_dir).parent, run).states()


def find_state(out_dir: Path, output_name: str, resume_from: str) -> Path:
    """The state file `resume_from` names: 'latest' (newest state of run `output_name`), a checkpoint or state
    file name (with or without extension), or a path to one inside `out_dir`."""
    out_dir = Path(out_dir)
    value = resume_from.strip()
    if value.lower() == "latest":
        files = RunFiles(out_dir, output_name)
        states = files.states()
        if not states:
            raise ValueError(f"resume_from 'latest': no training state of run '{output_name}' in "
                             f"{files.checkpoints_dir} (a state is saved beside each checkpoint, every save_every "
                             "steps). Set output_name to the run to continue, or leave resume_from empty to start a "
                             "new run.")
        return states[-1]
    raw = Path(value).expanduser()
    parsed = parse_step(raw.name)
    if not parsed:
        example = RunFiles(out_dir, output_name)
        raise ValueError(f"resume_from '{resume_from}' names no checkpoint: give 'latest' or a checkpoint such as "
                         f"{example.checkpoint(100).name} (from {example.checkpoints_dir.name} in {out_dir}).")
    files = RunFiles(out_dir, parsed[0])
    folder = files.checkpoints_dir
    if raw.is_absolute() or len(raw.parts) > 1:
        folder = (raw if raw.is_absolute() else out_dir / raw).resolve().parent
        if not is_within(folder, out_dir.resolve()):
            raise ValueError(f"resume_from '{resume_from}' is outside the LoRA folder {out_dir}: runs resume from "
                             "their own checkpoints folder there.")
    path = folder / files.state(parsed[1]).name
    if not path.is_file():
        have = [p.name for p in list_states(folder, parsed[0])]
        raise ValueError(f"resume_from '{resume_from}': no training state {path.name} in {folder} (states kept: "
                         f"{have or 'none'}). Pick one of those or 'latest'.")
    return path


def checked_run(state: dict, path: Path, out_dir: Path) -> RunFiles:
    """The run a state continues, checked like output_name: every name a state gives becomes a path, so a state
    file that names another run, a folder or a file outside `out_dir` is refused before anything is written."""
    path = Path(path)
    run = state.get("run")
    named = parse_step(path.name)
    advice = f"Pick another state from {path.parent} or leave resume_from empty for a new run."
    try:
        ok = isinstance(run, str) and safe_name(run, "its run") == run
    except ValueError:
        ok = False
    if not ok or named is None or named[0] != run:
        raise ValueError(f"resume_from {path.name}: the state's run {run!r} is not the plain run name its file is "
                         f"named after ('{named[0] if named else '?'}'): it was edited or belongs elsewhere. {advice}")
    files = RunFiles(Path(out_dir), run)
    listed = state.get("checkpoints", [])
    bad = [n for n in listed if not files.is_checkpoint_name(n)] if isinstance(listed, list) else [listed]
    if bad:
        raise ValueError(f"resume_from {path.name}: the state lists checkpoints {bad[:3]} that are not file names of "
                         f"run '{run}' in {files.checkpoints_dir.name}. {advice}")
    return files


def check_compatible(state: dict, path: Path, cfg, modules: list[str], dataset) -> dict[str, list]:
    """Raise on what a run cannot change midway; return what it may change, {field: [before, now]}."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    before = {**defaults, **state["config"]}  # a state written before a field existed had its default
    for key in FIXED:
        if before.get(key) != getattr(cfg, key):
            raise ValueError(f"resume_from {path.name}: the run was trained with {key} {before.get(key)}, this run asks "
                             f"for {key} {getattr(cfg, key)}. Set {key} back to {before.get(key)} to resume, or leave "
                             "resume_from empty to train a new LoRA.")
    fields = {f.name for f in dataclasses.fields(cfg)}
    used_before = type(cfg)(**{k: v for k, v in before.items() if k in fields}).optimizer_used
    if used_before != cfg.optimizer_used:  # low_vram swaps AdamW's state for 8-bit moments: not interchangeable
        raise ValueError(f"resume_from {path.name}: the run's optimizer state is {used_before}, this run would use "
                         f"{cfg.optimizer_used} (low_vram {before.get('low_vram', False)} then, {cfg.low_vram} now). Set "
                         "low_vram back to resume, or leave resume_from empty to train a new LoRA.")
    if list(state["targets"]) != list(modules):
        gone = sorted(set(state["targets"]) - set(modules))
        new = sorted(set(modules) - set(state["targets"]))
        raise ValueError(f"resume_from {path.name}: the run trained {len(state['targets'])} layers, this run targets "
                         f"{len(modules)} (missing {gone[:3]}{'...' if len(gone) > 3 else ''}, added "
                         f"{new[:3]}{'...' if len(new) > 3 else ''}). Connect the same Block Target Selector settings "
                         "to resume, or leave resume_from empty to train a new LoRA.")
    sig = dataset_signature(dataset)
    if state["dataset"]["items"] != sig["items"] or state["dataset"]["sizes"] != sig["sizes"]:
        raise ValueError(f"resume_from {path.name}: the run was trained on {state['dataset']['items']} items, this "
                         f"dataset has {sig['items']}" + ("" if state["dataset"]["items"] != sig["items"] else
                                                          " with other sizes") +
                         ": resume with the same dataset, or leave resume_from empty to start a new run.")
    if state["step"] >= cfg.steps:
        raise ValueError(f"resume_from {path.name}: the run is already at step {state['step']} and steps is "
                         f"{cfg.steps}: raise steps above {state['step']} to train further.")
    now = dataclasses.asdict(cfg)
    defaults = dataclasses.asdict(type(cfg)(**{k: now[k] for k in ("rank", "alpha", "learning_rate", "steps")}))
    was = {k: before.get(k, defaults[k]) for k in now}  # a field newer than the state: its default then
    changes = {k: [was[k], v] for k, v in now.items() if k not in IGNORED and was[k] != v}
    if state["dataset"].get("repeats") != sig["repeats"]:
        changes["repeats"] = [state["dataset"].get("repeats"), sig["repeats"]]
    if changes:
        logging.warning("Klein LoRA: resuming %s at step %d with changes %s", path.name, state["step"],
                        json.dumps(changes))
    return changes


def prune_states(files: RunFiles, keep: int) -> None:
    """Keep only the newest `keep` states (0: all): each holds the optimizer too, 3x the fp32 LoRA."""
    if keep <= 0:
        return
    for p in files.states()[:-keep]:
        p.unlink(missing_ok=True)
