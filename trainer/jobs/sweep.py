"""Sweeps: a grid of run configs (rank x steps, a learning-rate sweep) as independent jobs over the free GPUs.

`expand` turns a base config and `--set field=v1,v2` lists into one config per combination (named
after its values); `run_sweep` runs them as jobs (trainer/jobs/launch.py), one per slot (a GPU, or "0+1" for
a data-parallel pair), as many at once as there are slots, and keeps a manifest (sweep.json, rewritten
atomically after every change) with each job's status, LoRA and checkpoints. The Rank x Steps Grid node
reads the manifest (its `sweep_manifest` input).
"""
from __future__ import annotations

import itertools
import json
import logging
import queue
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

from .. import paths
from . import config as run_config
from . import launch as jobs

MANIFEST = "sweep.json"
FORMAT = "klein-lora-sweep"


def _value(text: str):
    """A --set value as JSON when it parses (8, 1e-4, true), else the text itself."""
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_sets(items: list[str]) -> dict[str, list]:
    """['rank=8,16', 'learning_rate=1e-4,3e-4'] -> {'rank': [8, 16], 'learning_rate': [0.0001, 0.0003]}."""
    out: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key or not values.strip():
            raise ValueError(f"--set '{item}': write field=value1,value2 (e.g. rank=8,16 or learning_rate=1e-4,3e-4).")
        if key in out:
            raise ValueError(f"--set {key} is given twice: list all its values in one --set.")
        out[key] = [_value(v.strip()) for v in values.split(",") if v.strip()]
    return out


def parse_slots(text: str) -> list[list[str]]:
    """'0,1' -> [['0'], ['1']] (one job per GPU); '0+1,2+3' -> two data-parallel pairs; 'cpu,cpu' -> two CPU slots."""
    slots = [s.strip() for s in (text or "").split(",") if s.strip()]
    if not slots:
        raise ValueError("--gpus is empty: give the GPUs to spread the jobs over, e.g. 0,1 (or 0+1 for one "
                         "data-parallel job on both).")
    out = [jobs.parse_devices(s.replace("+", ",")) for s in slots]
    used = [d for s in out for d in s if d != "cpu"]
    if len(used) != len(set(used)):
        raise ValueError(f"--gpus '{text}' gives a GPU to two slots: each GPU runs one job at a time.")
    return out


def _tag(key: str, value) -> str:
    short = {"learning_rate": "lr", "rank": "r", "steps": "s", "alpha": "a", "batch_size": "bs", "seed": "seed"}
    name = short.get(key.rpartition(".")[2], key.rpartition(".")[2])
    return re.sub(r"[^A-Za-z0-9.-]", "", f"{name}{value:g}" if isinstance(value, float) else f"{name}{value}")


def expand(base: run_config.RunConfig, sets: dict[str, list]) -> list[tuple[str, dict, run_config.RunConfig]]:
    """(job name, overrides, config) for every combination of the `sets` values."""
    keys = list(sets)
    out = []
    for values in itertools.product(*(sets[k] for k in keys)):
        overrides = dict(zip(keys, values, strict=True))
        name = paths.safe_name("_".join([base.train.output_name, *(_tag(k, v) for k, v in overrides.items())])[:100],
                               "sweep job name")
        cfg = run_config.with_overrides(base, {**overrides, "output_name": name})
        out.append((name, overrides, cfg))
    return out


class Sweep:
    """A manifest on disk and the jobs it lists."""

    def __init__(self, folder: Path, base: Path, sets: dict[str, list]):
        self.folder, self.path = Path(folder), Path(folder) / MANIFEST
        self.lock = threading.Lock()
        self.data = {"format": FORMAT, "version": 1, "base_config": str(base), "sets": sets, "jobs": []}

    def add(self, name: str, overrides: dict, config: Path) -> dict:
        job = {"name": name, "overrides": overrides, "config": str(config), "status": "queued", "devices": [],
               "lora_path": "", "checkpoints": [], "final_loss": None, "error": ""}
        self.data["jobs"].append(job)
        return job

    def update(self, job: dict | None = None, **fields) -> None:
        with self.lock:
            if job is not None:
                job.update(fields)
            paths.atomic_write_text(json.dumps(self.data, indent=2) + "\n", self.path)


