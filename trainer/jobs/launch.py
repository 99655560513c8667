"""A run config as a child process on chosen GPUs, followed through its JSON-line progress.

One device: `python -m <pack>.train CONFIG` with CUDA_VISIBLE_DEVICES set to it. Several GPUs:
`accelerate launch --multi_gpu --num_processes N -m <pack>.train CONFIG` over the listed GPUs. CPU
processes (tests, or a machine without GPUs): "cpu" once per process; several go through torchrun,
because accelerate's launcher starts only one CPU process without an MPI host file.
"""
from __future__ import annotations

import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path

from .events import EVENT_KEY, PACK_DIR, PACKAGE, parse_event

STOP_GRACE_S = 30  # after SIGTERM, before SIGKILL: a checkpoint being written is renamed into place or dropped


def parse_devices(text: str) -> list[str]:
    """'0,1' -> ['0', '1']; 'cpu' / 'cpu,cpu' -> CPU processes; '' -> [] (train in this process)."""
    items = [t.strip() for t in (text or "").replace(" ", ",").split(",") if t.strip()]
    if not items:
        return []
    if all(t.lower() == "cpu" for t in items):
        return ["cpu"] * len(items)
    bad = [t for t in items if not t.isdigit()]
    if bad:
        raise ValueError(f"gpus '{text}': {bad} are not GPU numbers. Give GPU indices such as '0' or '0,1' (as "
                         "nvidia-smi numbers them), 'cpu' for a CPU process, or leave it empty to train in ComfyUI.")
    if len(set(items)) != len(items):
        raise ValueError(f"gpus '{text}' lists a GPU twice: give each GPU once.")
    return items


def gpu_count() -> int:
    """The CUDA GPUs of this machine, numbered as a job's CUDA_VISIBLE_DEVICES takes them (0 without CUDA).

    A job replaces CUDA_VISIBLE_DEVICES, so where ComfyUI itself runs restricted to some GPUs
    (--cuda-device), the machine's own count (NVML's, as torch reads it) is the one that matters.
    """
    import torch

    if not torch.cuda.is_available():
        return 0
    if os.environ.get("CUDA_VISIBLE_DEVICES") is not None:
        raw = getattr(torch.cuda, "_raw_device_count_nvml", lambda: -1)()
        if raw > 0:
            return raw
    return torch.cuda.device_count()


def job_devices(text: str) -> list[str]:
    """parse_devices, and each GPU number one that exists: checked when the prompt is queued, not after the export."""
    devices = parse_devices(text)
    if not devices or devices[0] == "cpu":
        return devices
    count = gpu_count()
    if count == 0:
        import torch

        raise ValueError(f"gpus '{text}': this machine has no CUDA GPU that PyTorch can use (torch "
                         f"{torch.__version__}, CUDA {torch.version.cuda or 'not built in'}), so the job would run on "
                         "the CPU. Leave gpus empty to train in ComfyUI, or give 'cpu' for a CPU job.")
    missing = [d for d in devices if int(d) >= count]
    if missing:
        raise ValueError(f"gpus '{text}': GPU {', '.join(missing)} does not exist; this machine has {count} GPU"
                         f"{'s' if count > 1 else ''}, numbered 0 to {count - 1} (as nvidia-smi lists them).")
    return devices


