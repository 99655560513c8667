"""The micro-world demo and sandbox: Klein Micro World's files and outputs, the sandbox workflow on disk, and
(slow) the demo's graph run end to end in a real ComfyUI with its before/after grid read back by the reader."""
from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

import pytest
from klein_lora_studio.devtools import workflows as wf
from klein_lora_studio.microworld import models, reader, showcase, world

pytestmark = pytest.mark.comfy


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def test_micro_world_node_gives_the_micro_models_and_a_world_dataset(comfy, base_dir):
    import torch
    from klein_lora_studio.nodes.micro_world import KleinMicroWorld, dataset_name
    from klein_lora_studio.trainer.evaluation import sampling

    vae_approx = _files(base_dir / "models" / "vae_approx")
    model, clip, vae, folder, control, trigger = KleinMicroWorld.execute(concept="style", images=6, dataset_seed=3).result
    assert (folder, control, trigger) == (dataset_name("style", 6, 3), "", "qzv")
    images = sorted((base_dir / "input" / folder).glob("*.png"))
    captions = [p.with_suffix(".txt").read_text() for p in images]
    assert len(images) == 6 and all(c.endswith(", in qzv style") for c in captions), captions
    assert _files(base_dir / "models" / "vae_approx") == vae_approx  # nothing written where a real taef2 lives
    unet = base_dir / "models" / "diffusion_models" / models.UNET_FILE
    assert models.file_sha256(unet) == models.read_manifest()["files"][models.UNET_FILE]["sha256"]
    dm = model.model.diffusion_model
    assert (type(model.model).__name__, len(dm.double_blocks), len(dm.single_blocks)) == ("Flux2", 5, 20)
    assert clip.encode_from_tokens(clip.tokenize(captions[0])).shape[-1] == 3 * 64  # klein's 3 stacked layers
    scene = world.concept_scenes("style", 3, 1)[0]
    with torch.inference_mode():
        latent = vae.encode(sampling.to_image_tensor(world.render(scene)))
        back = sampling.to_pil(vae.decode(latent)[0, ..., :3].clamp(0, 1))
    assert tuple(latent.shape) == (1, 128, 8, 8)  # taef2: FLUX.2's 128 channels at 16x
    got = reader.read(back)
    assert (got.colour, got.background) == (scene.colour, scene.background), got  # the world's VAE, not a random one


def test_micro_world_keeps_an_edited_dataset_and_never_replaces_another_model(comfy, base_dir, tmp_path):
    from klein_lora_studio.nodes.micro_world import install_unet, write_world_dataset

    name, control = write_world_dataset(base_dir / "input", "transform", 4, 5)
    assert control == name + "_control" and len(list((base_dir / "input" / control).glob("*.png"))) == 4
    caption = base_dir / "input" / name / "000.txt"
    caption.write_text("my own caption", encoding="utf-8")
    assert write_world_dataset(base_dir / "input", "transform", 4, 5) == (name, control)
    assert caption.read_text() == "my own caption"  # reused as it is, so a user's edits stay
    other = tmp_path / models.UNET_FILE
    other.write_bytes(b"a different model")
    with pytest.raises(FileExistsError, match="never overwritten"):
        install_unet(tmp_path)
    assert other.read_bytes() == b"a different model"


def test_sandbox_workflow_is_up_to_date_and_feeds_the_loader_from_the_micro_world(comfy):
    from klein_lora_studio import nodes as pack_nodes
    from klein_lora_studio.nodes.dataset_loader import KleinDatasetLoader
    from klein_lora_studio.nodes.micro_world import dataset_name

    mappings = dict(comfy.NODE_CLASS_MAPPINGS)
    for cls in asyncio.run(asyncio.run(pack_nodes.comfy_entrypoint()).get_node_list()):
        mappings[cls.GET_SCHEMA().node_id] = cls
    for name, (_, ui, api) in wf.sandbox_workflows(mappings).items():
        assert json.loads((wf.OUT / f"{name}.json").read_text()) == ui, f"run devtools.workflows: {name} is stale"
        assert json.loads(wf.api_path(name).read_text()) == api, f"{name}_api is stale"
    api = json.loads(wf.api_path("klein_micro_sandbox").read_text())
    loader, world_node = api["2"]["inputs"], api["1"]["inputs"]
    assert (loader["folder"], loader["control_folder"], loader["trigger"]) == (["1", 3], ["1", 4], ["1", 5])
    ui_loader = next(n for n in json.loads((wf.OUT / "klein_micro_sandbox.json").read_text())["nodes"] if n["id"] == 2)
    assert dataset_name(world_node["concept"], world_node["images"], world_node["dataset_seed"]) in \
        ui_loader["widgets_values"]  # the widget shows the folder the node writes
    assert KleinDatasetLoader.validate_inputs(folder=None) is True  # a linked folder is checked when it runs


