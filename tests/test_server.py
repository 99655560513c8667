"""The whole graph through a real ComfyUI server: POST /prompt, websocket progress, /history."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.error
import urllib.request

import pytest
import safetensors
from klein_lora_studio import run as runner
from klein_lora_studio.devtools.server import ComfyServer
from klein_lora_studio.devtools.workflows import OUT, api_path, to_tiny
from klein_lora_studio.tests.conftest import COMFYUI
from klein_lora_studio.tests.helpers import post_prompt, write_concept_dataset

pytestmark = pytest.mark.comfy


FLUX1_FILE = "flux1-tiny.safetensors"  # a model that is not klein (ComfyUI detects FLUX.1 [schnell])


@pytest.fixture(scope="module")
def server(tiny, base_dir):
    import comfy.utils
    from klein_lora_studio.devtools.tiny_models import flux1_state_dict

    write_concept_dataset(base_dir / "input" / "server_ds", n=4, size=64)
    comfy.utils.save_torch_file(flux1_state_dict(), str(base_dir / "models" / "diffusion_models" / FLUX1_FILE))
    with ComfyServer(COMFYUI, base_dir) as url:
        yield url


def _tiny_style(name: str, **kw) -> dict:
    api = json.loads(api_path("klein_style_lora").read_text())
    return to_tiny(api, "server_ds", output_name=name, **kw)


def _run(workflow: dict, url: str) -> tuple[int, str]:
    out = io.StringIO()
    rc = asyncio.run(runner.run(workflow, url, out=out))
    return rc, out.getvalue()


def test_style_workflow_trains_headless_and_the_stock_loader_takes_the_lora(server, base_dir, comfy, caplog):
    rc, text = _run(_tiny_style("server_style", steps=12, save_every=5), server)
    assert rc == 0, text
    assert "train [" in text and "12/12" in text and "loss" in text
    lora = base_dir / "models" / "loras" / "server_style.safetensors"
    assert f"lora_path: {lora}" in text
    folder = base_dir / "models" / "loras" / "server_style_checkpoints"
    ckpts = sorted(p.name for p in folder.glob("*.safetensors"))
    assert ckpts == ["server_style_step00005.safetensors", "server_style_step00010.safetensors",  # and the final
                     "server_style_step00012.safetensors"]  # step's, which a later extension of the run keeps
    assert sorted(p.name for p in folder.glob("*.trainstate")) == [  # the newest 2 full states (issue 8)
        "server_style_step00010.trainstate", "server_style_step00012.trainstate"]
    with safetensors.safe_open(str(lora), "pt") as f:
        assert f.metadata()["recipe"] == "custom" and f.metadata()["steps"] == "12"
    caplog.set_level(logging.WARNING)
    import torch

    unet = comfy.UNETLoader().load_unet("klein-tiny.safetensors", "default")[0]
    with torch.inference_mode():
        comfy.LoraLoaderModelOnly().load_lora_model_only(unet, lora.name, 1.0)
    assert not [r for r in caplog.records if "lora key not loaded" in r.getMessage()]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["character", "object"])
def test_recipe_workflow_trains_headless(server, base_dir, recipe):
    api = json.loads(api_path(f"klein_{recipe}_lora").read_text())
    assert api["6"]["inputs"]["recipe"] == recipe and api["5"]["inputs"]["preset"] == recipe
    rc, text = _run(to_tiny(api, "server_ds", steps=4, save_every=2, output_name=f"server_{recipe}"), server)
    assert rc == 0, text
    assert "4/4" in text and (base_dir / "models" / "loras" / f"server_{recipe}.safetensors").is_file()


@pytest.mark.slow
def test_low_vram_workflow_trains_headless_on_fp8_weights(server, base_dir):
    api = json.loads(api_path("klein_style_lora_low_vram").read_text())
    assert api["1"]["inputs"]["weight_dtype"] == "fp8_e4m3fn" and api["6"]["inputs"]["low_vram"] is True
    rc, text = _run(to_tiny(api, "server_ds", steps=4, save_every=2, output_name="server_low_vram"), server)
    assert rc == 0, text
    with safetensors.safe_open(str(base_dir / "models" / "loras" / "server_low_vram.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["base_weight_dtype"] == "float8_e4m3fn" and meta["optimizer"] == "AdamW8bit"


def test_image_to_image_workflow_trains_on_pairs_headless(server, base_dir):
    from klein_lora_studio.tests.helpers import concept_image

    for sub in ("server_pairs", "server_pairs_control"):
        (base_dir / "input" / sub).mkdir(exist_ok=True)
    for i in range(3):
        img = concept_image(64, i)
        img.save(base_dir / "input" / "server_pairs_control" / f"{i:03d}.png")
        img.transpose(0).save(base_dir / "input" / "server_pairs" / f"{i:03d}.png")  # the edit: a mirror image
        (base_dir / "input" / "server_pairs" / f"{i:03d}.txt").write_text("mirrored")
    api = json.loads(api_path("klein_image_to_image_lora").read_text())
    assert api["4"]["inputs"]["control_folder"] == "pimpmyride_control" and api["6"]["inputs"]["recipe"] == "image-to-image"
    wf = to_tiny(api, "server_pairs", steps=4, save_every=2, output_name="server_i2i", control_folder="server_pairs_control")
    rc, text = _run(wf, server)
    assert rc == 0, text
    with safetensors.safe_open(str(base_dir / "models" / "loras" / "server_i2i.safetensors"), "pt") as f:
        assert f.metadata()["task_kind"] == "image-to-image"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["klein_style_evaluate", "klein_rank_steps_grid"])
def test_evaluation_workflows_run_headless(server, base_dir, name):
    wf = to_tiny(json.loads(api_path(name).read_text()), "server_ds", steps=4, save_every=2, output_name=f"srv_{name}")
    rc, text = _run(wf, server)
    assert rc == 0, text
    assert ".png" in text  # the grid image is among the outputs


def test_missing_dataset_folder_fails_at_queue_time(server):
    wf = _tiny_style("nofolder")
    wf["4"]["inputs"]["folder"] = "does_not_exist"
    rc, text = _run(wf, server)
    assert rc == 1 and "does_not_exist" in text and "does not exist" in text and "running node" not in text


def test_invalid_graph_exits_1_with_comfyuis_error(server):
    wf = _tiny_style("never")
    wf["6"]["inputs"]["dataset"] = ["1", 0]  # a MODEL into the dataset socket
    rc, text = _run(wf, server)
    assert rc == 1 and "KleinLoRATrainer" in text


def test_bad_output_name_fails_at_queue_time_with_the_fix(server):
    rc, text = _run(_tiny_style("../escape"), server)
    assert rc == 1 and "not a plain file name" in text and "running node" not in text




def _details(answer: dict, node: str) -> str:
    return "\n".join(e.get("details", "") for e in answer["node_errors"][node]["errors"])


def test_a_model_that_is_not_klein_is_refused_at_queue_time_on_the_trainer_and_selector(server):
    wf = _tiny_style("never_flux1")
    wf["1"]["inputs"]["unet_name"] = FLUX1_FILE
    status, answer = post_prompt(wf, server)
    assert status == 400 and set(answer["node_errors"]) == {"5", "6"}, answer  # selector and trainer, nothing else
    for node in ("5", "6"):
        text = _details(answer, node)
        assert f"'{FLUX1_FILE}' (node 1, Load Diffusion Model)" in text and "FLUX.1 [schnell]" in text
        assert "not FLUX.2 [klein]" in text and "flux-2-klein-base-4b.safetensors" in text


def test_a_rank_wider_than_the_targeted_layers_is_refused_at_queue_time(server):
    wf = _tiny_style("never_rank")
    wf["6"]["inputs"]["recipe.rank"] = 300  # the tiny model's layers are 256 wide
    status, answer = post_prompt(wf, server)
    assert status == 400 and set(answer["node_errors"]) == {"6"}, answer
    text = _details(answer, "6")
    assert "rank 300 is larger than layer double_blocks.0.img_attn.qkv allows (256" in text
    assert "lower the rank to at most 256" in text and "'klein-tiny.safetensors'" in text


def test_a_valid_klein_prompt_passes_the_queue_time_check(server, base_dir):
    wf = _tiny_style("queue_ok", steps=2, save_every=0)  # 2: the core loss graph divides by steps - 1
    wf["6"]["inputs"]["recipe.rank"] = 256  # exactly the layer width: allowed
    rc, text = _run(wf, server)
    assert rc == 0, text
    assert (base_dir / "models" / "loras" / "queue_ok.safetensors").is_file()


def test_an_untraceable_model_is_left_to_the_run_time_check(server):
    """A node between the loader and the trainer that the check does not know: queued, then the run refuses."""
    wf = _tiny_style("fails")
    wf["9"] = {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 1.73}}
    wf["6"]["inputs"]["model"] = ["9", 0]
    wf["6"]["inputs"]["recipe.rank"] = 300
    rc, text = _run(wf, server)
    assert rc == 2 and "rank 300 is larger than layer" in text and "lower the rank" in text


def test_set_overrides_inputs_by_id_and_class():
    wf = _tiny_style("x")
    runner.apply_overrides(wf, ["6.steps=7", "KleinDatasetLoader.trigger=abc"])
    assert wf["6"]["inputs"]["steps"] == 7 and wf["4"]["inputs"]["trigger"] == "abc"


def test_ui_workflow_matches_the_servers_node_definitions(server):
    with urllib.request.urlopen(server + "/object_info") as r:
        info = json.load(r)
    for path in sorted(p for p in OUT.glob("*.json") if not p.name.endswith("_api.json")):
        _check_ui_workflow(json.loads(path.read_text()), info)


def _is_widget_spec(s) -> bool:
    return ((isinstance(s[0], list) or s[0] in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"))
            and not (len(s) > 1 and s[1].get("forceInput")))


def _check_ui_workflow(ui: dict, info: dict) -> None:
    for node in ui["nodes"]:
        assert node["type"] in info, f"{node['type']} is not registered"
        spec, values, count = info[node["type"]]["input"], node["widgets_values"], 0
        for name, s in [(n, s) for g in ("required", "optional") for n, s in spec.get(g, {}).items()]:
            if s[0] == "COMFY_DYNAMICCOMBO_V3":  # the combo, then the widgets of the option it shows
                option = next(o for o in s[1]["options"] if o["key"] == values[count])
                count += 1 + sum(_is_widget_spec(x) for g in ("required", "optional")
                                 for x in option["inputs"].get(g, {}).values())
            elif _is_widget_spec(s):
                count += 2 if name in ("seed", "noise_seed") else 1  # + the frontend's "control after generate"
        assert len(values) == count, node["type"]
    for link in ui["links"]:
        src = next(n for n in ui["nodes"] if n["id"] == link[1])
        assert info[src["type"]]["output"][link[2]] == link[5]


def test_example_workflows_show_in_the_template_browser_with_thumbnails(server):
    with urllib.request.urlopen(server + "/api/workflow_templates") as r:
        listed = json.load(r)
    ui = sorted(p.stem for p in OUT.glob("*.json") if not p.name.endswith("_api.json"))
    assert set(ui) <= set(listed.get("klein_lora_studio", [])), listed
    assert {"klein_style_lora", "klein_character_lora", "klein_object_lora"} <= set(ui)
    for stem in listed["klein_lora_studio"]:  # the frontend asks for <stem>.jpg beside each listed workflow
        with urllib.request.urlopen(f"{server}/api/workflow_templates/klein_lora_studio/{stem}.jpg") as r:
            assert r.status == 200 and r.read(3) == b"\xff\xd8\xff", stem


def test_history_route_serves_the_recorded_events(server, base_dir):
    """A 3-step run's events come back from the route, for its node, in order, each step once."""
    rc, text = _run(_tiny_style("server_history", steps=3, save_every=2), server)
    assert rc == 0, text

    def history(query: str = "") -> list[dict]:
        with urllib.request.urlopen(server + "/klein_lora/history" + query) as r:
            return json.load(r)["events"]

    events = history("?node=6")  # the trainer's id in the style workflow
    progress = [e["data"] for e in events if e["event"] == "klein_lora.progress"]
    assert [(p["step"], p["total"]) for p in progress] == [(1, 3), (2, 3), (3, 3)], events
    assert all(isinstance(p["loss"], float) and p["loss"] > 0 for p in progress), progress
    checkpoints = [e["data"] for e in events if e["event"] == "klein_lora.checkpoint"]
    assert checkpoints and checkpoints[0]["step"] == 2, events
    assert checkpoints[0]["path"].endswith("server_history_step00002.safetensors"), checkpoints
    assert [e["t"] for e in events] == sorted(e["t"] for e in events)
    assert all(e in history() for e in events)  # the unfiltered history has them too
    assert history("?node=no-such-node") == []


@pytest.mark.slow
def test_merge_strength_sweep_workflow_runs_headless(server, base_dir):
    import safetensors.torch as st
    from klein_lora_studio.tests import lora_kit

    folder = base_dir / "models" / "loras"
    folder.mkdir(parents=True, exist_ok=True)
    for name, seed in (("klein_style", 21), ("klein_character", 22)):  # the names the workflow ships with
        st.save_file(lora_kit.bfl_sd(lora_kit.random_lora(seed), alpha=4.0), str(folder / f"{name}.safetensors"))
    wf = to_tiny(json.loads(api_path("klein_merge_strength_sweep").read_text()), "server_ds")
    wf["4"]["inputs"]["strengths"] = "0.5, 1.0"
    rc, text = _run(wf, server)
    assert rc == 0, text
    assert (folder / "klein_style_character.safetensors").is_file() and ".png" in text
