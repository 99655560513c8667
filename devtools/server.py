"""Start a headless ComfyUI on loopback with this pack installed, for the demo and the server tests."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .package_root import PACK, REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base(base: Path) -> Path:
    """A ComfyUI --base-directory with the pack linked into custom_nodes/."""
    for sub in ("models", "input", "output", "custom_nodes", "user", "temp"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return base


class ComfyServer:
    """`with ComfyServer(comfyui, base) as url:` boots ComfyUI (CPU) and stops it on exit."""

    def __init__(self, comfyui: Path, base: Path, port: int | None = None, dev_nodes: bool = True,
                 python: str = sys.executable, log: Path | None = None):
        self.comfyui, self.base, self.port = Path(comfyui), prepare_base(Path(base)), port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(os.environ, KLEIN_LORA_DEV_NODES="1" if dev_nodes else "0")
        self.python, self.log_path = python, log or (self.base / "comfyui.log")
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> str:
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-api-nodes", "--disable-auto-launch"]
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=self.comfyui, env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}; see {self.log_path}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    json.load(r)
                return self.url
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise TimeoutError(f"ComfyUI did not answer on {self.url} within 180 s; see {self.log_path}")

    def __exit__(self, *exc) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self._log.close()
