"""bench/bench_user_graph.py keeps working: the whole user graph at tiny size on the CPU, and the real-size random
files it writes on the GPU machine are what ComfyUI's stock loaders detect."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "bench"
PHASES = ("loading", "text_encoding", "vae_encoding", "training_setup", "training_steps", "sampling", "decoding")


@pytest.fixture(scope="module")
def random_models():
    sys.path.insert(0, str(BENCH))
    import random_models

    return random_models


@pytest.mark.skipif(not os.environ.get("COMFYUI_PATH"), reason="COMFYUI_PATH is not set")
def test_the_user_graph_runs_every_phase_and_samples_each_checkpoint(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [sys.executable, str(BENCH / "bench_user_graph.py"), "--model", "tiny", "--res", "64", "--steps", "4",
           "--every", "2", "--sample-steps", "2", "--tag", "test"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line[4:]) for line in proc.stdout.splitlines() if line.startswith("ROW ")]
    row = json.loads((tmp_path / "bench_user_graph_tiny_test.json").read_text())
    assert len(rows) == 1 and rows[0]["phases"] == row["phases"]
    assert row["finished"] is True and row["error"] is None
    assert set(PHASES) <= set(row["phases"]), row["phases"]
    assert all(row["phases"][p]["wall_s"] > 0 for p in PHASES)
    assert row["peak_allocated_gib"] is None and row["phases"]["training_steps"]["peak_allocated_gib"] is None  # CPU
    assert row["steps_done"] == 4 and row["checkpoints"] == 2 and row["s_per_step"] > 0
    # the suite sampled for the base model before training, then at steps 2 and 4, each grid written
    assert row["samplings"] == 3 and row["checkpoint_samples"] == 2 and len(row["sample_grids"]) == 2
    kinds = {m["kind"] for m in row["loaded_at_training_start"]}
    assert kinds == {"diffusion_model", "text_encoder", "vae"}, row["loaded_at_training_start"]
    assert row["loaded_at_sampling"] and row["loaded_after_decoding"]


def test_streamed_files_read_back_as_written(random_models, tmp_path):
    import safetensors

    rm = random_models
    specs = [rm.Spec("w", (64, 32), torch.bfloat16, std=0.5), rm.Spec("q", (16, 8), torch.float8_e4m3fn, std=1.0),
             rm.Spec("s", (), torch.float32, "const", value=0.25), rm.Spec("n", (7,), torch.int64, "const"),
             rm.Spec("j", (3,), torch.uint8, "data", data=b"abc")]
    info = rm.write_safetensors(tmp_path / "x.safetensors", specs)
    assert info["bytes"] == (tmp_path / "x.safetensors").stat().st_size
    with safetensors.safe_open(str(tmp_path / "x.safetensors"), "pt") as f:
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert {k: (tuple(v.shape), v.dtype) for k, v in got.items()} == {s.name: (s.shape, s.dtype) for s in specs}
    assert 0.4 < got["w"].float().std().item() < 0.6  # measured 0.50 on 2,048 values
    assert got["s"].item() == 0.25 and got["n"].sum().item() == 0 and bytes(got["j"].tolist()) == b"abc"
    assert not list(tmp_path.glob(".x.safetensors*"))  # the temp file was renamed into place


@pytest.mark.comfy
def test_real_size_text_encoders_are_detected_as_klein_qwen3(comfy, random_models):
    import comfy.sd

    for kind, expected, gib in (("qwen3_4b", comfy.sd.TEModel.QWEN3_4B, 7.49), ("qwen3_8b", comfy.sd.TEModel.QWEN3_8B, 15.26)):
        for dtype in (torch.bfloat16, torch.float8_e4m3fn):
            specs = random_models.te_specs(kind, dtype)
            sd = {s.name: torch.empty(s.shape, dtype=s.dtype, device="meta") for s in specs}
            assert comfy.sd.detect_te_model(sd) == expected
        size = sum(s.nbytes for s in random_models.te_specs(kind, torch.bfloat16)) / 2**30
        assert abs(size - gib) < 0.01, size  # 4.02 B / 8.19 B parameters in bf16


@pytest.mark.comfy
def test_the_fp8_text_encoder_layout_loads_quantised_and_encodes(comfy, random_models):
    with torch.inference_mode():
        check = random_models.tiny_quantized_clip_check()
    assert check["quantization"] == {"mixed_ops": True}
    assert check["fp8_layers"] == check["fp8_specs"] == 28 * 7  # every decoder linear stays fp8
    assert check["cond_shape"] == [1, 512, 192] and check["finite"]


@pytest.mark.comfy
def test_the_random_vae_is_the_flux2_vae_for_vaeloader(comfy, random_models, base_dir):
    import folder_paths

    path = Path(folder_paths.get_folder_paths("vae")[0]) / "bench-flux2-vae.safetensors"
    info = random_models.write_safetensors(path, random_models.vae_specs())
    assert info["bytes"] == 336_211_284  # 84.0 M parameters in fp32 (and the header)
    vae = comfy.VAELoader().load_vae(path.name)[0]
    assert type(vae.first_stage_model).__name__ == "AutoencoderKL" and vae.latent_channels == 128
    with torch.inference_mode():
        latent = vae.encode(torch.rand(1, 64, 64, 3))
    assert tuple(latent.shape) == (1, 128, 4, 4) and torch.isfinite(latent).all()
    path.unlink()
