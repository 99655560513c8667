"""The trainer end to end on the tiny klein model, through ComfyUI's own loaders and LoRA loader."""
from __future__ import annotations

import json
import logging

import pytest
import safetensors
import torch
from klein_lora_studio.tests.helpers import TRIGGER
from klein_lora_studio.trainer.lora.layers import lora_layers
from klein_lora_studio.trainer.model import targets as tg
from klein_lora_studio.trainer.training import loop

pytestmark = pytest.mark.comfy


def _probe_inputs(data, seed=1):
    g = torch.Generator().manual_seed(seed)
    lat = data.latents[0]
    x = torch.randn((1, *lat.shape), generator=g)
    return x, torch.tensor([0.6]), data.contexts[0][None]


def _forward(patcher, x, t, ctx):
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    with torch.no_grad():
        return patcher.model.diffusion_model(x, t, ctx).clone()


@pytest.fixture(scope="module")
def concept(encoded):
    """Six 128 px concept images, every group's attention layers targeted (named as the selector names them)."""
    return encoded("concept", n=6, size=128, groups=tg.GROUPS, all_linears=True)


@pytest.fixture(scope="module")
def concept_data(concept):
    return concept.data


@pytest.fixture(scope="module")
def short_run(concept, base_dir):
    """30 steps, checkpoints every 10, saved in fp32 so calibration is checked at float precision."""
    unet, concept_data, targets = concept.unet, concept.data, concept.targets
    cfg = loop.TrainConfig(rank=4, alpha=8, learning_rate=2e-3, steps=30, save_every=10, output_name="short",
                           save_dtype="fp32", seed=3)
    probe = _probe_inputs(concept_data)
    before = _forward(unet, *probe)
    clone = unet.clone()
    with torch.inference_mode():
        result = loop.train_lora(unet, concept_data, targets, cfg, base_dir / "models" / "loras")
    return dict(unet=unet, clone=clone, targets=targets, cfg=cfg, result=result, probe=probe, before=before)


def test_model_and_its_clones_unchanged_after_training(short_run):
    unet, probe = short_run["unet"], short_run["probe"]
    assert torch.equal(_forward(unet, *probe), short_run["before"])
    assert torch.equal(_forward(short_run["clone"], *probe), short_run["before"])
    dm = unet.model.diffusion_model
    assert not hasattr(dm, "peft_config")
    assert all(type(m).__module__.startswith(("comfy", "torch")) for m in dm.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in dm.modules())
    assert not any(p.requires_grad for p in dm.parameters())
    import comfy.model_management

    assert comfy.model_management.in_training is False


def test_lora_file_layout_metadata_and_checkpoints(short_run, concept_data):
    res, cfg = short_run["result"], short_run["cfg"]
    assert res.lora_path.name == "short.safetensors" and res.lora_path.parent.name == "loras"
    assert [p.name for p in res.checkpoints] == ["short_step00010.safetensors", "short_step00020.safetensors"]
    assert not [p for p in res.lora_path.parent.rglob(".*tmp*")]
    with safetensors.safe_open(str(res.lora_path), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    layer = "diffusion_model.double_blocks.0.img_attn.qkv"
    assert {f"{layer}.lora_A.weight", f"{layer}.lora_B.weight", f"{layer}.alpha"} <= keys
    assert len(keys) == 3 * len(short_run["targets"].modules)
    assert meta["rank"] == "4" and float(meta["alpha"]) == 8.0 and meta["steps"] == "30"
    assert meta["trigger"] == TRIGGER and meta["dataset_size"] == str(len(concept_data))
    assert float(meta["learning_rate"]) == cfg.learning_rate
    assert json.loads(meta["targets"]) == short_run["targets"].modules
    with safetensors.safe_open(str(res.checkpoints[0]), "pt") as f:
        assert f.metadata()["steps"] == "10"
    assert len(res.losses) == 30 and all(torch.isfinite(torch.tensor(res.losses)))


def test_stock_lora_loader_applies_every_key_at_calibrated_strength(short_run, comfy, caplog):
    """LoraLoaderModelOnly at 1.0 == the trainer's own peft layers with the same weights; no unmatched key."""
    res, probe, unet = short_run["result"], short_run["probe"], short_run["unet"]
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        loaded = comfy.LoraLoaderModelOnly().load_lora_model_only(unet, res.lora_path.name, 1.0)[0]
        stronger = comfy.LoraLoaderModelOnly().load_lora_model_only(unet, res.lora_path.name, 1.5)[0]
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]
    out_loader = _forward(loaded, *probe)
    assert torch.equal(_forward(unet, *probe), short_run["before"])  # reloading the base unpatches the weights
    dm = unet.model.diffusion_model
    sd = safetensors.torch.load_file(str(res.lora_path))
    cfg = short_run["cfg"]
    with lora_layers(dm, short_run["targets"].modules, cfg.rank, cfg.alpha) as lora, torch.no_grad():
        lora.load_state_dict(sd)
        out_trainer = dm(*probe).clone()
    delta = (out_trainer - short_run["before"]).norm()
    assert delta > 1e-3, "the LoRA must change the output for the comparison to mean anything"
    assert torch.allclose(out_loader, out_trainer, rtol=1e-4, atol=1e-5), (out_loader - out_trainer).abs().max()
    assert (_forward(stronger, *probe) - out_trainer).norm() > 0.2 * delta


