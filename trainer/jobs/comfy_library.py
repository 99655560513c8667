"""Boot ComfyUI as a library (no server): the one way the CLI, the tests, devtools and the benches do it.

ComfyUI parses its command line on import (`comfy.cli_args`), so the folders (`--base-directory`),
`--cpu` and `--disable-api-nodes` are passed as a temporary sys.argv. Its folder is put first on
sys.path: this pack has a `nodes` package that must not shadow ComfyUI's `nodes` module.

This file imports nothing from the pack, so a child process can load it by path
(`runpy.run_path` / importlib) before the pack itself is importable.
"""
from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path


def boot(comfy_dir: str | Path, base_directory: str | Path = "", cpu: bool = False, *,
         builtin_nodes: bool = False, extra_args: Sequence[str] = (), extra_model_paths: bool = True):
    """Import ComfyUI from `comfy_dir` with its folders under `base_directory`; returns its `nodes` module.

    `builtin_nodes`: also load comfy_extras' nodes (what a server has; the tests and the workflow
    writer need them), without custom nodes or API nodes. `extra_model_paths`: read the
    extra_model_paths.yaml beside ComfyUI's main.py, as main.py does.
    """
    comfy_dir = Path(comfy_dir)
    if str(comfy_dir) not in sys.path[:1]:
        sys.path.insert(0, str(comfy_dir))
    import comfy.options

    comfy.options.enable_args_parsing()
    argv = [sys.argv[0], "--disable-api-nodes", *(["--cpu"] if cpu else []), *extra_args]
    if base_directory:
        argv += ["--base-directory", str(base_directory)]
    saved, sys.argv = sys.argv, argv
    try:
        import comfy.cli_args  # noqa: F401
        import comfy.model_management  # noqa: F401
        import folder_paths  # noqa: F401

        import nodes
    finally:
        sys.argv = saved
    extra = comfy_dir / "extra_model_paths.yaml"
    if extra_model_paths and extra.is_file():  # model folders the user added, as ComfyUI's main.py reads them
        from utils.extra_config import load_extra_path_config

        load_extra_path_config(str(extra))
    if builtin_nodes:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return nodes


def load_custom_node(nodes, pack_dir: str | Path) -> bool:
    """Load a custom node folder the way ComfyUI's start-up does (True when it loaded)."""
    return bool(asyncio.run(nodes.load_custom_node(str(pack_dir))))
