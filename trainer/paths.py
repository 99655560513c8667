"""Where the pack may read and write, and how it writes without ever leaving half a file.

Datasets are read only from ComfyUI's input directory or from folders the user listed (the
`dataset_roots` list in `<ComfyUI user dir>/klein_lora_studio.json`, or the
KLEIN_LORA_DATASET_ROOTS environment variable, os.pathsep-separated). Outputs go only under
ComfyUI's models/ and output/ folders, under names that cannot climb out of them.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
from pathlib import Path

CONFIG_NAME = "klein_lora_studio.json"
ROOTS_ENV = "KLEIN_LORA_DATASET_ROOTS"
_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)), *(f"LPT{i}" for i in range(1, 10))}
_NAME_OK = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$")


def _is_within(path: Path, root: Path) -> bool:
    try:
        return os.path.commonpath([str(path), str(root)]) == str(root)
    except ValueError:  # different drives on Windows
        return False


def configured_dataset_roots(user_dir: str | None) -> list[Path]:
    roots: list[str] = [p for p in os.environ.get(ROOTS_ENV, "").split(os.pathsep) if p]
    if user_dir:
        cfg = Path(user_dir) / CONFIG_NAME
        if cfg.is_file():
            try:
                roots += list(json.loads(cfg.read_text(encoding="utf-8")).get("dataset_roots", []))
            except (ValueError, AttributeError) as e:
                raise ValueError(f"{cfg} is not valid JSON with a 'dataset_roots' list: {e}. Fix or remove it.") from e
    return [Path(os.path.realpath(os.path.expanduser(r))) for r in roots]


is_within = _is_within  # the public name, for the other modules


def resolve_dataset_folder(folder: str, input_dir: str, extra_roots: list[Path]) -> Path:
    """An existing folder inside an allowed root, symlinks resolved (a link cannot smuggle a path out)."""
    if not folder or not folder.strip():
        raise ValueError("dataset folder is empty: give a folder inside ComfyUI's input directory "
                         f"({input_dir}) or one listed in {CONFIG_NAME}.")
    raw = Path(os.path.expanduser(folder.strip()))
    candidate = raw if raw.is_absolute() else Path(input_dir) / raw
    real = Path(os.path.realpath(candidate))
    roots = [Path(os.path.realpath(input_dir)), *extra_roots]
    if not any(_is_within(real, r) for r in roots):
        raise ValueError(f"dataset folder '{folder}' resolves to {real}, outside the allowed roots "
                         f"{[str(r) for r in roots]}. Move the images under ComfyUI's input directory, or add "
                         f"the folder to 'dataset_roots' in {CONFIG_NAME} in ComfyUI's user directory "
                         f"(or to ${ROOTS_ENV}).")
    if not real.is_dir():
        raise ValueError(f"dataset folder '{folder}' ({real}) does not exist or is not a folder.")
    return real


def safe_name(name: str, field: str = "output_name") -> str:
    """A bare file stem: no separators, no '..', no reserved characters or device names."""
    stripped = (name or "").strip()
    if stripped.lower().endswith(".safetensors"):
        stripped = stripped[: -len(".safetensors")]
    bad = ("/" in stripped or "\\" in stripped or ".." in stripped or os.path.isabs(stripped)
           or not _NAME_OK.match(stripped) or stripped.split(".")[0].upper() in _RESERVED)
    if bad:
        raise ValueError(f"{field} '{name}' is not a plain file name: use 1-100 letters, digits, spaces, '.', '-' "
                         "or '_', starting with a letter or digit, with no path separators or '..'.")
    return stripped


def unique_run_name(folder: Path, name: str) -> str:
    """`name`, or `name_2`, `name_3`... so that an earlier run's LoRA and checkpoints are never overwritten."""
    from .training.run_files import RunFiles  # the one place that names a run's files

    def taken(n: str) -> bool:
        files = RunFiles(folder, n)
        return files.lora.exists() or files.checkpoints_dir.exists()

    if not taken(name):
        return name
    i = 2
    while taken(f"{name}_{i}"):
        i += 1
    logging.info("Klein LoRA: '%s' exists in %s; this run is saved as '%s_%d'", name, folder, name, i)
    return f"{name}_{i}"


TMP_MARK = ".tmp-"
_DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
# libraries that keep only the text of the OS error: safetensors' SafetensorError carries Rust's
# "No space left on device (os error 28)" (Windows: "There is not enough space on the disk. (os error 112)")
_DISK_FULL_TEXT = re.compile(r"no space left on device|disk quota exceeded|not enough space on the disk", re.I)


def temp_name(path: Path) -> Path:
    """The temp file `path` is written to first: hidden, beside it, named after it and this process."""
    return path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")


def is_disk_full(exc: BaseException) -> bool:
    """Whether `exc`, or an error it was raised from or during, is a full disk or an exceeded quota.

    torch.save reports a short write as `RuntimeError: unexpected pos ...` raised during the OSError of
    the file object's write; safetensors raises its own error with the OS message as text.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _DISK_FULL:
            return True
        if not isinstance(e, OSError) and _DISK_FULL_TEXT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


def _umask() -> int:
    """The process's umask, read without changing it where the OS shows it (Linux), else set and restored."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _atomic_write(path: Path, write) -> Path:
    """`write(tmp)` a temp file beside `path`, fsync it, then rename it over `path` in one step.

    A crash leaves either the old file or the new one, never half of one. An error removes the temp
    file; a killed process (SIGKILL, power loss) can leave one, which remove_stale_temps clears when the
    run is started or resumed again. A full disk is reported as such, naming the file. The file gets the
    permissions of the umask, as `open` gives (safetensors creates its files 0600 whatever the umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(path)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if is_disk_full(e):
            raise OSError(errno.ENOSPC, f"the disk is full: could not write {path}. Free space on {path.parent} "
                                        "(or keep fewer checkpoints: raise save_every), then queue it again (a training "
                                        "run continues from its last checkpoint with resume_from 'latest'); the "
                                        "files written before are intact", str(path)) from e
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def remove_stale_temps(folder: Path, stem: str) -> list[Path]:
    """Delete temp files a killed writer left in `folder` for files starting with `stem`; returns them.

    Only names of the form `.<stem>...tmp-<pid>` are touched: they were never renamed into place, so
    they hold nothing a completed checkpoint does not.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir()
             if p.name.startswith(f".{stem}") and TMP_MARK in p.name and p.is_file()]
    for p in stale:
        logging.info("Klein LoRA: removing %s, left by an interrupted write", p)
        p.unlink(missing_ok=True)
    return stale


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict[str, str] | None = None) -> Path:
    import safetensors.torch

    return _atomic_write(path, lambda tmp: safetensors.torch.save_file(
        {k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata))


def atomic_save_torch(obj, path: Path) -> Path:
    """torch.save, atomically (for the training state: optimizer and RNG states are not flat tensors)."""
    import torch

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a Python file: its OSError (a full disk) is kept under torch's RuntimeError
            torch.save(obj, f)

    return _atomic_write(path, write)


def atomic_write_text(text: str, path: Path) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_image(image, path: Path) -> Path:
    """A PIL image as PNG, atomically."""
    return _atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