def run_sweep(base_config: Path, sets: dict[str, list], slots: list[list[str]], folder: Path | None = None,
              on_event: Callable[[dict, dict], None] = lambda job, event: None) -> Path:
    """Write one config per combination into `folder` (default: beside the base config, in sweep/), run them over
    `slots`, and return the manifest. A failed job is recorded and the others go on."""
    base_config = Path(base_config).resolve()
    base = run_config.load(base_config)
    folder = Path(folder) if folder else base_config.parent / "sweep"
    sweep = Sweep(folder, base_config, sets)
    for name, overrides, cfg in expand(base, sets):
        sweep.add(name, overrides, run_config.save(cfg, folder / f"{name}.json"))
    sweep.update()
    free: queue.Queue = queue.Queue()
    for s in slots:
        free.put(s)

    def work(job: dict) -> None:
        devices = free.get()
        try:
            sweep.update(job, status="running", devices=devices, started_at=time.time())
            j = jobs.Job(Path(job["config"]), devices, log_prefix=f"sweep {job['name']}")
            for event in j.events():
                on_event(job, event)
            done = j.done
            sweep.update(job, status="done", lora_path=done["lora_path"], checkpoints=done["checkpoints"],
                         final_loss=done["losses"][-1] if done["losses"] else None, finished_at=time.time())
        except Exception as e:  # noqa: BLE001 - one failed job is recorded; the sweep goes on
            logging.warning("Klein LoRA sweep: job %s failed: %s", job["name"], e)
            sweep.update(job, status="failed", error=str(e)[-2000:], finished_at=time.time())
        finally:
            free.put(devices)

    threads = [threading.Thread(target=work, args=(job,), daemon=True) for job in sweep.data["jobs"]]
    for t in threads:  # each thread waits for a free slot, so at most len(slots) jobs run at once
        t.start()
    for t in threads:
        t.join()
    return sweep.path


def manifest_loras(path: Path, output_dir: Path) -> list[Path]:
    """Every finished job's checkpoints and final LoRA, in job order (for the Rank x Steps Grid).

    Job names are checked as output_name is before anything of the manifest is echoed or used: a
    crafted manifest's names never reach an error message or a path.
    """
    path = Path(path)
    if not path.is_absolute():
        path = Path(output_dir) / path
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"sweep_manifest: {path} is not a readable sweep manifest ({e}): give the sweep.json "
                         "that `python -m klein_lora_studio.sweep` wrote.") from e
    if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("jobs"), list):
        raise ValueError(f"sweep_manifest: {path} is not a Klein LoRA sweep manifest (no '{FORMAT}' marker and "
                         "job list).")
    _check_job_names(data["jobs"], path)
    done = [j for j in data["jobs"] if j.get("status") == "done"]
    if not done:
        states = {j["name"]: j.get("status") for j in data["jobs"]}
        raise ValueError(f"sweep_manifest: no job of {path} has finished yet ({states}).")
    try:
        return [Path(p) for j in done for p in [*j["checkpoints"], j["lora_path"]]]
    except (KeyError, TypeError) as e:
        raise ValueError(f"sweep_manifest: a finished job of {path} lists no checkpoints or lora_path ({e!r}): the "
                         "manifest was edited or is not a sweep's; run the sweep again.") from None


def _check_job_names(jobs: list, path: Path) -> None:
    """Every job is an object with a plain name (the sweep runner writes only such names)."""
    for i, job in enumerate(jobs):
        try:
            paths.safe_name(str(job["name"]), "job name")
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"sweep_manifest: job {i + 1} of {path.name} has a name that is not a plain file name "
                             "(the sweep runner writes only such names): the manifest was edited or is not a "
                             "sweep's; run the sweep again.") from None
