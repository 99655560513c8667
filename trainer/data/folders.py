"""Where a dataset's folders are, as the nodes and the command line name them: one resolution for all.

A dataset folder is a name relative to ComfyUI's input directory, or a path inside a root the user
listed (trainer/paths.py). The files inside are checked one by one when they are listed
(trainer/data/images.py), against the same roots.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .. import paths


@dataclass(frozen=True)
class DatasetFolders:
    folder: Path
    control: Path | None  # image-to-image: the control (input) images
    roots: tuple[Path, ...]  # where the folders' files may really live once links are resolved


def comfy_dirs() -> tuple[str, str]:
    """ComfyUI's input and user directories."""
    import folder_paths

    return folder_paths.get_input_directory(), folder_paths.get_user_directory()


def resolve(folder: str, control_folder: str | None = "", input_dir: str | None = None,
            user_dir: str | None = None) -> DatasetFolders:
    """Both folders resolved inside the allowed roots (an empty control folder: none); ValueError naming the input."""
    if input_dir is None:
        input_dir, user_dir = comfy_dirs()
    extra = paths.configured_dataset_roots(user_dir)
    where = paths.resolve_dataset_folder(folder, input_dir, extra)
    control = paths.resolve_dataset_folder(control_folder, input_dir, extra) if (control_folder or "").strip() else None
    return DatasetFolders(where, control, (Path(os.path.realpath(input_dir)), *extra))


def check(folder: str, control_folder: str | None = "") -> bool | str:
    """For validate_inputs: True, or the error text that fails the prompt at queue time."""
    try:
        resolve(folder, control_folder)
    except ValueError as e:
        return str(e)
    return True


def fingerprint(folder: str, control_folder: str | None = "") -> str:
    """Names, sizes and modification times of every file in the folders (and their subfolders' names).

    ComfyUI re-runs a node whose fingerprint changed: editing, adding, removing or renaming a caption
    or an image changes it; re-queueing an unchanged folder does not. A folder that cannot be
    resolved fingerprints as its error, which validate_inputs reports.
    """
    try:
        found = resolve(folder, control_folder)
    except ValueError as e:
        return f"error: {e}"
    h = hashlib.sha256()
    for d in (found.folder, found.control):
        if d is None:
            continue
        h.update(f"{d}\0".encode())
        with os.scandir(d) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                try:
                    st = e.stat()  # through links: a relinked file changes its target's size or time
                except OSError:
                    st = None
                h.update(f"{e.name}\0{e.is_dir()}\0{st.st_size if st else -1}\0{st.st_mtime_ns if st else -1}\0"
                         .encode())
    return h.hexdigest()
