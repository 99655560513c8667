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
            if Path(p).suffix in (".json", ".png"):  # written by Python and PIL, which follow the link
                paths.temp_name(Path(p)).symlink_to("/dev/full")  # the kernel answers every write with ENOSPC
        import safetensors.torch as st

        real_serialize, real_save = st.serialize_file, torch.save

        def serialize(tensors, filename, metadata=None):
            if str(filename) in names:  # what safetensors 0.8 raises on a full disk (seen on the tmpfs)
                raise safetensors.SafetensorError(
                    "Error while serializing: I/O error: No space left on device (os error 28)")
            return real_serialize(tensors, filename, metadata=metadata)

        def save(obj, f, *args, **kwargs):
            if getattr(f, "name", None) in names:
                with open("/dev/full", "wb") as full:
                    return real_save(obj, full, *args, **kwargs)
            return real_save(obj, f, *args, **kwargs)

        self._mp.setattr(st, "serialize_file", serialize)
        self._mp.setattr(torch, "save", save)

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


@pytest.fixture(scope="module")
def trainer_inputs(encoded):
    return encoded("hardening_files_ds", n=2)


def _train(trainer_inputs, name: str):
    from klein_lora_studio.tests.helpers import run_trainer

    # 2 steps: a checkpoint (LoRA + state) at step 1, the final LoRA (and its step-2 checkpoint) + state
    return run_trainer(trainer_inputs, learning_rate=1e-3, steps=2, save_every=1, output_name=name).args


