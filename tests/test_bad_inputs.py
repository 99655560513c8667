"""The bad-input suite: one case per row, each through the node a user would wire, each an error naming the
field or file and the fix, and nothing written outside ComfyUI's output and models folders."""
from __future__ import annotations

import dataclasses
import logging
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from klein_lora_studio.tests import lora_kit
from klein_lora_studio.tests.helpers import run_trainer
from PIL import Image

pytestmark = pytest.mark.comfy


def _files(root) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs}


@contextmanager
def nothing_written_outside(base_dir):
    """Everything outside base_dir/output and base_dir/models (and the repository) is left as it was."""
    from klein_lora_studio.tests.conftest import REPO

    watched = {"input": base_dir / "input", "user": base_dir / "user", "repo": REPO}
    before = {k: _files(v) for k, v in watched.items()}
    yield
    after = {k: _files(v) for k, v in watched.items()}
    for k in watched:
        new = {f for f in after[k] - before[k] if "__pycache__" not in f and ".pytest_cache" not in f}
        assert not new, f"files written into {k}: {sorted(new)[:5]}"


@pytest.fixture
def guarded(base_dir):
    return lambda: nothing_written_outside(base_dir)


def _folder(base_dir, name: str, make) -> str:
    folder = base_dir / "input" / name
    folder.mkdir(parents=True, exist_ok=True)
    make(folder)
    return name


def _img(folder, name="a.png", mode="RGB", size=(64, 64), caption="a thing"):
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    im = Image.fromarray(arr)
    if mode == "CMYK":
        im = im.convert("CMYK")
        name = name.replace(".png", ".jpg")
    elif mode == "I;16":
        im = Image.fromarray(arr[..., 0].astype(np.uint16) * 257)
    elif mode == "RGBA":
        im = im.convert("RGBA")
    im.save(folder / name)
    if caption is not None:
        (folder / name).with_suffix(".txt").write_text(caption, encoding="utf-8")


def _load(comfy, tiny, folder: str, control: str = ""):
    from klein_lora_studio.nodes.dataset_loader import KleinDatasetLoader

    err = KleinDatasetLoader.validate_inputs(folder=folder, control_folder=control)
    if err is not True:
        raise ValueError(err)
    with torch.inference_mode():
        return KleinDatasetLoader.execute(folder, "zxq", 64, tiny.vae, tiny.clip, control_folder=control,
                                          use_cache=False).args


