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


def test_the_sweep_backend_checks_job_names_itself(tmp_path):
    """manifest_loras (also what the sweep CLI's callers use) refuses a crafted job name without echoing it."""
    import json

    from klein_lora_studio.trainer.jobs import sweep

    manifest = tmp_path / "sweep.json"
    for jobs in ([{"name": "ok", "status": "done", "checkpoints": [], "lora_path": "/x/ok.safetensors"},
                  {"name": "../../etc/evil", "status": "done", "checkpoints": [], "lora_path": "/etc/passwd"}],
                 [{"name": "ok", "status": "done", "checkpoints": [], "lora_path": "ok.safetensors"}, "../etc/evil"]):
        manifest.write_text(json.dumps({"format": sweep.FORMAT, "jobs": jobs}), encoding="utf-8")
        with pytest.raises(ValueError, match="job 2 of sweep.json has a name that is not a plain file name") as e:
            sweep.manifest_loras(manifest, tmp_path)
        assert "evil" not in str(e.value) and "passwd" not in str(e.value)
    manifest.write_text(json.dumps({"format": sweep.FORMAT, "jobs": [{"name": "a", "status": "done"}]}), encoding="utf-8")
    with pytest.raises(ValueError, match="a finished job of .*sweep.json lists no checkpoints or lora_path"):
        sweep.manifest_loras(manifest, tmp_path)


def test_an_eval_report_for_a_linked_lora_stays_inside_comfyuis_folders(comfy, tiny, base_dir, tmp_path):
    """The Checkpoint Sampler given a LoRA linked in from outside writes its report in output/, not beside the target."""
    import folder_paths
    import torch
    from klein_lora_studio.tests import lora_kit

    target = tmp_path / "elsewhere" / "hd_far.safetensors"
    target.parent.mkdir()
    safetensors.torch.save_file(lora_kit.bfl_sd(lora_kit.random_lora(3), alpha=4.0), str(target))
    loras = Path(folder_paths.get_folder_paths("loras")[0])
    loras.mkdir(parents=True, exist_ok=True)
    (loras / "hd_linked.safetensors").symlink_to(target)
    own = loras / "hd_own.safetensors"
    safetensors.torch.save_file(lora_kit.bfl_sd(lora_kit.random_lora(4), alpha=4.0), str(own))
    node = _node(comfy, "KleinCheckpointSampler")

    def sample(checkpoints: str) -> str:
        with torch.inference_mode():
            return node.execute(model=tiny.unet(), clip=tiny.clip, vae=tiny.vae, checkpoints=checkpoints,
                                trigger="zxq", prompts="car: a red car", steps=1, cfg=4.0, seed=0, preview=True,
                                preview_steps=1, resolution=64).args[1]

    text = sample("hd_linked.safetensors")
    assert list(target.parent.iterdir()) == [target], "a report was written beside the linked LoRA's target"
    fallback = Path(folder_paths.get_output_directory()) / "klein_lora_eval" / "hd_far_eval.json"
    assert fallback.is_file() and f"Report: {fallback}" in text
    text = sample("hd_own.safetensors")  # a LoRA that lives in models/loras keeps its report beside it
    assert (Path(os.path.realpath(loras)) / "hd_own_eval.json").is_file() and "hd_own_eval.json" in text


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


def _new_files(folder: Path, before: set[Path]) -> list[Path]:
    return sorted(set(folder.rglob("*.safetensors")) - before)


