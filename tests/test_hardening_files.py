"""Files under stress (issue 15): a full disk during every kind of write, and the permissions files get.

The full disk is a real one: a 1 MiB tmpfs mounted for the test (CI runs as root). Where mounting is not
allowed the same tests inject the error where the libraries write, and say so in a warning: the kernel's
ENOSPC through /dev/full for torch, PIL and text writes, and safetensors' own error (with the text it
carries on a full disk) for safetensors writes, whose writer replaces a symlink instead of following it.
"""
from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import warnings
from pathlib import Path

import pytest
import safetensors
import torch
from klein_lora_studio.trainer import paths
from PIL import Image

MiB = 1 << 20


class SmallDisk:
    """A folder on a filesystem of 1 MiB that `fill` makes full (or, where none can be mounted, fail as full)."""

    def __init__(self, folder: Path, mounted: bool, monkeypatch) -> None:
        self.folder, self.mounted, self._mp = folder, mounted, monkeypatch

    def fill(self, leave: int = 0, failing: tuple[Path, ...] = ()) -> None:
        """Mounted: fill the filesystem, then free `leave` bytes. Injected: writes of `failing` fail instead."""
        if self.mounted:
            filler = self.folder / "filler.bin"
            with open(filler, "ab", buffering=0) as f:
                try:
                    while f.write(b"\0" * 4096):
                        pass
                except OSError as e:
                    assert e.errno == errno.ENOSPC
            size = filler.stat().st_size
            os.truncate(filler, max(0, size - leave))
            return
        names = {str(paths.temp_name(Path(p))) for p in failing}
        for p in failing:
            paths.temp_name(Path(p)).symlink_to("/dev/full")  # the kernel answers every write with ENOSPC
        import safetensors.torch as st

        real = st.serialize_file

        def serialize(tensors, filename, metadata=None):
            if str(filename) in names:  # what safetensors 0.8 raises on a full disk (seen on the tmpfs)
                raise safetensors.SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, filename, metadata=metadata)

        self._mp.setattr(st, "serialize_file", serialize)

    def files(self) -> dict[str, str]:
        """Every file under the folder but the filler: {relative path: sha256}."""
        out = {}
        for p in sorted(self.folder.rglob("*")):
            if p.is_file() and p.name != "filler.bin":
                out[str(p.relative_to(self.folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
        return out


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    folder = tmp_path / "disk"
    folder.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)]
    if os.environ.get("KLEIN_TEST_NO_MOUNT"):  # to run the injected variant where mounting works
        cmd = ["false"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        warnings.warn(f"no tmpfs could be mounted ({done.stderr.strip()}): the full disk is injected instead",
                      stacklevel=1)
    try:
        yield SmallDisk(folder, done.returncode == 0, monkeypatch)
    finally:
        if done.returncode == 0:
            subprocess.run(["umount", "-l", str(folder)], check=True)


WRITERS = [
    ("LoRA", "x.safetensors", lambda p, n: paths.atomic_save_safetensors({"w": torch.full((n,), 1.0)}, p)),
    ("training state", "x.trainstate", lambda p, n: paths.atomic_save_torch({"w": torch.full((n,), 2.0)}, p)),
    ("report", "x_eval.json", lambda p, n: paths.atomic_write_text("{}" + " " * (4 * n), p)),
    ("sample grid", "x.png", lambda p, n: paths.atomic_save_image(
        Image.frombytes("L", (n // 64, 256), os.urandom(n // 64 * 256)), p)),
]


@pytest.mark.parametrize("kind,name,write", WRITERS, ids=[w[0] for w in WRITERS])
def test_a_full_disk_names_the_file_and_keeps_the_earlier_one(small_disk, kind, name, write):
    """Before: the state write said `unexpected pos 211776 vs 211668`, the LoRA write safetensors' raw text."""
    target = small_disk.folder / name
    write(target, 16_384)  # 64 KiB of values: well inside the 1 MiB
    before = small_disk.files()
    small_disk.fill(failing=(target,))
    with pytest.raises(OSError) as err:
        write(target, 65_536)  # 256 KiB: more than is left
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert f"the disk is full: could not write {target}" in str(err.value)
    assert "Free space on" in str(err.value) and "resume_from 'latest'" in str(err.value)
    assert small_disk.files() == before  # the earlier file as it was, and no temp file left
    assert not [n for n in os.listdir(small_disk.folder) if n.startswith(".")]


def test_errors_that_are_not_a_full_disk_pass_through_unchanged(tmp_path):
    with pytest.raises(AttributeError, match="pickle"):
        paths.atomic_save_torch({"f": lambda: 0}, tmp_path / "bad.trainstate")  # a lambda does not pickle
    assert not paths.is_disk_full(RuntimeError("unexpected pos 10 vs 8"))  # torch's text alone says nothing
    assert not paths.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_written_files_get_the_umask_permissions(tmp_path, umask, mode):
    """safetensors 0.8 creates its files 0600 whatever the umask: LoRAs were unreadable to a shared models/."""
    old = os.umask(umask)
    try:
        for kind, name, write in WRITERS:
            write(tmp_path / name, 1024)
            assert (tmp_path / name).stat().st_mode & 0o777 == mode, kind
    finally:
        os.umask(old)