@pytest.mark.slow
def test_demo_graph_learns_its_concept_and_its_grid_is_read_by_the_reader(tmp_path):
    """The demo's micro path as `bash scripts/demo.sh` runs it (own base dir, real server, the shipped character graph
    on the micro models, its full 300 steps; ~3.5 min on 2 CPU cores): the reader, reading the PNG itself, sees what
    the demo reported, and the LoRA shows the character with its trigger and not without it. Measured on this CPU:
    before 0/8 triggered and 0/8 untriggered, after 4/8 and 1/8 (docs/quality.md); the bounds leave a prompt of room
    either way."""
    from klein_lora_studio.devtools import demo

    comfyui = Path(os.environ["COMFYUI_PATH"])
    base = tmp_path / "base"
    (base / "models" / "vae_approx").mkdir(parents=True)
    (base / "models" / "vae_approx" / "taef2_encoder.safetensors").write_bytes(b"a user's taef2")
    assert demo.micro_demo(comfyui, base / demo.MICRO_BASE, steps=demo.MICRO_STEPS) == 0
    out = base / demo.MICRO_BASE / "output"
    cells = json.loads((out / demo.GRID_CELLS).read_text())
    assert (base / demo.MICRO_BASE / "models" / "loras" / f"{demo.MICRO_LORA}.safetensors").is_file()
    read = showcase.read_grid(out / demo.GRID_FILE, out / demo.GRID_CELLS)
    assert read == cells["present"], (read, cells["tint_score"])  # the picture says what the demo printed
    n = demo.MICRO_GRID_PROMPTS
    after, before = cells["present"][showcase.AFTER], cells["present"][showcase.BEFORE]
    assert len(after) == 2 * n and cells["triggered"] == [True] * n + [False] * n
    assert sum(before[:n]) <= 1 and sum(before[n:]) <= 1, before  # measured 0 and 0
    assert sum(after[:n]) >= 3, after  # measured 4 of 8 triggered
    assert sum(after[n:]) <= 2 and sum(after[:n]) > sum(after[n:]), after  # measured 1 of 8 untriggered
    assert (base / "models" / "vae_approx" / "taef2_encoder.safetensors").read_bytes() == b"a user's taef2"


@pytest.mark.slow
def test_sandbox_workflow_runs_in_a_real_comfyui(tmp_path):
    """The shipped sandbox graph, shortened (4 training steps, 2 sampling steps), queued and run headless: the
    links into the Dataset Loader's widgets pass validation, the LoRA and the sample are written."""
    from klein_lora_studio import run as runner
    from klein_lora_studio.devtools.server import ComfyServer

    api = json.loads(wf.api_path("klein_micro_sandbox").read_text())
    api["4"]["inputs"].update({"recipe.steps": 4, "save_every": 2, "sample_steps": 2})
    api["10"]["inputs"]["steps"] = 4
    with ComfyServer(Path(os.environ["COMFYUI_PATH"]), tmp_path, dev_nodes=False) as url:
        assert asyncio.run(runner.run(api, url)) == 0, (tmp_path / "comfyui.log").read_text()[-3000:]
    assert (tmp_path / "models" / "loras" / "klein_micro_style.safetensors").is_file()
    assert list((tmp_path / "output").glob("klein_micro_style_sample*.png"))
    assert not (tmp_path / "models" / "vae_approx").exists() or not any((tmp_path / "models" / "vae_approx").iterdir())
