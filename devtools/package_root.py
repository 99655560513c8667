"""Make this checkout importable as the package `klein_lora_studio`, whatever its folder is called.

The checkout root is the package (ComfyUI loads it from custom_nodes/ by folder), so a checkout in
`wt-foo/` is importable only through a link named `klein_lora_studio` in a folder on sys.path. The
tests, the devtools and the benches all make it here. This file imports nothing from the pack, so
it can be loaded by path (importlib) before the pack is importable.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

PACK = "klein_lora_studio"
REPO = Path(__file__).resolve().parent.parent


def package_parent(repo: Path = REPO) -> Path:
    """A folder holding `klein_lora_studio` -> the checkout: the checkout's own parent when it has that name."""
    if repo.name == PACK:
        return repo.parent
    parent = Path(tempfile.mkdtemp(prefix="klein-pkg-"))
    (parent / PACK).symlink_to(repo, target_is_directory=True)
    return parent


def make_importable(repo: Path = REPO) -> Path:
    """Put a package parent on sys.path (once per process) and return it (for a child's PYTHONPATH too)."""
    for entry in sys.path:
        if (Path(entry) / PACK).resolve() == repo.resolve() and (Path(entry) / PACK / "__init__.py").is_file():
            return Path(entry)
    parent = package_parent(repo)
    sys.path.insert(0, str(parent))
    return parent
