"""LoKr, LoHa and DoRA (issue 20): trained through peft, applied by ComfyUI's stock loader as trained.

Every adapter is trained on the tiny klein model, then held to what plain LoRA is held to in
tests/test_training.py: its file loads through `comfy.sd.load_lora_for_models` with no unmatched key, and at
strength 1.0 the loaded model computes what the trainer's own (live peft) layers computed. Then: resume bit for
bit, bake exact, and the refusals that name the adapter.
"""
from __future__ import annotations

import json
import logging

import pytest
import safetensors
import safetensors.torch
import torch
from klein_lora_studio.tests import lora_kit
from klein_lora_studio.trainer.lora import formats, merge
from klein_lora_studio.trainer.model import targets as tg
from klein_lora_studio.trainer.training import loop

pytestmark = pytest.mark.comfy
torch.set_num_threads(1)

# id -> TrainConfig fields: every adapter, and LoKr with both Kronecker factors full (its scale folded into w1)
ADAPTERS = {"lokr": dict(adapter="lokr"), "lokr_full": dict(adapter="lokr", lokr_full_rank=True),
            "lokr_factor4": dict(adapter="lokr", lokr_factor=4),
            # rank 16 >= half of the 256-wide layers' factor (16): peft keeps w2 full there, scale 4/16 into w1
            "lokr_wide": dict(adapter="lokr", rank=16, alpha=4.0), "loha": dict(adapter="loha"),
            "dora": dict(adapter="dora")}
