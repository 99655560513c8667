"""The queue-time model check: header facts, tracing a MODEL to its file, the findings, and their way into
ComfyUI's validation (the HTTP path is in test_server.py)."""
from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import safetensors.torch
import torch
from klein_lora_studio.devtools import tiny_models
from klein_lora_studio.devtools.workflows import api_path, to_tiny
from klein_lora_studio.tests.helpers import write_concept_dataset
from klein_lora_studio.trainer.model import model_check
from klein_lora_studio.trainer.model.model_check import ModelFacts

pytestmark = pytest.mark.comfy
FLUX1 = "qc-flux1.safetensors"


@pytest.fixture(scope="module")
def files(tiny, base_dir):
    """The tiny klein (in the tests' models folder), a tiny FLUX.1, the klein as a checkpoint, a broken file."""
    import comfy.utils

    write_concept_dataset(base_dir / "input" / "qc_ds", n=1, size=64)
    models = base_dir / "models"
    for sub in ("diffusion_models", "checkpoints", "loras"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    comfy.utils.save_torch_file(tiny_models.flux1_state_dict(), str(models / "diffusion_models" / FLUX1))
    klein = safetensors.torch.load_file(str(tiny.files["unet"]))
    comfy.utils.save_torch_file({"model.diffusion_model." + k: v for k, v in klein.items()},
                                str(models / "checkpoints" / "qc-klein-ckpt.safetensors"))
    (models / "diffusion_models" / "qc-broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(models / "loras" / "qc-any.safetensors"))
    return models


def _workflow(**trainer) -> dict:
    wf = to_tiny(json.loads(api_path("klein_style_lora").read_text()), "qc_ds")
    if "rank" in trainer:  # the recipe DynamicCombo's 'custom' value (kept whatever recipe is chosen)
        trainer["recipe.rank"] = trainer.pop("rank")
    wf["6"]["inputs"].update(trainer)
    return wf


def _findings(wf: dict) -> dict[str, str]:
    from klein_lora_studio.nodes import queue_check

    return queue_check.findings(wf)


def test_the_header_names_the_tiny_klein_and_its_layer_widths(files):
    facts = model_check.file_facts(str(files / "diffusion_models" / tiny_models.UNET_FILE))
    assert (facts.arch, facts.double, facts.single, facts.hidden) == ("Flux2", 1, 2, 256)
    assert facts.widths["double_blocks.0.img_attn.qkv"] == 256 and facts.widths["single_blocks.1.linear2"] == 256
    assert "single_blocks.0.linear1" in facts.linears and not any("norm" in n for n in facts.linears)
    assert model_check.model_problem(facts, "klein-tiny.safetensors", "node 1") is None


def test_a_flux1_file_is_named_and_refused_with_the_fix(files):
    facts = model_check.file_facts(str(files / "diffusion_models" / FLUX1))
    assert facts.arch == "FluxSchnell" and not facts.is_flux2
    msg = model_check.model_problem(facts, FLUX1, "node 1, Load Diffusion Model")
    assert msg.startswith(f"the MODEL comes from '{FLUX1}' (node 1, Load Diffusion Model), which is FLUX.1 [schnell]")
    assert "not FLUX.2 [klein]" in msg and "flux-2-klein-base-4b.safetensors" in msg and "UNETLoader" in msg


@pytest.mark.parametrize("dims,name,refused", [((5, 20, 3072), "FLUX.2 [klein] 4B", False),
                                               ((8, 24, 4096), "FLUX.2 [klein] 9B", False),
                                               ((8, 48, 6144), "FLUX.2 [dev] (32B)", True)])
def test_flux2_sizes(dims, name, refused):
    facts = ModelFacts("Flux2", *dims)
    assert facts.describe().startswith(name)
    msg = model_check.model_problem(facts, "f.safetensors", "node 1")
    assert (msg is not None) == refused
    if refused:
        assert "not FLUX.2 [klein]" in msg and "klein Base 4B or 9B" in msg


def test_headers_are_read_once_per_file_version(files, monkeypatch):
    import os

    path = files / "diffusion_models" / FLUX1
    calls = []
    real = model_check.header_shapes
    monkeypatch.setattr(model_check, "header_shapes", lambda p: calls.append(p) or real(p))
    model_check._cached_facts.cache_clear()
    model_check.file_facts(str(path))
    model_check.file_facts(str(path))
    assert len(calls) == 1
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a replaced file is read again
    model_check.file_facts(str(path))
    assert len(calls) == 2


def test_packed_weights_give_no_width_rather_than_a_wrong_one(files):
    shapes = model_check.header_shapes(str(files / "diffusion_models" / tiny_models.UNET_FILE))
    shapes["double_blocks.0.img_attn.qkv.weight"] = ((768, 128), "U8")  # nvfp4-style: two values per byte
    facts = model_check.facts_from_shapes(shapes)
    assert "double_blocks.0.img_attn.qkv" in facts.linears and "double_blocks.0.img_attn.qkv" not in facts.widths
    assert _findings(_workflow(rank=300)) and not _rank_with(facts, 300)


def _rank_with(facts: ModelFacts, rank: int, recipe: str = "custom") -> str | None:
    from klein_lora_studio.nodes import queue_check

    wf = _workflow(rank=rank, recipe=recipe)
    return queue_check._rank_problem(wf, wf["6"]["inputs"], queue_check.ModelSource("1", "Load Diffusion Model", "m", facts))


def test_the_valid_tiny_workflow_has_no_findings(files):
    assert _findings(_workflow()) == {}
    assert _findings(_workflow(rank=256)) == {}  # the width itself is allowed


def test_a_lokr_rank_is_not_held_to_the_layer_widths(files):
    """LoKr's rank sizes the product factor of a Kronecker pair, not the layer (issue 20): no width finding for it;
    DoRA and LoHa are low-rank like LoRA and keep the check."""
    assert _findings(_workflow(rank=300, adapter="lokr")) == {}
    for adapter in ("dora", "loha"):
        assert "rank 300 is larger than layer" in _findings(_workflow(rank=300, adapter=adapter))["6"]


def test_a_recipe_rank_names_the_recipe(files):
    facts = model_check.file_facts(str(files / "diffusion_models" / tiny_models.UNET_FILE))
    narrow = ModelFacts("Flux2", facts.double, facts.single, facts.hidden, facts.linears,
                        {k: 24 for k in facts.widths})
    assert _rank_with(narrow, 300, "style") is None  # style's rank 16 fits 24, whatever the widget says
    msg = _rank_with(narrow, 8, "character")
    assert "rank 32 is larger than layer" in msg and "recipe 'character' sets rank 32" in msg and "at most 24" in msg


def test_the_model_is_traced_through_lora_loaders_and_from_checkpoints(files):
    wf = _workflow()
    wf["1"]["inputs"]["unet_name"] = FLUX1
    wf["9"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": "qc-any.safetensors",
                                                               "strength_model": 1.0}}
    wf["6"]["inputs"]["model"] = ["9", 0]
    found = _findings(wf)
    assert set(found) == {"5", "6"} and FLUX1 in found["6"]
    wf["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "qc-klein-ckpt.safetensors"}}
    assert _findings(wf) == {}
    wf["6"]["inputs"]["recipe.rank"] = 300
    assert "rank 300" in _findings(wf)["6"] and "'qc-klein-ckpt.safetensors'" in _findings(wf)["6"]


def _between(wf: dict) -> None:
    wf["9"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 1.0}}
    wf["6"]["inputs"]["model"] = ["9", 0]


# (case, the loader's file, the change): none of these may give the trainer a finding
UNTRACEABLE = [
    ("an unknown node in between", FLUX1, _between),
    ("a file name from a link", FLUX1, lambda wf: wf["1"]["inputs"].update(unet_name=["8", 0])),
    ("a file that is not there", "missing.safetensors", lambda wf: None),
    ("an unreadable file", "qc-broken.safetensors", lambda wf: None),
    ("a link to no node", FLUX1, lambda wf: wf["6"]["inputs"].update(model=["404", 0])),
    ("a rank from a link", tiny_models.UNET_FILE, lambda wf: wf["6"]["inputs"].update({"recipe.rank": ["8", 0]})),
    ("targets not from the selector", tiny_models.UNET_FILE, lambda wf: wf["6"]["inputs"].update(targets=["4", 0])),
]


@pytest.mark.parametrize("case,unet,change", UNTRACEABLE, ids=[c[0] for c in UNTRACEABLE])
def test_what_cannot_be_known_at_queue_time_is_left_to_the_run(files, case, unet, change):
    wf = _workflow(rank=300)
    wf["1"]["inputs"]["unet_name"] = unet
    change(wf)
    assert "6" not in _findings(wf)


def _validate(wf: dict, with_handler: bool):
    """ComfyUI's own validate_prompt, after the on_prompt handler as POST /prompt runs them (same task)."""
    import importlib

    import execution

    import nodes

    # the copy of the pack ComfyUI loaded (under its own module name), whose node classes validate_prompt calls
    trainer = nodes.NODE_CLASS_MAPPINGS["KleinLoRATrainer"]
    queue_check = importlib.import_module(trainer.__module__.rsplit(".", 1)[0] + ".queue_check")

    async def go():
        if with_handler:
            assert queue_check.on_prompt({"prompt": wf}) == {"prompt": wf}  # passed on untouched
        return await execution.validate_prompt(str(uuid.uuid4()), wf, None)

    return asyncio.run(go())


def test_findings_become_validation_errors_on_the_right_node_and_only_for_that_request(files):
    wf = _workflow(rank=300)
    valid, _, _, errors = _validate(json.loads(json.dumps(wf)), with_handler=True)
    assert not valid and set(errors) == {"6"}
    details = [e["details"] for e in errors["6"]["errors"]]
    assert any(d.startswith("model - rank 300 is larger than layer") for d in details)
    valid, _, _, errors = _validate(json.loads(json.dumps(wf)), with_handler=False)  # another request: no leftovers
    assert "6" not in errors


def test_a_new_prompt_replaces_the_last_ones_findings(files):
    from klein_lora_studio.nodes import queue_check
    from klein_lora_studio.nodes.lora_trainer import KleinLoRATrainer

    class Clone:
        hidden = type("H", (), {"unique_id": "6"})()

    async def go():
        queue_check.on_prompt({"prompt": _workflow(rank=300)})
        first = queue_check.problem(Clone)
        queue_check.on_prompt({"prompt": _workflow(rank=4)})
        second = queue_check.problem(Clone)
        queue_check.on_prompt({"prompt": "not a prompt"})  # malformed: nothing, and no exception
        return first, second, queue_check.problem(Clone)

    first, second, third = asyncio.run(go())
    assert "rank 300" in first and second is None and third is None
    assert KleinLoRATrainer.validate_inputs(output_name="fine") is True  # library use: no hidden id, no finding
