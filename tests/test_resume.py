"""Exact resume and the faults a run must survive, on the tiny klein model (issue 8).

The rule after every fault: each file in the run folder is a complete, loadable checkpoint or state,
no temp file is left, and the MODEL (and its clones) computes exactly what it did before.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from klein_lora_studio.tests.helpers import out_of_memory_at_step, run_trainer
from klein_lora_studio.trainer.model import targets as tg
from klein_lora_studio.trainer.training import loop, resume

pytestmark = pytest.mark.comfy
torch.set_num_threads(1)


@pytest.fixture(scope="module")
def setup(encoded, base_dir):
    enc = encoded("resume")
    data = enc.data
    g = torch.Generator().manual_seed(1)
    probe = (torch.randn((1, *data.latents[0].shape), generator=g), torch.tensor([0.6]), data.contexts[0][None])
    return dict(unet=enc.unet, data=data, targets=enc.targets, probe=probe, before=_forward(enc.unet, probe),
                out=base_dir / "models" / "loras", encoded=enc)


def _forward(patcher, probe):
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    with torch.no_grad():
        return patcher.model.diffusion_model(*probe).clone()


def _mixed(data):
    """Two sizes (aspect buckets), repeats, caption dropout and caption variants: every RNG of the loop in use."""
    lat = [data.latents[0], data.latents[1], data.latents[2][..., :2]]  # 64x64, 64x64, 32x64
    return dataclasses.replace(
        data, latents=lat, repeats=2, caption_dropout=0.3, empty_context=torch.zeros_like(data.contexts[0]),
        context_variants=[[c, c.flip(0)] for c in data.contexts])


def _cfg(name, steps, **kw):
    base = dict(rank=2, alpha=2, learning_rate=2e-3, steps=steps, save_every=5, output_name=name,
                save_dtype="fp32", seed=4)
    return loop.TrainConfig(**{**base, **kw})


def _train(s, cfg, data=None, hooks=None):
    with torch.inference_mode():
        return loop.train_lora(s["unet"], data or s["data"], s["targets"], cfg, s["out"], hooks)


def _cancel_at(step):
    """Hooks that cancel at the start of `step` (steps before it completed)."""
    import comfy.model_management as mm

    count = {"n": 0}

    def check():
        count["n"] += 1
        if count["n"] == step:
            raise mm.InterruptProcessingException()

    return loop.TrainHooks(check_cancel=check)


def _assert_run_folder_sound(out: Path, run: str) -> None:
    """Every file of the run loads completely; no temp file anywhere."""
    folder = out / f"{run}_checkpoints"
    files = [*(folder.iterdir() if folder.is_dir() else []), *out.glob(f"{run}.safetensors"),
             *out.glob(f".{run}*")]
    for p in files:
        assert ".tmp-" not in p.name, f"temp file left: {p}"
        if p.suffix == ".safetensors":
            assert len(safetensors.torch.load_file(str(p))) > 0
        else:
            assert p.name.endswith(resume.STATE_SUFFIX), p
            state = resume.load_state(p)
            assert state["step"] >= 1 and state["lora"]


def _same_lora(a: Path, b: Path) -> None:
    x, y = safetensors.torch.load_file(str(a)), safetensors.torch.load_file(str(b))
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("mixed", [False, True], ids=["plain", "buckets_repeats_captions"])
def test_ten_plus_resume_plus_ten_is_bit_identical_to_twenty(setup, mixed):
    data = _mixed(setup["data"]) if mixed else setup["data"]
    tag = "mix" if mixed else "plain"
    straight = _train(setup, _cfg(f"straight_{tag}", 20), data)
    import comfy.model_management as mm

    with pytest.raises(mm.InterruptProcessingException):  # cancelled at step 13: the latest state is step 10
        _train(setup, _cfg(f"split_{tag}", 20), data, _cancel_at(13))
    resumed = _train(setup, _cfg(f"split_{tag}", 20, resume_from="latest"), data)
    assert resumed.run_name == f"split_{tag}"  # the same run, not split_2
    _same_lora(straight.lora_path, resumed.lora_path)
    _same_lora(straight.checkpoints[-1], resumed.checkpoints[-1])  # step 15, written after the resume
    assert resumed.losses == straight.losses and len(resumed.losses) == 20
    assert [p.name for p in resumed.checkpoints] == [f"split_{tag}_step000{s:02d}.safetensors" for s in (5, 10, 15)]
    meta = safetensors.safe_open(str(resumed.lora_path), "pt").metadata()
    assert json.loads(meta["resume_changes"]) == {}
    assert json.loads(meta["resumed_from"])[0]["step"] == 10
    _assert_run_folder_sound(setup["out"], f"split_{tag}")
    assert torch.equal(_forward(setup["unet"], setup["probe"]), setup["before"])


def test_a_finished_run_extends_with_more_steps_and_a_new_learning_rate_noted(setup):
    first = _train(setup, _cfg("extend", 10))
    assert first.run_name == "extend"
    with pytest.raises(ValueError, match="already at step 10 and steps is 10: raise steps above 10"):
        _train(setup, _cfg("extend", 10, resume_from="latest"))
    more = _train(setup, _cfg("extend", 14, learning_rate=1e-3, resume_from="extend_step00010.safetensors"))
    assert more.lora_path == first.lora_path and len(more.losses) == 14 and more.losses[:10] == first.losses
    meta = safetensors.safe_open(str(more.lora_path), "pt").metadata()
    assert json.loads(meta["resume_changes"]) == {"steps": [10, 14], "learning_rate": [2e-3, 1e-3]}
    assert meta["steps"] == "14" and float(meta["learning_rate"]) == 1e-3
    _assert_run_folder_sound(setup["out"], "extend")
    states = resume.list_states(setup["out"] / "extend_checkpoints", "extend")
    assert [p.name for p in states] == ["extend_step00010.trainstate", "extend_step00014.trainstate"]  # keep 2


@pytest.mark.parametrize("change,match", [
    (dict(rank=4), "trained with rank 2, this run asks for rank 4. Set rank back to 2"),
    (dict(alpha=4), "trained with alpha 2, this run asks for alpha 4"),
    (dict(optimizer="Adafactor"), "trained with optimizer AdamW"),
    ("targets", r"trained \d+ layers, this run targets \d+ \(missing \[\], added"),
    ("dataset", "trained on 3 items, this dataset has 2"),
    (dict(resume_from="nothing"), "names no checkpoint: give 'latest'"),
    (dict(resume_from="extend_step00003"), "no training state extend_step00003.trainstate.*states kept"),
    (dict(resume_from="latest", output_name="never_ran"), "no training state of run 'never_ran'"),
    (dict(resume_from="/etc/extend_step00010.safetensors"), "outside the LoRA folder"),
])
def test_resume_refuses_what_cannot_change(setup, change, match):
    if not resume.list_states(setup["out"] / "extend_checkpoints", "extend"):
        _train(setup, _cfg("extend", 10))
    cfg = _cfg("extend", 30, resume_from="latest")
    data, targets = setup["data"], setup["targets"]
    if change == "targets":
        dm = setup["unet"].model.diffusion_model
        targets = tg.resolve_targets(["double"], "attention_mlp", tg.BlockCounts.of_model(dm))
    elif change == "dataset":
        data = dataclasses.replace(data, latents=data.latents[:2], contexts=data.contexts[:2])
    else:
        cfg = dataclasses.replace(cfg, **change)
    with pytest.raises(ValueError, match=match), torch.inference_mode():
        loop.train_lora(setup["unet"], data, targets, cfg, setup["out"])


def test_cancel_at_random_steps_twenty_times(setup):
    """Each try: cancel at a random step, check the folder, resume from the latest state (or start again when
    none was saved yet), and end with exactly the LoRA of an uninterrupted run."""
    import comfy.model_management as mm

    reference = _train(setup, _cfg("rnd_ref", 6, save_every=2))
    rng = random.Random(8)
    start = time.perf_counter()
    for t in range(20):
        name, cancel = f"rnd{t}", rng.randint(1, 6)
        with pytest.raises(mm.InterruptProcessingException):
            _train(setup, _cfg(name, 6, save_every=2), hooks=_cancel_at(cancel))
        _assert_run_folder_sound(setup["out"], name)
        has_state = bool(resume.list_states(setup["out"] / f"{name}_checkpoints", name))
        assert has_state == (cancel > 2)
        done = _train(setup, _cfg(name, 6, save_every=2, resume_from="latest" if has_state else ""))
        assert done.run_name == name
        _same_lora(reference.lora_path, done.lora_path)
        _assert_run_folder_sound(setup["out"], name)
    assert time.perf_counter() - start < 600
    assert torch.equal(_forward(setup["unet"], setup["probe"]), setup["before"])


@pytest.mark.parametrize("writer,fail_on", [("torch", 2), ("safetensors", 2)])
def test_disk_full_during_a_write(setup, monkeypatch, writer, fail_on):
    """ENOSPC on the Nth write: a clear error naming the file; earlier files intact; no temp; model unchanged."""
    module, attr = (torch, "save") if writer == "torch" else (safetensors.torch, "save_file")
    real, calls = getattr(module, attr), {"n": 0}

    def full(obj, path, *a, **kw):
        calls["n"] += 1
        if calls["n"] == fail_on:
            if hasattr(path, "write"):  # paths.py hands torch.save an open file
                path.write(b"\0" * 100)
            else:
                Path(path).write_bytes(b"\0" * 100)  # half a file, as a real full disk leaves it
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, path, *a, **kw)

    monkeypatch.setattr(module, attr, full)
    name = f"full_{writer}"
    with pytest.raises(OSError, match=f"the disk is full: could not write .*{name}_step00004") as err:
        _train(setup, _cfg(name, 8, save_every=2))
    assert err.value.errno == errno.ENOSPC and "resume" in str(err.value)
    monkeypatch.undo()
    _assert_run_folder_sound(setup["out"], name)
    folder = setup["out"] / f"{name}_checkpoints"
    assert (folder / f"{name}_step00002.safetensors").is_file() and (folder / f"{name}_step00002.trainstate").is_file()
    assert torch.equal(_forward(setup["unet"], setup["probe"]), setup["before"])
    done = _train(setup, _cfg(name, 8, save_every=2, resume_from="latest"))  # freed space: the run goes on
    assert len(done.losses) == 8


def test_out_of_memory_says_what_to_lower_and_keeps_the_checkpoint(setup, monkeypatch):
    out_of_memory_at_step(monkeypatch, 7)
    with pytest.raises(torch.OutOfMemoryError) as err:
        _train(setup, _cfg("oom", 10, save_every=3))
    msg = str(err.value)
    for needle in ("step 7", "batch_size 1", "64x64 px", "rank 2", "Lower the resolution", "rank",
                   "gradient_checkpointing on", "low-VRAM", "oom_step00006.safetensors is kept", "resume_from 'latest'"):
        assert needle in msg, (needle, msg)
    monkeypatch.undo()
    _assert_run_folder_sound(setup["out"], "oom")
    assert resume.load_state(setup["out"] / "oom_checkpoints" / "oom_step00006.trainstate")["step"] == 6
    assert torch.equal(_forward(setup["unet"], setup["probe"]), setup["before"])


def test_a_base_model_too_big_for_the_card_says_how_to_fit_it(setup, monkeypatch):
    """ComfyUI cannot put the whole model on the card: the error gives the weights' size and the two ways to fit."""
    import comfy.model_management as mm

    def full(*a, **kw):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 MiB")

    monkeypatch.setattr(mm, "load_models_gpu", full)
    with pytest.raises(torch.OutOfMemoryError) as err:
        _train(setup, _cfg("too_big", 2))
    msg = str(err.value)
    size = sum(p.numel() * p.element_size() for p in setup["unet"].model.diffusion_model.parameters()) / 2**30
    for needle in (f"({size:.1f} GiB of weights)", "weight_dtype fp8_e4m3fn", "low_vram", "shard_base",
                   "Tried to allocate 96.00 MiB"):
        assert needle in msg, (needle, msg)
    assert not list(setup["out"].glob("too_big*")), "nothing is written for a run that could not start"