@pytest.mark.comfy
def test_the_trainer_on_a_full_disk_names_the_file_and_keeps_the_earlier_run(comfy, trainer_inputs, small_disk,
                                                                              monkeypatch):
    """models/loras on a small disk (another drive in extra_model_paths.yaml): the user's view of a full disk."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(small_disk.folder)], folder_paths.folder_names_and_paths["loras"][1]))
    old = os.umask(0o022)
    try:
        first = Path(_train(trainer_inputs, "full")[2])
    finally:
        os.umask(old)
    ckpts = small_disk.folder / "full_checkpoints"
    assert {p.stat().st_mode & 0o777 for p in [first, *ckpts.iterdir()]} == {0o644}  # were 0600 (safetensors)
    before = small_disk.files()
    assert len(before) == 5  # the final LoRA, the checkpoints and states of steps 1 and 2
    lora_bytes = (ckpts / "full_step00001.safetensors").stat().st_size
    state_bytes = (ckpts / "full_step00001.trainstate").stat().st_size
    room = (lora_bytes // 4096 + 2) * 4096  # the next run's checkpoint fits, its state does not
    assert state_bytes > room + 4096, (lora_bytes, state_bytes)
    state = small_disk.folder / "full_2_checkpoints" / "full_2_step00001.trainstate"
    small_disk.fill(leave=room, failing=(state,))
    with pytest.raises(OSError, match=f"the disk is full: could not write {state}"):
        _train(trainer_inputs, "full")  # before: RuntimeError: unexpected pos ... vs ...
    after = small_disk.files()
    assert {k: after[k] for k in before} == before
    assert set(after) - set(before) <= {"full_2_checkpoints/full_2_step00001.safetensors"}
    assert not [p for p in small_disk.folder.rglob(".*")]  # no temp file left
    lora = small_disk.folder / "full_3_checkpoints" / "full_3_step00001.safetensors"
    small_disk.fill(failing=(lora,))
    with pytest.raises(OSError, match=f"the disk is full: could not write {lora}"):
        _train(trainer_inputs, "full")  # before: safetensors' "No space left on device (os error 28)"
    assert {k: small_disk.files()[k] for k in before} == before
    assert not [p for p in small_disk.folder.rglob(".*")]


HIDE_TRITON = '''
import importlib.abc, sys

class NoTriton(importlib.abc.MetaPathFinder):  # as on the Windows portable ComfyUI: no Triton to import
    def find_spec(self, name, path=None, target=None):
        if name == "triton" or name.startswith("triton."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NoTriton())
'''

COMPILE_CHECK = '''
import logging, torch
from klein_lora_studio.trainer.model import compile_support as cs

logging.basicConfig(level=logging.WARNING, format="%(message)s")
cuda = torch.device("cuda")
print("problem:", cs.compile_problem(cuda))
print("auto:", cs.usable("auto", cuda, True), "off:", cs.usable("off", cuda, False))
try:
    cs.usable("on", cuda, True)
except ValueError as e:
    print("on:", e)
if torch.cuda.is_available():  # what the probe foretells: inductor itself fails on the first call
    try:
        torch.compile(lambda x: x * 2 + 1)(torch.ones(4, device=cuda))
        print("compiled: ran")
    except Exception as e:
        print("compiled: failed", type(e).__name__)
'''


def _python(code: str) -> str:
    import sys

    from klein_lora_studio.tests.conftest import _PKG_DIR

    env = {**os.environ, "PYTHONPATH": str(_PKG_DIR)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout + done.stderr


def test_without_triton_auto_compile_trains_eagerly_with_a_notice_and_on_is_refused():
    """Before: 'auto' compiled on any CUDA device and the first step failed inside inductor without Triton."""
    out = _python(HIDE_TRITON + COMPILE_CHECK)
    assert "problem: Triton is not installed, and torch.compile needs it on the GPU" in out
    assert "auto: False off: False" in out
    notices = [line for line in out.splitlines() if "training uncompiled (compile_blocks 'auto')" in line]
    assert len(notices) == 1 and "triton-windows" in notices[0]
    assert "on: compile_blocks 'on': Triton is not installed" in out and "Set compile_blocks to 'auto'" in out
    if torch.cuda.is_available():
        assert "compiled: failed" in out  # so eager is the only way to train there


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: with Triton, the probe must allow compile")
def test_with_triton_on_a_gpu_compile_is_kept():
    out = _python(COMPILE_CHECK)
    assert "problem: None" in out and "auto: True" in out and "compiled: ran" in out


# ---- devices and model checks at queue time, through a real ComfyUI server ----

DISTILLED = "flux-2-klein-4b.safetensors"  # BFL's name for the distilled klein 4B (Base: flux-2-klein-base-4b)


@pytest.fixture(scope="module")
def server(tiny, base_dir):
    import shutil

    from klein_lora_studio.devtools.server import ComfyServer
    from klein_lora_studio.tests.conftest import COMFYUI
    from klein_lora_studio.tests.helpers import write_concept_dataset

    write_concept_dataset(base_dir / "input" / "hardening_ds", n=2, size=64)
    shutil.copyfile(tiny.files["unet"], base_dir / "models" / "diffusion_models" / DISTILLED)
    log = base_dir / "hardening-comfyui.log"
    with ComfyServer(COMFYUI, base_dir, log=log) as url:
        yield url, log


def _workflow(name: str, **trainer) -> dict:
    import json

    from klein_lora_studio.devtools.workflows import api_path, to_tiny

    wf = to_tiny(json.loads(api_path("klein_style_lora").read_text()), "hardening_ds", output_name=name)
    wf["6"]["inputs"].update(trainer)
    return wf




@pytest.mark.comfy
@pytest.mark.parametrize("gpus", ["99999", "0", "0,99999"])
def test_a_gpu_that_does_not_exist_is_refused_at_queue_time(server, gpus):
    """Before: gpus '99999' was queued, exported and trained on the CPU without a word."""
    from klein_lora_studio.tests.helpers import post_prompt

    status, answer = post_prompt(_workflow("never_gpus", gpus=gpus), server[0])
    assert status == 400 and set(answer["node_errors"]) == {"6"}, answer
    text = "\n".join(e.get("details", "") for e in answer["node_errors"]["6"]["errors"])
    assert f"gpus '{gpus}'" in text
    if torch.cuda.is_available():
        assert "does not exist" in text and "numbered 0 to" in text
    else:  # this machine: any GPU list is refused rather than run on the CPU
        assert "no CUDA GPU that PyTorch can use" in text and "Leave gpus empty" in text and "'cpu'" in text


def test_gpu_numbers_are_checked_against_the_count(monkeypatch):
    from klein_lora_studio.trainer.jobs import launch

    monkeypatch.setattr(launch, "gpu_count", lambda: 2)  # the count itself needs GPUs; the rule does not
    assert launch.job_devices("0,1") == ["0", "1"] and launch.job_devices("cpu") == ["cpu"] and launch.job_devices("") == []
    with pytest.raises(ValueError, match=r"gpus '1,2': GPU 2 does not exist; this machine has 2 GPUs, numbered 0 to 1"):
        launch.job_devices("1,2")
    with pytest.raises(ValueError, match="not GPU numbers"):  # the syntax check still comes first
        launch.job_devices("0,gpu1")


@pytest.mark.parametrize("name,warned", [
    ("flux-2-klein-4b.safetensors", "4B"), ("flux-2-klein-9b-fp8.safetensors", "9B"), ("FLUX2_klein_4b.safetensors", "4B"),
    ("flux-2-klein-base-4b.safetensors", None), ("flux-2-klein-base-9b-fp8.safetensors", None),
    ("klein-tiny.safetensors", None), ("my_klein_4b_base.safetensors", None)])
def test_a_base_named_as_the_distilled_klein_is_warned_about(name, warned):
    from klein_lora_studio.trainer.model import model_check

    note = model_check.distilled_warning(name, "node 1, Load Diffusion Model")
    assert (note is None) == (warned is None), note
    if warned:
        assert f"'{name}' (node 1, Load Diffusion Model)" in note and f"distilled FLUX.2 [klein] {warned}" in note
        assert f"flux-2-klein-base-{warned[0]}b.safetensors" in note and "sample the LoRA on the distilled" in note


@pytest.mark.comfy
def test_the_distilled_name_warns_at_queue_time_without_blocking_the_prompt(server):
    import asyncio
    import io

    from klein_lora_studio import run as runner

    url, log = server
    wf = _workflow("distilled_named", steps=2, save_every=0)
    wf["1"]["inputs"]["unet_name"] = DISTILLED
    out = io.StringIO()
    rc = asyncio.run(runner.run(wf, url, out=out))
    assert rc == 0, out.getvalue()  # queued and trained: a warning, not an error
    text = log.read_text()
    assert f"trainer node 6: the MODEL comes from '{DISTILLED}' (node 1, Load Diffusion Model)" in text
    assert "distilled FLUX.2 [klein] 4B" in text


@pytest.mark.comfy
def test_the_distilled_name_is_in_the_evaluation_text(comfy, trainer_inputs, base_dir):
    import dataclasses
    import shutil

    from klein_lora_studio.tests.helpers import run_trainer

    target = base_dir / "models" / "diffusion_models" / DISTILLED
    if not target.exists():
        from klein_lora_studio.devtools import tiny_models

        shutil.copyfile(base_dir / "models" / "diffusion_models" / tiny_models.UNET_FILE, target)
    unet = comfy.UNETLoader().load_unet(DISTILLED, "default")[0]
    setup = dataclasses.replace(trainer_inputs, unet=unet)
    evaluation = run_trainer(setup, learning_rate=1e-3, steps=1, output_name="distilled_eval").args[5]
    assert evaluation.startswith(f"WARNING: the MODEL comes from '{DISTILLED}', which by its name is the distilled")