def test_cancel_stops_within_one_step_keeps_checkpoints(tiny, concept_data, base_dir):
    import comfy.model_management as mm

    unet = tiny.unet()
    dm = unet.model.diffusion_model
    probe = _probe_inputs(concept_data)
    before = _forward(unet, *probe)
    targets = tg.resolve_targets(["double"], "attention", tg.BlockCounts.of_model(dm))
    cfg = loop.TrainConfig(rank=2, alpha=2, learning_rate=1e-3, steps=50, save_every=3, output_name="cancelled")
    seen = []

    def on_step(step, total, loss):
        seen.append(step)
        if step == 7:
            mm.interrupt_current_processing(True)

    hooks = loop.TrainHooks(on_step=on_step, check_cancel=mm.throw_exception_if_processing_interrupted)
    with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
        loop.train_lora(unet, concept_data, targets, cfg, base_dir / "models" / "loras", hooks)
    assert seen[-1] == 7
    folder = base_dir / "models" / "loras" / "cancelled_checkpoints"
    names = sorted(p.name for p in folder.glob("*.safetensors"))
    assert names == ["cancelled_step00003.safetensors", "cancelled_step00006.safetensors"]
    for p in folder.glob("*.safetensors"):
        assert len(safetensors.torch.load_file(str(p))) == 3 * len(targets.modules)
    assert sorted(p.name for p in folder.glob("*.trainstate")) == [  # the full states beside them (issue 8)
        "cancelled_step00003.trainstate", "cancelled_step00006.trainstate"]
    assert torch.equal(_forward(unet, *probe), before)
    assert not hasattr(dm, "peft_config") and mm.in_training is False


def test_a_non_klein_model_is_refused_with_the_fix(concept_data, base_dir):
    import comfy.model_patcher

    fake = comfy.model_patcher.ModelPatcher(torch.nn.Linear(2, 2), torch.device("cpu"), torch.device("cpu"))
    targets = tg.resolve_targets(["double"], "attention", tg.BlockCounts(1, 2))
    with pytest.raises(ValueError, match="not FLUX.2 \\[klein\\].*UNETLoader"):
        loop.train_lora(fake, concept_data, targets, loop.TrainConfig(4, 4, 1e-4, 5), base_dir / "models" / "loras")


@pytest.mark.parametrize("field,value,match", [("steps", 0, "steps is 0"), ("learning_rate", 0.0, "learning_rate is 0"),
                                               ("rank", 0, "rank 0 is below 1"), ("rank", 4096, "larger than layer")])
def test_bad_settings_are_clear_errors(tiny, concept_data, base_dir, field, value, match):
    unet = tiny.unet()
    dm = unet.model.diffusion_model
    targets = tg.resolve_targets(["double"], "attention", tg.BlockCounts.of_model(dm))
    cfg = loop.TrainConfig(rank=4, alpha=4, learning_rate=1e-4, steps=2, output_name=f"bad_{field}")
    setattr(cfg, field, value)
    with pytest.raises(ValueError, match=match), torch.inference_mode():
        loop.train_lora(unet, concept_data, targets, cfg, base_dir / "models" / "loras")


def test_trains_a_model_loaded_in_inference_mode_and_moved_outside_it(tiny, concept_data, base_dir):
    """ComfyUI's executor loads the model in inference mode and load_models_gpu moves it to the card outside it:
    Module.to() then leaves weights that are not is_inference() yet have no version counter, and every matmul
    with them fails (seen on an H200 through the command line). Here the move is a dtype round trip on the CPU."""
    with torch.inference_mode():
        unet = tiny.unet()
    dm = unet.model.diffusion_model
    dm.to(torch.float64).to(torch.float32)
    weight = dm.img_in.weight
    assert not weight.is_inference()
    with pytest.raises(RuntimeError, match="version counter"):
        weight._version  # noqa: B018 - the state the trainer has to repair
    targets = tg.resolve_targets(["double"], "attention", tg.BlockCounts.of_model(dm))
    cfg = loop.TrainConfig(rank=2, alpha=2, learning_rate=1e-3, steps=2, output_name="moved")
    with torch.inference_mode():
        result = loop.train_lora(unet, concept_data, targets, cfg, base_dir / "models" / "loras")
    assert len(result.losses) == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in result.lora.items())