def import_root() -> Path:
    """A folder on the child's PYTHONPATH where this pack imports as `klein_lora_studio`, whatever its folder name."""
    if PACK_DIR.name == PACKAGE:
        return PACK_DIR.parent
    import hashlib

    tag = hashlib.sha1(str(PACK_DIR).encode()).hexdigest()[:10]  # one folder per install: two never swap the link
    root = Path(tempfile.gettempdir()) / f"klein-lora-pkg-{os.getuid() if hasattr(os, 'getuid') else 0}-{tag}"
    link = root / PACKAGE
    root.mkdir(exist_ok=True)
    if not (link.is_symlink() and link.resolve() == PACK_DIR):
        tmp = root / f".{PACKAGE}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(PACK_DIR, target_is_directory=True)
        os.replace(tmp, link)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(config: Path, devices: list[str], extra: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) that run `config` on `devices`."""
    if not devices:
        raise ValueError("no devices given for the job")
    py, module = sys.executable, f"{PACKAGE}.train"
    args = [str(config), *(extra or [])]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(import_root()), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("PYTHONUNBUFFERED", "1")
    n = len(devices)
    if devices[0] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
        env.setdefault("OMP_NUM_THREADS", "1")
        args.append("--cpu")
        if n == 1:
            return [py, "-m", module, *args], env
        return [py, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_addr", "127.0.0.1",
                "--master_port", str(free_port()), "-m", module, *args], env
    env["CUDA_VISIBLE_DEVICES"] = ",".join(devices)
    if n == 1:
        return [py, "-m", module, *args], env
    return [py, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
            "-m", module, *args], env


class JobError(RuntimeError):
    pass


class Job:
    """A started run: `events()` yields its progress events; `stop()` ends it (checkpoints on disk stay)."""

    def __init__(self, config: Path, devices: list[str], extra: list[str] | None = None, log_prefix: str = "job",
                 verdicts: bool = False):
        cmd, env = command(Path(config).resolve(), devices, extra)
        logging.info("Klein LoRA: starting %s", " ".join(cmd))
        self.config, self.devices, self.prefix = Path(config), devices, log_prefix
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     bufsize=1, start_new_session=os.name != "nt", cwd=str(import_root()),
                                     stdin=subprocess.PIPE if verdicts else None)
        self._events: queue.Queue = queue.Queue()
        self.stderr_tail: deque[str] = deque(maxlen=40)
        self.error: dict | None = None
        self.done: dict | None = None
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for t in self._readers:
            t.start()

    def _read_stdout(self) -> None:
        for line in self.proc.stdout:
            event = parse_event(line)
            if event is not None:
                self._events.put(event)
        self._events.put(None)

    def _read_stderr(self) -> None:
        for line in self.proc.stderr:
            line = line.rstrip()
            self.stderr_tail.append(line)
            logging.debug("[%s] %s", self.prefix, line)

    def events(self, check_cancel: Callable[[], None] = lambda: None, poll_s: float = 0.25) -> Iterator[dict]:
        """Progress events until the process ends; calls `check_cancel` while waiting and stops the process if it
        raises. Raises JobError when the run fails."""
        while True:
            try:
                check_cancel()
            except BaseException:
                self.stop()
                raise
            try:
                event = self._events.get(timeout=poll_s)
            except queue.Empty:
                continue
            if event is None:
                break
            if event[EVENT_KEY] == "error":
                self.error = event
            elif event[EVENT_KEY] == "done":
                self.done = event
            yield event
        code = self.proc.wait()
        for t in self._readers:
            t.join(timeout=5)
        if code != 0 or self.done is None:
            why = self.error["message"] if self.error else "\n".join(list(self.stderr_tail)[-15:])
            raise JobError(f"the training job ({self.config.name} on {','.join(self.devices)}) failed with exit code "
                           f"{code}: {why}")

    def send(self, line: str) -> None:
        """A line to the child's stdin (a verdict, trainer/jobs/events.py); a child already gone is not an error."""
        if self.proc.stdin is None:
            raise JobError("the job was started without verdicts (stdin is not a pipe)")
        try:
            self.proc.stdin.write(line)
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            logging.debug("Klein LoRA: the job %s no longer reads its verdicts", self.config.name)

    def stop(self) -> None:
        """SIGTERM to the whole process group (launcher and ranks), SIGKILL after STOP_GRACE_S."""
        if self.proc.poll() is not None:
            return
        if os.name == "nt":  # no process groups: the launcher forwards the stop to its ranks
            self.proc.terminate()
            self.proc.wait()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_GRACE_S
        while self.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        logging.info("Klein LoRA: stopped the training job %s", self.config.name)