# the parts ComfyUI's weight_adapter reads for each (comfy/weight_adapter/lokr.py, loha.py, lora.py + dora_scale)
_LOKR, _LOKR_FULL = {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "alpha"}, {"lokr_w1", "lokr_w2"}
PARTS = {"lokr": [_LOKR], "lokr_full": [_LOKR_FULL], "lokr_factor4": [_LOKR], "lokr_wide": [_LOKR, _LOKR_FULL],
         "loha": [{"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "alpha"}],
         "dora": [{"lora_A.weight", "lora_B.weight", "alpha", "dora_scale"}]}


@pytest.fixture(scope="module")
def setup(encoded, base_dir):
    """Three 64 px concept images; attention and MLP layers of every group (linear1/linear2 included)."""
    enc = encoded("adapters", groups=tg.GROUPS, layers="attention_mlp", all_linears=True)
    g = torch.Generator().manual_seed(1)
    probe = (torch.randn((1, *enc.data.latents[0].shape), generator=g), torch.tensor([0.6]), enc.data.contexts[0][None])
    return dict(enc=enc, probe=probe, out=base_dir / "models" / "loras", before=lora_kit.forward(enc.unet, probe))


def _cfg(name: str, steps: int = 6, **kw) -> loop.TrainConfig:
    base = dict(rank=4, alpha=8, learning_rate=5e-3, steps=steps, output_name=name, save_dtype="fp32", seed=2)
    return loop.TrainConfig(**{**base, **kw})


def _train(s, cfg, hooks=None):
    enc = s["enc"]
    with torch.inference_mode():
        return loop.train_lora(enc.unet, enc.data, enc.targets, cfg, s["out"], hooks)


@pytest.fixture(scope="module", params=list(ADAPTERS))
def run(request, setup):
    """One short run per adapter; the live model's output on the probe at the final step (the trainer's own)."""
    seen = {}

    def on_checkpoint(step, path, live):
        seen["live"] = live.model.diffusion_model(*setup["probe"]).clone()

    result = _train(setup, _cfg(f"ad_{request.param}", **ADAPTERS[request.param]),
                    loop.TrainHooks(on_checkpoint=on_checkpoint))
    return dict(id=request.param, result=result, live=seen["live"])


def test_stock_loader_applies_every_key_and_reproduces_the_trainer(run, setup, comfy, caplog):
    """load_lora_for_models at 1.0 == the trainer's live peft layers; no unmatched key; strength 1.5 differs."""
    res, unet = run["result"], setup["enc"].unet
    sd = safetensors.torch.load_file(str(res.lora_path))
    modules = setup["enc"].targets.modules
    by_layer = {m: {k.removeprefix(f"diffusion_model.{m}.") for k in sd if k.startswith(f"diffusion_model.{m}.")}
                for m in modules}
    kinds = {frozenset(p) for p in by_layer.values()}
    assert kinds == {frozenset(p) for p in PARTS[run["id"]]}, kinds  # lokr_wide: both forms present
    assert sum(len(p) for p in by_layer.values()) == len(sd)  # nothing but the targeted layers' parts
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        loaded = lora_kit.apply(unet, sd, 1.0)
        stronger = lora_kit.apply(unet, sd, 1.5)
    assert not lora_kit.not_loaded(caplog)
    out_loader = lora_kit.forward(loaded, setup["probe"])
    delta = (run["live"] - setup["before"]).norm()
    assert delta > 1e-3, f"the {run['id']} run must change the output for the comparison to mean anything ({delta})"
    assert torch.allclose(out_loader, run["live"], rtol=1e-4, atol=1e-5), (out_loader - run["live"]).abs().max()
    assert (lora_kit.forward(stronger, setup["probe"]) - run["live"]).norm() > 0.2 * delta
    assert torch.equal(lora_kit.forward(unet, setup["probe"]), setup["before"])  # the base is left as it was


def test_header_records_the_adapter(run):
    meta = safetensors.safe_open(str(run["result"].lora_path), "pt").metadata()
    cfg = ADAPTERS[run["id"]]
    assert meta["adapter"] == cfg["adapter"] and meta["format"] == f"comfyui-bfl-{cfg['adapter']}"
    if cfg["adapter"] == "lokr":
        assert json.loads(meta["lokr_full_rank"]) == cfg.get("lokr_full_rank", False)
        assert json.loads(meta["lokr_factor"]) == cfg.get("lokr_factor", -1)


def test_bake_is_exact_for_the_adapter(run, setup, comfy, tiny):
    """The baked model file, loaded by UNETLoader, computes what the stock LoRA loader's patched model does."""
    import folder_paths
    from klein_lora_studio.devtools import tiny_models

    lo = formats.load_lora_file(run["result"].lora_path)
    assert lo.adapter == ADAPTERS[run["id"]]["adapter"]
    src = folder_paths.get_full_path("diffusion_models", tiny_models.UNET_FILE)
    name = f"baked_{run['id']}.safetensors"
    merge.bake_file(src, [lo], [1.0], folder_paths.get_folder_paths("diffusion_models")[0] + "/" + name)
    baked = comfy.UNETLoader().load_unet(name, "default")[0]
    with torch.inference_mode():
        loaded = lora_kit.apply(setup["enc"].unet, safetensors.torch.load_file(str(run["result"].lora_path)))
    want = lora_kit.forward(loaded, setup["probe"])
    got = lora_kit.forward(baked, setup["probe"])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5), (got - want).abs().max()


def test_merge_resize_and_diffusers_refuse_naming_the_adapter_convert_keeps_it(run, tmp_path):
    lo = formats.load_lora_file(run["result"].lora_path)
    label = formats.ADAPTER_NAMES[lo.adapter]
    for call in (lambda: merge.exact_merge([lo, lo], [1.0, 1.0]), lambda: merge.resize(lo, 2),
                 lambda: formats.save_lora(lo, tmp_path / "d.safetensors", "diffusers")):
        with pytest.raises(ValueError, match=rf"is a {label} \({lo.adapter}\), not a plain LoRA.*Bake"):
            call()
    path = formats.save_lora(lo, tmp_path / "c.safetensors", "comfyui")  # ComfyUI layout: the same file again
    written, original = (safetensors.torch.load_file(str(p)) for p in (path, run["result"].lora_path))
    assert written.keys() == original.keys() and all(torch.equal(written[k], original[k]) for k in written)


@pytest.mark.parametrize("adapter", ["lokr", "loha", "dora"])
def test_resume_is_bit_identical(setup, adapter):
    """8 steps straight == 4 steps, cancelled, resumed from its step-4 state to 8."""
    import comfy.model_management as mm

    straight = _train(setup, _cfg(f"rs_{adapter}", 8, save_every=4, adapter=adapter))
    calls = {"n": 0}

    def cancel():
        calls["n"] += 1
        if calls["n"] == 6:
            raise mm.InterruptProcessingException()

    with pytest.raises(mm.InterruptProcessingException):
        _train(setup, _cfg(f"rsplit_{adapter}", 8, save_every=4, adapter=adapter), loop.TrainHooks(check_cancel=cancel))
    resumed = _train(setup, _cfg(f"rsplit_{adapter}", 8, save_every=4, adapter=adapter, resume_from="latest"))
    assert resumed.losses == straight.losses
    a, b = (safetensors.torch.load_file(str(p)) for p in (straight.lora_path, resumed.lora_path))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_another_adapter_is_refused(setup):
    _train(setup, _cfg("switch", 4, save_every=2, adapter="loha"))
    with pytest.raises(ValueError, match="trained with adapter loha, this run asks for adapter lokr"):
        _train(setup, _cfg("switch", 6, save_every=2, adapter="lokr", resume_from="latest"))


def test_dora_on_an_fp8_base_and_fp8_products_with_lokr_are_refused(setup, comfy, tiny):
    from klein_lora_studio.devtools import tiny_models

    fp8 = comfy.UNETLoader().load_unet(tiny_models.UNET_FILE, "fp8_e4m3fn")[0]
    enc = setup["enc"]
    with torch.inference_mode(), pytest.raises(ValueError, match="adapter 'dora' needs the base in bf16/fp16/fp32"):
        loop.train_lora(fp8, enc.data, enc.targets, _cfg("dora8", 2, adapter="dora"), setup["out"])
    with pytest.raises(ValueError, match="base_compute 'fp8' does not combine with adapter 'lokr'.*LoKr"):
        _train(setup, _cfg("lokr8", 2, adapter="lokr", base_compute="fp8"))


def test_lokr_and_loha_train_on_an_fp8_base(setup, comfy, tiny):
    """The low-VRAM path (base stored fp8): LoKr and LoHa train and the stock loader applies them."""
    from klein_lora_studio.devtools import tiny_models

    fp8 = comfy.UNETLoader().load_unet(tiny_models.UNET_FILE, "fp8_e4m3fn")[0]
    enc = setup["enc"]
    for adapter in ("lokr", "loha"):
        with torch.inference_mode():
            res = loop.train_lora(fp8, enc.data, enc.targets, _cfg(f"{adapter}8", 3, adapter=adapter, low_vram=True,
                                                                   optimizer="Adafactor"), setup["out"])
        assert all(torch.isfinite(torch.tensor(res.losses)))
        assert next(iter(fp8.model.diffusion_model.parameters())).dtype == torch.float8_e4m3fn


def test_run_config_and_node_carry_the_adapter_and_refuse_unknown_ones(comfy):
    from klein_lora_studio.nodes.lora_trainer import KleinLoRATrainer, adapter_settings
    from klein_lora_studio.trainer.jobs import config as run_config

    base = {"version": 1, "model": {"file": "m.safetensors"}, "dataset": {"encoded": "x.safetensors"},
            "train": {"rank": 4, "alpha": 4, "learning_rate": 1e-4, "steps": 10}}
    assert run_config.from_dict(base).train.adapter == "lora"  # absent: plain LoRA, as before
    lokr = run_config.from_dict({**base, "train": {**base["train"], "adapter": "lokr", "lokr_factor": 8}}).train
    assert (lokr.adapter, lokr.lokr_factor, lokr.lokr_full_rank) == ("lokr", 8, False)
    for change, match in (({"adapter": "oft"}, r"train: adapter 'oft' is not one of \['lora', 'lokr', 'loha', 'dora'\]"),
                          ({"lokr_factor": 0}, "train: lokr_factor is 0: use -1 \\(automatic\\) or a factor of 1")):
        with pytest.raises(run_config.ConfigError, match=match):
            run_config.from_dict({**base, "train": {**base["train"], **change}})
    assert adapter_settings(None) == {}
    assert adapter_settings({"adapter": "lokr", "lokr_factor": 4, "lokr_full_rank": True}) == \
        {"adapter": "lokr", "lokr_factor": 4, "lokr_full_rank": True}
    schema = KleinLoRATrainer.define_schema()
    combo = next(i for i in schema.inputs if i.id == "adapter")
    assert combo.optional and combo.extra_dict == {"advanced": True}
    assert [o.key for o in combo.options] == ["lora", "lokr", "loha", "dora"]
    assert [i.id for i in next(o for o in combo.options if o.key == "lokr").inputs] == ["lokr_factor", "lokr_full_rank"]
    assert all(f"{name}:" in combo.tooltip.replace("LoRA (default):", "LoRA:") for name in ("LoRA", "LoKr", "LoHa", "DoRA"))


def test_trainer_node_trains_the_chosen_adapter_and_samples_its_checkpoints(setup, comfy, tiny, base_dir):
    """The node's DynamicCombo value reaches the run: a DoRA file with its header, the MODEL output patched, and
    the live suite sampled and judged at each checkpoint (the stock loader applies each checkpoint file)."""
    from klein_lora_studio.tests.helpers import run_trainer

    out = run_trainer(setup["enc"], steps=2, save_every=2, output_name="node_dora", adapter={"adapter": "dora"},
                      clip=tiny.clip, vae=tiny.vae, sample_steps=1)
    model, lora, lora_path, _, checkpoints, evaluation = out.args
    assert sum(k.endswith(".dora_scale") for k in lora) == len(setup["enc"].targets.modules)
    assert safetensors.safe_open(lora_path, "pt").metadata()["adapter"] == "dora"
    assert not torch.equal(lora_kit.forward(model, setup["probe"]), setup["before"])
    report = json.loads((base_dir / "models" / "loras" / "node_dora_eval.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [2] and "strength" in evaluation
    assert checkpoints.splitlines()[-1] == lora_path


def test_adapter_refusals_name_the_adapter_and_the_setting_to_change():
    """What tests/test_distributed.py checks through two processes (slow), here on the loop's own checks."""
    cfg = _cfg("x", adapter="dora")
    with pytest.raises(ValueError, match="adapter 'dora' does not combine with a base sharded.*shard_base to 'off'"):
        loop._check_adapter(cfg, True, torch.float32)
    loop._check_adapter(cfg, False, torch.bfloat16)  # unsharded bf16: fine
    for adapter in ("lokr", "loha"):
        loop._check_adapter(_cfg("x", adapter=adapter), True, torch.float8_e4m3fn)  # they train sharded and on fp8
    assert loop._base_compute("auto", torch.device("cpu"), False, "loha") == "bf16"