@pytest.mark.parametrize("offload", ["off", "1"], ids=["resident", "streamed"])
def test_model_and_clones_unchanged_after_an_exception_mid_step(setup, monkeypatch, offload):
    """The step fails after forward and backward (gradients exist, the optimizer has moments); also with the
    frozen blocks streamed from CPU memory (offload_blocks, forced on the CPU)."""
    from klein_lora_studio.trainer.model import block_stream

    monkeypatch.setenv(block_stream.FORCE_ON_CPU_ENV, "1")
    unet = setup["unet"]
    flags = {id(m): vars(m).get("comfy_cast_weights") for m in unet.model.diffusion_model.modules()}
    clone = unet.clone()
    real = loop.train_step
    calls = {"n": 0}

    def broken(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        if calls["n"] == 3:
            raise RuntimeError("boom in the middle of a step")
        return loss

    monkeypatch.setattr(loop, "train_step", broken)
    name = f"midstep_{offload}"
    with pytest.raises(RuntimeError, match="boom"):
        _train(setup, _cfg(name, 6, save_every=2, offload_blocks=offload))
    dm = unet.model.diffusion_model
    assert torch.equal(_forward(unet, setup["probe"]), setup["before"])
    assert torch.equal(_forward(clone, setup["probe"]), setup["before"])
    assert not hasattr(dm, "peft_config") and not any(p.requires_grad for p in dm.parameters())
    assert {id(m): vars(m).get("comfy_cast_weights") for m in dm.modules()} == flags
    _assert_run_folder_sound(setup["out"], name)


CHILD = r"""
import sys, torch
spec = sys.argv[4]
sys.path[:0] = [sys.argv[2]]
from klein_lora_studio.trainer.jobs import comfy_library
comfy_library.boot(sys.argv[1], sys.argv[3], cpu=True, extra_model_paths=False)
import comfy.sd, folder_paths
from pathlib import Path
from klein_lora_studio.trainer.data import dataset as ds
from klein_lora_studio.trainer.training import loop
from klein_lora_studio.trainer.model import targets as tg
torch.set_num_threads(1)
saved = torch.load(spec, weights_only=True)
data = ds.KleinDataset(saved["latents"], saved["contexts"], ["c"] * 3, ["f"] * 3, 64, "zxq", "f")
unet = comfy.sd.load_diffusion_model(saved["unet"])
targets = tg.resolve_targets(["double"], "attention", tg.BlockCounts.of_model(unet.model.diffusion_model))
cfg = loop.TrainConfig(rank=2, alpha=2, learning_rate=1e-3, steps=100000, save_every=1, output_name="killed",
                       save_dtype="fp32", seed=1)
loop.train_lora(unet, data, targets, cfg, Path(saved["out"]))
"""


def test_sigkill_during_a_checkpoint_write(setup, comfy, tiny, base_dir, tmp_path):
    """A child trains with a checkpoint every step; it is SIGKILLed the moment a temp file is seen (or after a
    few checkpoints). Every complete file loads; a left temp file is removed when the run resumes."""
    import comfy as comfy_pkg
    import klein_lora_studio

    out = setup["out"]
    spec, log = tmp_path / "child.pt", tmp_path / "child.log"
    torch.save({"latents": setup["data"].latents, "contexts": setup["data"].contexts, "out": str(out),
                "unet": str(tiny.files["unet"])}, spec)
    pkg_parent = str(Path(klein_lora_studio.__path__[0]).parent)
    comfyui = str(Path(comfy_pkg.__path__[0]).parent)
    child = subprocess.Popen([sys.executable, "-c", CHILD, comfyui, pkg_parent, str(base_dir), str(spec)],
                             stdout=subprocess.DEVNULL, stderr=log.open("wb"))  # a file: a full pipe would block it
    folder = out / "killed_checkpoints"
    deadline, caught, min_ckpts = time.monotonic() + 240, None, random.Random().randint(3, 8)
    try:
        while time.monotonic() < deadline and child.poll() is None:
            names = os.listdir(folder) if folder.is_dir() else []
            if sum(n.endswith(".safetensors") for n in names) >= min_ckpts:
                caught = next((n for n in names if ".tmp-" in n), None)
                if caught or sum(n.endswith(".safetensors") for n in names) >= min_ckpts + 30:
                    break
            time.sleep(0.0005)
        assert child.poll() is None, log.read_text(errors="replace")[-3000:]
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    assert child.returncode == -signal.SIGKILL
    assert resume.list_states(folder, "killed"), log.read_text(errors="replace")[-3000:]
    left = [p for p in folder.iterdir() if ".tmp-" in p.name]
    print(f"SIGKILL: temp file seen before kill: {caught}; left after kill: {[p.name for p in left]}")
    for p in folder.iterdir():  # every complete file loads, whatever moment the kill hit
        if ".tmp-" in p.name:
            continue
        if p.suffix == ".safetensors":
            assert safetensors.torch.load_file(str(p))
        else:
            assert resume.load_state(p)["step"] >= 1
    # a temp file as a kill mid-write leaves it (planted too, so the clean-up is tested whatever the timing)
    planted = folder / f".killed_step99999.safetensors.tmp-{child.pid}"
    planted.write_bytes(b"\0" * 64)
    latest = resume.load_state(resume.list_states(folder, "killed")[-1])
    cfg = _cfg("killed", latest["step"] + 2, rank=2, alpha=2, learning_rate=1e-3, save_every=1, seed=1,
               resume_from="latest")
    done = _train(setup, cfg)
    assert done.run_name == "killed" and len(done.losses) == latest["step"] + 2
    _assert_run_folder_sound(out, "killed")
    assert not planted.exists()


def test_the_trainer_node_resumes_latest_into_the_same_run(setup, comfy):
    node = dict(rank=2, alpha=2.0, learning_rate=1e-3, save_every=2, compile_blocks="off", output_name="node_resume",
                save_dtype="fp32")
    first = run_trainer(setup["encoded"], steps=4, **node)
    more = run_trainer(setup["encoded"], steps=6, resume_from=" latest ", **node)
    assert more.args[2] == first.args[2] and more.args[2].endswith("node_resume.safetensors")
    assert len(more.args[3]["loss"]) == 6 and more.args[3]["loss"][:4] == first.args[3]["loss"]
    meta = safetensors.safe_open(more.args[2], "pt").metadata()
    assert json.loads(meta["resume_changes"]) == {"steps": [4, 6]}


def _tree(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


@pytest.mark.parametrize("field,value", [("run", "../../../outside_escape"), ("run", "ABSOLUTE"),
                                         ("checkpoints", ["/etc/passwd"])], ids=["dotdot_run", "absolute_run",
                                                                                  "checkpoint_list"])
def test_a_state_naming_a_run_outside_the_loras_folder_is_refused(setup, comfy, base_dir, tmp_path, field, value):
    """Issue 15.1: a well-formed state whose `run` (or checkpoint list) points elsewhere; the node refuses it before
    writing anything, inside the roots or out of them."""
    name = f"hostile_{field}_{len(str(value))}"
    node = dict(rank=2, alpha=2.0, save_every=2, output_name=name, save_dtype="fp32")
    run_trainer(setup["encoded"], steps=2, **node)
    state_file = setup["out"] / f"{name}_checkpoints" / f"{name}_step00002.trainstate"
    state = resume.load_state(state_file)
    state[field] = str(tmp_path / "chosen" / "target") if value == "ABSOLUTE" else value
    torch.save(state, state_file)
    outside = base_dir.parent
    before = _tree(outside)
    with pytest.raises(ValueError, match=f"resume_from {state_file.name}: the state"):
        run_trainer(setup["encoded"], steps=4, resume_from="latest", **node)
    assert _tree(outside) == before, sorted(map(str, _tree(outside) - before))
    assert not Path("/outside_escape_step00004.trainstate").exists() and not (tmp_path / "chosen").exists()


def test_extending_a_finished_run_keeps_its_final_lora_as_a_checkpoint(setup, comfy):
    """Issue 15.2: 6 steps, then the same graph with 8 steps and resume_from latest: the 6-step LoRA survives as the
    run's step-6 checkpoint (listed in the checkpoints output), and every final step has its checkpoint."""
    node = dict(rank=2, alpha=2.0, save_every=4, output_name="extended", save_dtype="fp32")
    first = run_trainer(setup["encoded"], steps=6, **node)
    six = safetensors.torch.load_file(first.args[2])
    folder = setup["out"] / "extended_checkpoints"
    _same_lora(Path(first.args[2]), folder / "extended_step00006.safetensors")
    more = run_trainer(setup["encoded"], steps=8, resume_from="latest", **node)
    assert more.args[2] == first.args[2]  # the run goes on under its name...
    kept = safetensors.torch.load_file(str(folder / "extended_step00006.safetensors"))
    assert kept.keys() == six.keys() and all(torch.equal(kept[k], six[k]) for k in six)  # ...its 6-step LoRA kept
    eight = safetensors.torch.load_file(more.args[2])
    assert any(not torch.equal(eight[k], six[k]) for k in six)
    assert more.args[4].splitlines() == [str(folder / f"extended_step0000{s}.safetensors") for s in (4, 6)] + \
        [more.args[2]]
    _same_lora(Path(more.args[2]), folder / "extended_step00008.safetensors")
    _assert_run_folder_sound(setup["out"], "extended")
