"""Issue 15's data cases, each through the node a user wires: links out of the roots, files that are not used,
over-long captions, decompression bombs, bad LoRA files in a merge slot, manifests and reports outside the roots."""
from __future__ import annotations

import os
import struct
import time
import zlib
from pathlib import Path

import pytest
import safetensors.torch
from klein_lora_studio.tests.helpers import concept_image, write_concept_dataset

pytestmark = pytest.mark.comfy


def _node(comfy, name):
    return comfy.NODE_CLASS_MAPPINGS[name]


def _doctor(comfy, folder: str, **kw):
    report, sheet = _node(comfy, "KleinDatasetDoctor").execute(
        folder=folder, trigger="zxq", resolution=64, task="none", **kw).args
    return report, sheet


def _load(comfy, tiny, folder: str, bucketing: bool = False, **kw):
    return _node(comfy, "KleinDatasetLoader").execute(folder=folder, trigger="zxq", resolution=64, vae=tiny.vae,
                                                      clip=tiny.clip, bucketing=bucketing, use_cache=False, **kw).args


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid-looking PNG of a few hundred bytes whose header claims side x side pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ------------------------------------------------------------------ item 3: links out of the roots


def test_a_file_linked_from_outside_the_roots_is_refused_and_never_shown(comfy, tiny, base_dir, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    concept_image(64, 99).save(outside / "secret.png")
    (outside / "secret.txt").write_text("a private note", encoding="utf-8")
    write_concept_dataset(base_dir / "input" / "hd_plain", n=3, size=64)
    linked = write_concept_dataset(base_dir / "input" / "hd_linked", n=3, size=64)
    (linked / "evil.png").symlink_to(outside / "secret.png")
    (linked / "001.txt").unlink()
    (linked / "001.txt").symlink_to(outside / "secret.txt")

    with pytest.raises(ValueError, match=r"link outside the allowed roots: .*evil\.png -> .*secret\.png") as e:
        _load(comfy, tiny, "hd_linked")
    assert "001.txt" in str(e.value)  # the caption link is named too
    report, sheet = _doctor(comfy, "hd_linked")
    assert "evil.png" in report and "001.txt" in report and "The loader refuses them" in report
    _, plain_sheet = _doctor(comfy, "hd_plain")
    assert sheet.shape == plain_sheet.shape, "the linked image got a thumbnail on the contact sheet"

    inside = write_concept_dataset(base_dir / "input" / "hd_inside_link", n=2, size=64)
    (inside / "again.png").symlink_to(base_dir / "input" / "hd_plain" / "000.png")  # a link within the roots is fine
    data, _ = _load(comfy, tiny, "hd_inside_link")
    assert sorted(data.files) == ["000.png", "001.png", "again.png"]


# ------------------------------------------------------------------ item 9: files that are not used


def test_subfolders_orphan_captions_and_extension_case_are_reported(comfy, tiny, base_dir):
    folder = write_concept_dataset(base_dir / "input" / "hd_unused", n=2, size=64, captions=False)
    (folder / "000.TXT").write_text("zxq, upper-case extension", encoding="utf-8")  # matched: extension in any case
    (folder / "lost.txt").write_text("no image of this name", encoding="utf-8")
    concept_image(64, 5).save(folder / "Case.png")
    (folder / "case.txt").write_text("differs from its image by case", encoding="utf-8")
    write_concept_dataset(folder / "more", n=2, size=64)

    data, text = _load(comfy, tiny, "hd_unused")
    assert data.captions[data.files.index("000.png")] == "zxq, upper-case extension"
    assert "2 image(s) in subfolders" in text and "more/ (2)" in text
    assert "lost.txt" in text and "case.txt (the image is Case.png: names must match exactly)" in text
    report, _ = _doctor(comfy, "hd_unused")
    assert "more/ (2)" in report and "lost.txt" in report and "[files]" in report

    only_subfolders = base_dir / "input" / "hd_nested"
    write_concept_dataset(only_subfolders / "a", n=2, size=64)
    with pytest.raises(ValueError, match=r"hd_nested has no images .*its subfolders hold images.*a/ \(2\)"):
        _load(comfy, tiny, "hd_nested")


# ------------------------------------------------------------------ item 7: caption length


def test_long_captions_are_cut_at_512_tokens_and_a_huge_one_fails_fast(comfy, tiny, base_dir):
    from klein_lora_studio.trainer.data import captions

    folder = write_concept_dataset(base_dir / "input" / "hd_long", n=2, size=64)
    (folder / "001.txt").write_text("zxq, " + " ".join(f"detail{i}" for i in range(800)), encoding="utf-8")
    data, text = _load(comfy, tiny, "hd_long")
    tokenizer = captions.encoder_tokenizer(tiny.clip)
    cut = data.captions[data.files.index("001.png")]
    assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= captions.MAX_TOKENS
    assert cut.startswith("zxq, detail0 detail1")
    assert "001.txt: the caption has" in text and "cut to the text encoder's 512" in text
    report, _ = _doctor(comfy, "hd_long")
    assert "001.txt (" in report and "longer than the text encoder's 512 tokens" in report

    (folder / "001.txt").write_bytes(b"zxq " * (5 * 1024 * 1024 // 4))  # 5 MB
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"caption .*001\.txt is 5,242,880 bytes"):
        _load(comfy, tiny, "hd_long")
    took = time.perf_counter() - t0
    assert took < 30, f"refusing a 5 MB caption took {took:.1f} s"  # measured ~1 s (the tiny encoder's set-up)
    report, _ = _doctor(comfy, "hd_long")
    assert "larger than any caption" in report and "001.txt" in report


# ------------------------------------------------------------------ item 8: decompression bombs, bad LoRA files


def test_a_decompression_bomb_names_the_file_and_the_doctor_still_reports(comfy, tiny, base_dir):
    folder = write_concept_dataset(base_dir / "input" / "hd_bomb", n=2, size=64)
    bomb = bomb_png(folder / "bomb.png")
    assert bomb.stat().st_size < 300
    with pytest.raises(ValueError, match=r"image .*bomb\.png claims more pixels than PIL will decode"):
        _load(comfy, tiny, "hd_bomb")
    with pytest.raises(ValueError, match=r"bomb\.png claims more pixels"):
        _load(comfy, tiny, "hd_bomb", bucketing=True)  # the bucketing path reads the header first
    report, sheet = _doctor(comfy, "hd_bomb")  # a finding, not a failed node
    assert "[unreadable]" in report and "bomb.png" in report and sheet.ndim == 4


def test_a_bad_file_in_a_merge_slot_names_the_slot_and_the_file(comfy, base_dir):
    import folder_paths
    from klein_lora_studio.tests import lora_kit

    loras = Path(folder_paths.get_folder_paths("loras")[0])
    loras.mkdir(parents=True, exist_ok=True)
    good = loras / "hd_good.safetensors"
    safetensors.torch.save_file(lora_kit.bfl_sd(lora_kit.random_lora(0), alpha=4.0), str(good))
    (loras / "hd_truncated.safetensors").write_bytes(good.read_bytes()[:40])
    (loras / "hd_text.safetensors").write_text("not a LoRA at all", encoding="utf-8")
    merge = _node(comfy, "KleinLoRAMerge")
    for bad in ("hd_truncated.safetensors", "hd_text.safetensors"):
        with pytest.raises(ValueError, match=rf"^loras\.lora_2: LoRA file .*{bad} cannot be read .*Download or save it again"):
            merge.execute(mode="exact", target_rank=4, output_name="hd_merged", format="comfyui", save_dtype="auto",
                          loras=lora_kit.lora_slots(("hd_good.safetensors", 1.0), (bad, 1.0)))
    with pytest.raises(ValueError, match=r"^lora: LoRA file .*hd_text\.safetensors cannot be read"):
        _node(comfy, "KleinLoRAConvert").execute(lora="hd_text.safetensors", format="comfyui", output_name="hd_c",
                                                 save_dtype="auto")


# ------------------------------------------------------------------ items 4 and 5: reports and manifests


def test_the_sweep_manifest_is_read_only_inside_the_output_folder(comfy, base_dir, tmp_path):
    import folder_paths

    grid = _node(comfy, "KleinRankStepsGrid")
    out = Path(folder_paths.get_output_directory())
    elsewhere = tmp_path / "sweep.json"
    elsewhere.write_text('{"format": "klein-lora-sweep"}', encoding="utf-8")
    errors = []
    for name in (str(elsewhere), "../../../../../../etc/passwd", "no_such_sweep/sweep.json",
                 os.path.relpath(elsewhere, out)):
        with pytest.raises(ValueError) as e:
            grid.execute(model=None, clip=None, vae=None, loras="", prompt="p", steps=1, cfg=1.0, seed=0,
                         resolution=64, sweep_manifest=name)
        errors.append(str(e.value).replace(name, "<name>"))
    assert len(set(errors)) == 1, errors  # one message for missing and outside: no existence oracle
    assert "not a sweep manifest in ComfyUI's output folder" in errors[0]

    crafted = out / "hd_sweep" / "sweep.json"
    crafted.parent.mkdir(parents=True, exist_ok=True)
    crafted.write_text('{"format": "klein-lora-sweep", "jobs": [{"name": "../../../etc/x", "status": "queued"}]}',
                       encoding="utf-8")
    with pytest.raises(ValueError, match="job 1 of sweep.json has a name that is not a plain file name") as e:
        grid.execute(model=None, clip=None, vae=None, loras="", prompt="p", steps=1, cfg=1.0, seed=0,
                     resolution=64, sweep_manifest="hd_sweep/../hd_sweep/sweep.json")
    assert "etc/x" not in str(e.value)


def test_an_eval_report_for_a_linked_lora_stays_inside_comfyuis_folders(comfy, base_dir, tmp_path):
    import folder_paths
    from klein_lora_studio.trainer.evaluation import metrics as mt
    from klein_lora_studio.trainer.evaluation import sampling as sp

    target = tmp_path / "elsewhere" / "linked.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"x")
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "linked.safetensors").symlink_to(target)
    roots = [Path(folder_paths.models_dir), Path(folder_paths.get_output_directory())]
    fallback = Path(folder_paths.get_output_directory()) / "klein_lora_eval"
    real = Path(os.path.realpath(loras / "linked.safetensors"))  # what the sampler's checkpoint list holds
    where = sp.report_path_within(mt.report_path(real), roots, fallback)
    assert where == fallback / "linked_eval.json"
    own = loras / "own.safetensors"
    own.write_bytes(b"x")
    assert sp.report_path_within(mt.report_path(own), roots, fallback) == Path(os.path.realpath(loras)) / "own_eval.json"


# ------------------------------------------------------------------ issue 14: re-run when the folder changes


def _post_and_wait(url: str, prompt: dict, timeout: float = 300) -> dict:
    import json
    import urllib.request

    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": prompt}).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        prompt_id = json.load(r)["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        with urllib.request.urlopen(f"{url}/history/{prompt_id}", timeout=30) as r:
            entry = json.load(r).get(prompt_id)
        if entry and entry.get("status", {}).get("completed") is not None:
            return entry
        time.sleep(0.3)
    raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


def _cached(entry: dict) -> set[str]:
    assert entry["status"]["status_str"] == "success", entry["status"]
    return {n for kind, data in entry["status"]["messages"] if kind == "execution_cached" for n in data["nodes"]}


def test_doctor_and_loader_rerun_when_a_caption_changes_and_only_then(tiny, base_dir):
    from klein_lora_studio.devtools.server import ComfyServer
    from klein_lora_studio.tests.conftest import COMFYUI

    folder = write_concept_dataset(base_dir / "input" / "hd_fingerprint", n=3, size=64)
    for p in folder.glob("*.txt"):
        p.write_text("zxq, " + p.read_text(encoding="utf-8"), encoding="utf-8")
    prompt = {"1": {"class_type": "KleinDatasetDoctor",
                    "inputs": {"folder": "hd_fingerprint", "trigger": "zxq", "resolution": 64, "task": "none"}}}
    with ComfyServer(COMFYUI, base_dir) as url:
        assert "1" not in _cached(_post_and_wait(url, prompt))
        assert "1" in _cached(_post_and_wait(url, prompt)), "an unchanged folder must come from the cache"
        (folder / "001.txt").write_text("a caption edited without the trigger", encoding="utf-8")
        assert "1" not in _cached(_post_and_wait(url, prompt)), "an edited caption must re-run the node"
        assert "1" in _cached(_post_and_wait(url, prompt))
