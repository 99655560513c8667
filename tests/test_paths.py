"""Allowed dataset roots, output names that cannot escape, and atomic writes."""
import os

import pytest
import torch
from klein_lora_studio.trainer import paths


@pytest.mark.parametrize("bad", ["../evil", "a/b", "a\\\\b", "/abs", "..", "", "  ", "CON", "x" * 101, "a:b", "a*b",
                                 "-lead"])
def test_unsafe_output_names_are_refused(bad):
    with pytest.raises(ValueError, match="not a plain file name"):
        paths.safe_name(bad)


def test_safe_names_pass_and_lose_the_extension():
    assert paths.safe_name("my style v1.safetensors") == "my style v1"
    assert paths.safe_name("klein_lora-2") == "klein_lora-2"


def test_dataset_folder_must_be_inside_an_allowed_root(tmp_path):
    inp = tmp_path / "input"
    (inp / "ds").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    assert paths.resolve_dataset_folder("ds", str(inp), []) == (inp / "ds").resolve()
    with pytest.raises(ValueError, match="outside the allowed roots"):
        paths.resolve_dataset_folder(str(outside), str(inp), [])
    with pytest.raises(ValueError, match="outside the allowed roots"):
        paths.resolve_dataset_folder("../outside", str(inp), [])
    (inp / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside the allowed roots"):
        paths.resolve_dataset_folder("link", str(inp), [])
    assert paths.resolve_dataset_folder(str(outside), str(inp), [outside.resolve()]) == outside.resolve()
    with pytest.raises(ValueError, match="does not exist"):
        paths.resolve_dataset_folder("missing", str(inp), [])


def test_roots_from_config_file_and_environment(tmp_path, monkeypatch):
    (tmp_path / paths.CONFIG_NAME).write_text('{"dataset_roots": ["/data/a"]}')
    monkeypatch.setenv(paths.ROOTS_ENV, "/data/b")
    roots = [str(r) for r in paths.configured_dataset_roots(str(tmp_path))]
    assert roots == ["/data/b", "/data/a"]
    (tmp_path / paths.CONFIG_NAME).write_text("{not json")
    with pytest.raises(ValueError, match=paths.CONFIG_NAME):
        paths.configured_dataset_roots(str(tmp_path))


def test_unique_run_name_never_reuses_an_existing_lora(tmp_path):
    assert paths.unique_run_name(tmp_path, "a") == "a"
    (tmp_path / "a.safetensors").write_bytes(b"x")
    (tmp_path / "a_2_checkpoints").mkdir()
    assert paths.unique_run_name(tmp_path, "a") == "a_3"


def test_atomic_save_leaves_old_file_and_no_temp_on_failure(tmp_path):
    target = tmp_path / "x.safetensors"
    paths.atomic_save_safetensors({"a": torch.ones(2)}, target, {"k": "v"})
    before = target.read_bytes()
    with pytest.raises((TypeError, AttributeError, ValueError)):
        paths.atomic_save_safetensors({"a": "not a tensor"}, target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["x.safetensors"]
    assert not any(n.startswith(".") for n in os.listdir(tmp_path))