LOADER_ERRORS = [
    ("empty folder", lambda f: None, "has no images"),
    ("corrupt image", lambda f: (f / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnope"), r"bad\.png cannot be read"),
    ("zero-byte image", lambda f: (f / "zero.jpg").write_bytes(b""), r"zero\.jpg is an empty \(zero-byte\) file"),
    ("non-UTF-8 caption", lambda f: (_img(f), (f / "a.txt").write_bytes(b"caf\xe9 \xff")), r"a\.txt is not UTF-8"),
]


@pytest.mark.parametrize("case,make,match", LOADER_ERRORS, ids=[c[0] for c in LOADER_ERRORS])
def test_loader_refuses_bad_files_naming_them(comfy, tiny, base_dir, guarded, case, make, match):
    name = _folder(base_dir, "bad_" + case.replace(" ", "_"), make)
    with guarded(), pytest.raises(ValueError, match=match):
        _load(comfy, tiny, name)


CONVERTED = [("CMYK image", "CMYK", "converted from CMYK"), ("16-bit image", "I;16", "16-bit"),
             ("alpha image", "RGBA", "transparency flattened")]


@pytest.mark.parametrize("case,mode,note", CONVERTED, ids=[c[0] for c in CONVERTED])
def test_loader_converts_odd_modes_with_a_note(comfy, tiny, base_dir, guarded, case, mode, note):
    name = _folder(base_dir, "mode_" + mode.replace(";", ""), lambda f: _img(f, mode=mode))
    with guarded():
        _, report = _load(comfy, tiny, name)
    assert note in report


def test_missing_caption_is_reported_by_name(comfy, tiny, base_dir, guarded):
    name = _folder(base_dir, "nocap", lambda f: (_img(f, "with.png"), _img(f, "without.png", caption=None)))
    with guarded():
        data, report = _load(comfy, tiny, name)
    assert "without.png" in report and "trigger alone" in report and len(data) == 2


def test_pairs_that_match_nothing_are_an_error(comfy, tiny, base_dir, guarded):
    tgt = _folder(base_dir, "pairs_t", lambda f: _img(f, "001.png"))
    ctl = _folder(base_dir, "pairs_c", lambda f: _img(f, "999.png", caption=None))
    with guarded(), pytest.raises(ValueError, match="matches nothing|no .* match|001.png"):
        _load(comfy, tiny, tgt, ctl)


@pytest.mark.parametrize("folder,match", [("../../etc", "outside the allowed roots"), ("/etc", "outside the allowed roots"),
                                          ("missing_folder", "does not exist")])
def test_dataset_folder_outside_roots_or_missing_fails_at_queue_time(comfy, base_dir, guarded, folder, match):
    from klein_lora_studio.nodes.dataset_loader import KleinDatasetLoader

    with guarded():
        assert match in KleinDatasetLoader.validate_inputs(folder=folder)


def test_dataset_folder_through_a_symlink_out_of_the_roots(comfy, base_dir, guarded, tmp_path):
    from klein_lora_studio.nodes.dataset_loader import KleinDatasetLoader

    link = base_dir / "input" / "escape_link"
    if not link.exists():
        link.symlink_to(tmp_path, target_is_directory=True)
    with guarded():
        assert "outside the allowed roots" in KleinDatasetLoader.validate_inputs(folder="escape_link")


@pytest.mark.parametrize("name", ["../x", "/abs/x", "a/b", "a\\b", "a:b", "a|b", "CON", ".."])
def test_output_names_that_could_escape_fail_at_queue_time(comfy, guarded, name):
    from klein_lora_studio.nodes.lora_trainer import KleinLoRATrainer

    with guarded():
        assert "not a plain file name" in KleinLoRATrainer.validate_inputs(output_name=name)


@pytest.fixture(scope="module")
def trainer_inputs(encoded):
    return encoded("bad_inputs_ds", n=2)


TRAINER_ERRORS = [("rank 0", dict(rank=0), "rank 0 is below 1"),
                  ("rank above the layer width", dict(rank=300), "rank 300 is larger than layer .* lower the rank"),
                  ("learning rate 0", dict(learning_rate=0.0), "learning_rate is 0.0: it must be above 0"),
                  ("learning rate below 0", dict(learning_rate=-1e-4), "learning_rate is -0.0001"),
                  ("steps 0", dict(steps=0), "steps is 0: train for at least 1 step")]


@pytest.mark.parametrize("case,change,match", TRAINER_ERRORS, ids=[c[0] for c in TRAINER_ERRORS])
def test_trainer_settings_errors_name_the_field_and_fix(comfy, trainer_inputs, base_dir, guarded, case, change, match):
    args = dict(rank=4, alpha=4.0, learning_rate=1e-4, steps=2)
    args.update(change)
    before = _files(base_dir / "models" / "loras")
    with guarded(), pytest.raises(ValueError, match=match):
        run_trainer(trainer_inputs, **args, output_name=f"bad_{case.replace(' ', '_')}")
    assert _files(base_dir / "models" / "loras") == before, "a refused run must write nothing"


def test_a_learning_rate_above_1e_2_warns(comfy, trainer_inputs, caplog, guarded):
    from klein_lora_studio.trainer.training import loop

    caplog.set_level(logging.WARNING)
    loop.TrainConfig(rank=4, alpha=4, learning_rate=0.05, steps=1).validate()
    assert any("far above the recipes" in r.getMessage() for r in caplog.records)


def test_a_non_klein_model_is_refused(comfy, trainer_inputs, base_dir, guarded):
    """SD-style: a ModelPatcher around a model that is not Flux2."""
    import comfy.model_patcher

    other = comfy.model_patcher.ModelPatcher(torch.nn.Conv2d(4, 4, 3), torch.device("cpu"), torch.device("cpu"))
    setup = dataclasses.replace(trainer_inputs, unet=other)
    with guarded(), pytest.raises(ValueError, match=r"not FLUX\.2 \[klein\].*UNETLoader"):
        run_trainer(setup, learning_rate=1e-4, steps=2, output_name="bad_model")


def test_flux2_dev_is_refused_at_run_time_too(comfy):
    """Same architecture class as klein in ComfyUI (model_base.Flux2), but 8 + 48 blocks of width 6144."""
    import types

    import comfy.model_base
    from klein_lora_studio.trainer.training import loop

    dev = comfy.model_base.Flux2.__new__(comfy.model_base.Flux2)
    torch.nn.Module.__init__(dev)
    dev.diffusion_model = types.SimpleNamespace(double_blocks=[None] * 8, single_blocks=[None] * 48, hidden_size=6144)
    with pytest.raises(ValueError, match=r"MODEL input is FLUX\.2 \[dev\] \(32B.*not FLUX\.2 \[klein\].*klein Base 4B or 9B"):
        loop.check_klein(types.SimpleNamespace(model=dev))
    dev.diffusion_model.single_blocks = [None] * 24  # klein 9B's counts with dev's width: not dev, left to run
    loop.check_klein(types.SimpleNamespace(model=dev))


def test_loras_of_different_bases_into_merge(comfy, base_dir, guarded):
    from klein_lora_studio.nodes.merge import KleinLoRAMerge

    folder = base_dir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    small = lora_kit.random_lora(1)
    wide = {"double_blocks.0.img_attn.proj": (torch.randn(4, 3072), torch.randn(3072, 4))}  # a 4B-width layer
    safetensors.torch.save_file(lora_kit.bfl_sd(small, 4.0), str(folder / "base_tiny.safetensors"))
    safetensors.torch.save_file(lora_kit.bfl_sd(wide, 4.0), str(folder / "base_4b.safetensors"))
    with guarded(), pytest.raises(ValueError, match="base_tiny|base_4b"):
        KleinLoRAMerge.execute(mode="exact", target_rank=8, output_name="bad_merge", format="comfyui", save_dtype="auto",
                               loras=lora_kit.lora_slots(("base_tiny.safetensors", 1.0), ("base_4b.safetensors", 1.0)))


# Every case of issue 15 (its items 1-11, and the distilled-name and no-Triton must-holds): each has a row whose
# case starts with this label.
ISSUE_15_CASES = [*(f"issue 15.{n}:" for n in range(1, 12)), "issue 15, distilled name:", "issue 15, no Triton"]
# Tests of the hardening files that are not a bad input, with why.
NOT_BAD_INPUTS = {"test_doctor_loader_and_trainer_rerun_when_a_caption_changes_and_train_on_it":
                  "issue 14: the Loader re-runs when its folder changes"}


def test_the_docs_table_names_real_tests():
    """docs/bad-inputs.md mirrors the bad-input tests: every row names tests that exist, every test here and in
    tests/test_hardening_*.py has a row, and every case of issue 15 has one."""
    import re

    from klein_lora_studio.tests.conftest import REPO

    rows = [line for line in (REPO / "docs" / "bad-inputs.md").read_text(encoding="utf-8").splitlines()
            if line.startswith("| ") and "tests/" in line]
    named = {m for line in rows for m in re.findall(r"(tests/\w+\.py)::(\w+)", line)}
    assert len(rows) >= 30 and named
    for file, test in named:
        assert re.search(rf"^def {test}\(", (REPO / file).read_text(encoding="utf-8"), re.M), f"{file}::{test}"
    suites = [Path(__file__), *sorted((REPO / "tests").glob("test_hardening_*.py"))]
    assert len(suites) >= 3, suites
    for suite in suites:
        here = set(re.findall(r"^def (test_\w+)\(", suite.read_text(encoding="utf-8"), re.M))
        rowed = {t for f, t in named if f == f"tests/{suite.name}"}
        missing = here - rowed - {"test_the_docs_table_names_real_tests"} - set(NOT_BAD_INPUTS)
        assert not missing, f"tests of {suite.name} without a row in docs/bad-inputs.md: {sorted(missing)}"
    cases = [line.split("|")[1].strip() for line in rows]
    absent = [c for c in ISSUE_15_CASES if not any(case.startswith(c) for case in cases)]
    assert not absent, f"issue 15 cases without a row in docs/bad-inputs.md: {absent}"
