"""Test set-up: the pack as the package `klein_lora_studio`, and a real ComfyUI when one is found.

ComfyUI comes from COMFYUI_PATH, else from the ComfyUI this pack is installed in (the parent of its
custom_nodes/ folder). Tests marked `comfy` skip, saying so, only when neither exists.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _load_by_path(name: str, path: Path):
    """A pack module that imports nothing from the pack, loaded before the pack is importable."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_root = _load_by_path("klein_package_root", REPO / "devtools" / "package_root.py")
PACK = _root.PACK
_PKG_DIR = _root.make_importable(REPO)


def find_comfyui() -> Path | None:
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).resolve() if (Path(env) / "comfy").is_dir() else None
    if REPO.parent.name == "custom_nodes" and (REPO.parent.parent / "comfy").is_dir():
        return REPO.parent.parent
    return None


COMFYUI = find_comfyui()
NO_COMFY = "no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout (CI uses ../shared/ComfyUI)"


def pytest_collection_modifyitems(config, items):
    if COMFYUI is None:
        skip = pytest.mark.skip(reason=NO_COMFY)
        for item in items:
            if "comfy" in item.keywords:
                item.add_marker(skip)


def pytest_report_header(config):
    return f"ComfyUI: {COMFYUI or 'NOT FOUND - real-ComfyUI tests skip'}"


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """ComfyUI's --base-directory for the whole session: models/, input/, output/, custom_nodes/."""
    base = tmp_path_factory.mktemp("comfy-base")
    for sub in ("models", "input", "output", "custom_nodes", "user", "temp"):
        (base / sub).mkdir()
    (base / "custom_nodes" / PACK).symlink_to(REPO, target_is_directory=True)
    return base


@pytest.fixture(scope="session")
def comfy(base_dir):
    """ComfyUI used as a library (no server), with the pack loaded the way ComfyUI loads custom nodes."""
    if COMFYUI is None:
        pytest.skip(NO_COMFY)
    from klein_lora_studio.trainer.jobs import comfy_library

    os.environ["KLEIN_LORA_DEV_NODES"] = "1"
    nodes = comfy_library.boot(COMFYUI, base_dir, cpu=True, builtin_nodes=True, extra_model_paths=False)
    assert comfy_library.load_custom_node(nodes, base_dir / "custom_nodes" / PACK), "the pack failed to load"
    return nodes


@pytest.fixture(scope="session")
def tiny(comfy, base_dir):
    """Tiny klein models in the session's models folder, loaded through ComfyUI's own loaders."""
    import folder_paths
    from klein_lora_studio.devtools import tiny_models

    paths = tiny_models.write_tiny_models(folder_paths.models_dir)

    class Tiny:
        files = paths

        @staticmethod
        def unet():
            return comfy.UNETLoader().load_unet(tiny_models.UNET_FILE, "default")[0]

        vae = comfy.VAELoader().load_vae("taef2")[0]
        clip = tiny_models.tiny_clip(paths["te"])

    return Tiny


@pytest.fixture(scope="session")
def encoded(tiny, base_dir):
    """The encoded tiny set-up: encoded(name, n=3, size=64, groups=("double",), layers="attention", ...) writes a
    concept dataset to input/<name> and returns tests.helpers.Encoded (unet, data, targets)."""
    from klein_lora_studio.tests import helpers

    def make(name: str, **kw):
        return helpers.encode_tiny(tiny, base_dir / "input" / name, **kw)

    return make