def test_doctor_loader_and_trainer_rerun_when_a_caption_changes_and_train_on_it(tiny, base_dir):
    """Through a real server: an unchanged folder comes from the cache (no new run); an edited caption re-runs the
    Doctor, the Loader and the Trainer, and the second run trains on the edited caption."""
    import json

    import torch
    from klein_lora_studio.devtools.server import ComfyServer
    from klein_lora_studio.devtools.workflows import api_path, to_tiny
    from klein_lora_studio.tests.conftest import COMFYUI
    from klein_lora_studio.trainer.data import captions, dataset

    folder = write_concept_dataset(base_dir / "input" / "hd_fingerprint", n=3, size=64)
    prompt = to_tiny(json.loads(api_path("klein_style_lora").read_text()), "hd_fingerprint", steps=3, save_every=3,
                     output_name="hd_fp")
    del prompt["7"]  # the loss graph: not needed here
    trainer = prompt["6"]["inputs"]
    del trainer["clip"], trainer["vae"]  # no sampling: only the training matters
    trainer["batch_size"] = 3  # every step sees the edited caption (Adam's first steps barely depend on the data)
    prompt["8"] = {"class_type": "KleinDatasetDoctor",
                   "inputs": {"folder": "hd_fingerprint", "trigger": "zxq", "resolution": 64, "task": "none"}}
    trigger = prompt["4"]["inputs"]["trigger"]
    loras, text_cache = base_dir / "models" / "loras", base_dir / "output" / "klein_lora_cache" / "text"
    text_cache.mkdir(parents=True, exist_ok=True)
    watched = {"4", "6", "8"}  # loader, trainer, doctor
    with ComfyServer(COMFYUI, base_dir) as url:
        assert not watched & _cached(_post_and_wait(url, prompt))
        first = loras / "hd_fp.safetensors"
        assert first.is_file()
        loras_before, texts_before = set(loras.rglob("*.safetensors")), set(text_cache.rglob("*.safetensors"))
        assert watched <= _cached(_post_and_wait(url, prompt)), "an unchanged folder must come from the cache"
        assert not _new_files(loras, loras_before), "an unchanged folder trained again"

        edited = "a caption edited without the trigger"
        (folder / "001.txt").write_text(edited, encoding="utf-8")
        assert not watched & _cached(_post_and_wait(url, prompt)), "an edited caption must re-run the three nodes"
        assert watched <= _cached(_post_and_wait(url, prompt))  # and the edited folder is cached in its turn
        new_texts = _new_files(text_cache, texts_before)
        second = loras / "hd_fp_2.safetensors"
    assert second in _new_files(loras, loras_before) and not (loras / "hd_fp_3.safetensors").exists()
    assert len(new_texts) == 1, new_texts  # the edited caption, encoded once; the others came from the cache
    stored = safetensors.torch.load_file(str(new_texts[0]))["value"]
    with torch.inference_mode():
        expected = dataset.encode_caption(tiny.clip, captions.with_trigger(edited, trigger))
    assert torch.allclose(stored, expected, atol=1e-5), (stored - expected).abs().max()
    a, b = safetensors.torch.load_file(str(first)), safetensors.torch.load_file(str(second))
    assert a.keys() == b.keys() and any(not torch.equal(a[k], b[k]) for k in a), "the edited caption changed nothing"


# ------------------------------------------------------------------ item 3 on the command line


def test_the_command_line_checks_dataset_files_against_the_nodes_roots(comfy, tiny, base_dir, tmp_path, monkeypatch):
    """`python -m klein_lora_studio.train` resolves the folder as the Dataset Loader does and checks each file
    against the same roots: a link to another folder of input/ trains, a link out of the roots is refused."""
    import json
    import subprocess

    from klein_lora_studio.devtools.tiny_models import TE_FILE, UNET_FILE
    from klein_lora_studio.tests.conftest import COMFYUI
    from klein_lora_studio.trainer.jobs import config as run_config
    from klein_lora_studio.trainer.jobs import events, launch, runner

    source = write_concept_dataset(base_dir / "input" / "hd_cli_source", n=1, size=64)
    folder = write_concept_dataset(base_dir / "input" / "hd_cli", n=2, size=64)
    (folder / "linked.png").symlink_to(source / "000.png")  # inside the roots: the node trains on it

    def train(name: str) -> dict:
        cfg = {"version": run_config.VERSION, "model": {"file": UNET_FILE}, "targets": {"groups": ["double"]},
               "dataset": {"folder": "hd_cli", "trigger": "zxq", "resolution": 64, "bucketing": False,
                           "use_cache": False, "vae": "taef2", "clip": [TE_FILE], "clip_type": run_config.DEV_CLIP_TYPE},
               "train": {"steps": 1, "rank": 2, "alpha": 2.0, "learning_rate": 1e-3, "output_name": name, "save_dtype": "fp32"},
               "comfyui": {"path": str(COMFYUI), "base_directory": str(base_dir)}}
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps(cfg), encoding="utf-8")
        cmd, env = launch.command(path, ["cpu"], ["--no-sampling"])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        found = [e for e in map(events.parse_event, done.stdout.splitlines()) if e]
        assert found, done.stderr[-2000:]
        return found[-1]

    done = train("hd_cli_inside")
    assert done["klein_lora"] == "done", done
    assert Path(done["lora_path"]).name == "hd_cli_inside.safetensors"
    with safetensors.safe_open(done["lora_path"], "pt") as f:  # the size table names the tiny shape
        assert f.metadata()["base_model"] == "flux2-1x2-h256"

    outside = tmp_path / "outside"
    outside.mkdir()
    concept_image(64, 9).save(outside / "secret.png")
    (folder / "evil.png").symlink_to(outside / "secret.png")
    cfg = run_config.RunConfig.model_validate(json.loads((tmp_path / "hd_cli_inside.json").read_text()))
    monkeypatch.setitem(runner.CLIP_LOADERS, run_config.DEV_CLIP_TYPE, lambda files: tiny.clip)  # as train.py does
    with pytest.raises(ValueError, match=r"link outside the allowed roots: .*evil\.png") as e:  # the CLI's own step
        runner.encode_folder(cfg)
    assert "linked.png" not in str(e.value)
