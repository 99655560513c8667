"""Checkpoint sampling on the tiny klein: the schedule, the grid, the live sampler and the node end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from klein_lora_studio.tests.helpers import TRIGGER
from klein_lora_studio.trainer.evaluation import metrics as mt
from klein_lora_studio.trainer.evaluation import sampling as sp
from klein_lora_studio.trainer.model import targets as tg
from klein_lora_studio.trainer.training import loop

pytestmark = pytest.mark.comfy
ONE_BAND = {"low": (0.2,), "mid": (0.5,), "high": (0.8,)}


@pytest.fixture(scope="module")
def run(comfy, tiny, encoded, base_dir):
    """A 20-step run (checkpoint at 10, final at 20, fp32 files) with the live sampler on its hook."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine spin against each other
    enc = encoded("sampler", groups=tg.GROUPS, layers="attention_mlp")
    unet, data, targets = enc.unet, enc.data, enc.targets
    cfg = loop.TrainConfig(rank=4, alpha=4, learning_rate=3e-3, steps=20, save_every=10, output_name="sampler",
                           save_dtype="fp32", seed=1)
    prompts = sp.prompt_suite(TRIGGER, [("car", "a red car")], untriggered=False)
    live = sp.LiveSampler(tiny.clip, tiny.vae, prompts, sp.SampleSettings(steps=2, width=64, height=64, seed=5))
    with torch.inference_mode():
        result = loop.train_lora(unet, data, targets, cfg, base_dir / "models" / "loras",
                                 loop.TrainHooks(on_checkpoint=live))
    yield dict(unet=unet, data=data, result=result, live=live, prompts=prompts)
    torch.set_num_threads(before)


def test_schedule_is_comfyuis_flux2_scheduler(comfy):
    from comfy_extras.nodes_flux import Flux2Scheduler

    for steps, w, h in ((50, 1024, 1024), (8, 512, 768)):
        ours = sp.flux2_sigmas(steps, w, h)
        node = Flux2Scheduler.execute(steps=steps, width=w, height=h).args[0]
        assert torch.equal(ours, node) and len(ours) == steps + 1 and float(ours[0]) == 1.0
    assert not torch.equal(sp.flux2_sigmas(50, 1024, 1024), sp.flux2_sigmas(50, 512, 512))  # resolution-dependent
    with pytest.raises(ValueError, match="multiple of 16"):
        sp.SampleSettings(width=100).validate()


def test_suite_and_grid_labels():
    suite = sp.prompt_suite("zxq")
    assert len(suite) == 8 and [p.triggered for p in suite] == [True, False] * 4
    assert suite[0].text.startswith("zxq, ") and "woman" in suite[0].text and "mountain" in suite[2].text
    assert "man" in suite[4].label and "zxq" not in suite[1].text
    assert sp.parse_subjects("dog: a dog\n\n# c\na cat") == [("dog", "a dog"), ("prompt 4", "a cat")]
    assert sp.parse_subjects("") == list(sp.DEFAULT_SUBJECTS)
    from PIL import Image

    cells = [[Image.new("RGB", (64, 64), (r * 60, c * 60, 0)) for c in range(3)] for r in range(2)]
    grid = sp.grid_image(cells, ["row a", "row b"], ["base", "step 10", "step 20"], "title")
    assert grid.width > 3 * 64 and grid.height > 2 * 64
    assert grid.getpixel((grid.width - 5 - 32, grid.height - 5 - 32)) == (60, 120, 0)  # last cell = row 1, col 2
    with pytest.raises(ValueError, match="2 row labels and 2 column labels"):
        sp.grid_image(cells, ["a", "b"], ["x", "y"])


def test_live_samples_match_the_saved_checkpoints(run, tiny):
    """The hook's live model and the saved file loaded by ComfyUI's LoRA loader give the same samples."""
    live, result = run["live"], run["result"]
    assert [c.step for c in live.columns] == [10, 20]
    with torch.inference_mode():
        cols = sp.sample_checkpoints(run["unet"], tiny.clip, tiny.vae, [*result.checkpoints, result.lora_path],
                                     run["prompts"], live.settings)
    assert [c.label for c in cols] == [sp.BASE_LABEL, "step 10", "step 20"]
    for loaded, seen in zip(cols[1:], live.columns, strict=True):
        assert torch.allclose(loaded.latents[0], seen.latents[0], atol=1e-3), (loaded.latents[0] - seen.latents[0]).abs().max()
    assert not torch.allclose(cols[0].latents[0], cols[2].latents[0], atol=1e-2)  # the LoRA changes the sample
    assert cols[2].images.shape == (1, 64, 64, 3)


def test_compiled_sampling_matches_eager(run, tiny):
    """The compiled blocks the live sampler uses on CUDA sample what the eager model samples (here on the CPU)."""
    import comfy.sd
    from torch._dynamo.utils import counters

    sd, _ = sp.read_lora(run["result"].lora_path)
    model, _ = comfy.sd.load_lora_for_models(run["unet"], None, sd, 1.0, 0)
    options = repr(model.model_options)
    eager = sp.LiveSampler(tiny.clip, tiny.vae, run["prompts"], run["live"].settings, compile_blocks=False)
    compiled = sp.LiveSampler(tiny.clip, tiny.vae, run["prompts"], run["live"].settings, compile_blocks=True)
    graphs = counters["stats"]["unique_graphs"]
    with torch.inference_mode():
        eager(20, run["result"].lora_path, model)
        compiled(20, run["result"].lora_path, model)
        compiled(20, run["result"].lora_path, model)  # the second checkpoint reuses the compiled blocks
    assert counters["stats"]["unique_graphs"] > graphs, "the blocks were not compiled"
    a, b, c = eager.columns[0].latents[0], compiled.columns[0].latents[0], compiled.columns[1].latents[0]
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert torch.equal(b, c)
    assert repr(model.model_options) == options, "sampling must not patch the model it was given"


def test_validation_loss_by_band_is_fixed_and_drops_with_training(run, tiny):
    import comfy.sd

    data, result = run["data"], run["result"]
    sd, _ = sp.read_lora(result.lora_path)
    with torch.inference_mode():
        trained = comfy.sd.load_lora_for_models(run["unet"], None, sd, 1.0, 0)[0]
        base = mt.validation_loss(run["unet"], data.latents, data.contexts, bands=ONE_BAND)
        again = mt.validation_loss(run["unet"], data.latents, data.contexts, bands=ONE_BAND)
        after = mt.validation_loss(trained, data.latents, data.contexts, bands=ONE_BAND)
    assert set(base) == {"low", "mid", "high", "mean"} and base == again  # fixed noises and sigmas
    assert after["mean"] < base["mean"], (base, after)


def _sampler_inputs(run, tiny, **inputs) -> dict:
    """KleinCheckpointSampler.execute's keyword inputs: a 2-step 64 px preview of one subject, unless given."""
    models = dict(clip=tiny.clip, vae=tiny.vae) if tiny is not None else dict(clip=None, vae=None)
    return dict(model=run["unet"], **models, **{**dict(checkpoints="", trigger=TRIGGER, prompts="car: a red car",
                                                       steps=2, cfg=4.0, seed=0, preview=True, preview_steps=2,
                                                       resolution=64), **inputs})


def test_node_grid_metrics_report(run, comfy, tiny, base_dir):
    import folder_paths

    result = run["result"]
    node = comfy.NODE_CLASS_MAPPINGS["KleinCheckpointSampler"]
    schema = node.GET_SCHEMA() if hasattr(node, "GET_SCHEMA") else node.define_schema()
    assert all(i.tooltip for i in schema.inputs), "every input needs a tooltip"
    lines = f"{result.checkpoints[0]}\n\n{result.lora_path.name}\n"  # trainer path and a loras-folder name
    with torch.inference_mode():
        out = node.execute(**_sampler_inputs(run, tiny, checkpoints=lines, steps=50, seed=5, dataset=run["data"]))
    grid, text, recommended = out.args
    assert grid.ndim == 4 and grid.shape[0] == 1 and grid.shape[-1] == 3
    assert grid.shape[2] > 3 * 64 and grid.shape[1] > 2 * 64  # 3 columns (base + 2), 2 rows (with/without trigger)
    assert "step 10:" in text and "step 20:" in text and "val loss low" in text
    report = json.loads((result.lora_path.parent / "sampler_eval.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == [10, 20] and report["sampling"]["steps"] == 2
    # the recommendation is the rule's pick over the report's own scores (validation loss included)
    scores = [mt.CheckpointMetrics(**{k: v for k, v in c.items() if k != "flags"}) for c in report["checkpoints"]]
    pick, reason = mt.recommend(scores)
    assert recommended == pick.path and report["recommended"]["step"] == pick.step
    assert f"Recommended: {reason}" in text and report["reason"].startswith(reason)
    assert len(report["prompts"]) == 2
    preview = out.ui["images"][0]
    assert out.ui["text"] == (text,) and preview["type"] == "temp" and preview["filename"].endswith(".png")
    assert (Path(folder_paths.get_temp_directory()) / preview["subfolder"] / preview["filename"]).is_file()
    with pytest.raises(ValueError, match="outside ComfyUI's loras folders"):
        node.execute(**_sampler_inputs(run, None, checkpoints="/etc/passwd"))
    with pytest.raises(ValueError, match="line 1 'nope.safetensors' is not a file"):
        node.execute(**_sampler_inputs(run, None, checkpoints="nope.safetensors"))
    assert folder_paths.get_folder_paths("loras")[0] == str(base_dir / "models" / "loras")



def test_rank_steps_grid_node_places_loras_by_metadata(run, comfy, tiny):
    result = run["result"]
    node = comfy.NODE_CLASS_MAPPINGS["KleinRankStepsGrid"]
    schema = node.GET_SCHEMA() if hasattr(node, "GET_SCHEMA") else node.define_schema()
    assert all(i.tooltip for i in schema.inputs), "every input needs a tooltip"
    with torch.inference_mode():
        out = node.execute(model=run["unet"], clip=tiny.clip, vae=tiny.vae, loras=str(result.lora_path),
                           prompt=f"{TRIGGER}, a red car", steps=2, cfg=4.0, seed=0, resolution=64,
                           runs={"run_1": str(result.checkpoints[0])})  # a trainer's output in a runs slot
    grid = out.args[0]
    assert grid.shape[0] == 1 and grid.shape[2] > 2 * 64 and grid.shape[1] < 3 * 64  # rank 4: 1 row; 10, 20 steps
    from PIL import Image

    def im(c):
        return Image.new("RGB", (32, 32), c)

    g = sp.rank_steps_grid([({"rank": "8", "steps": "500"}, im("red")), ({"rank": "16", "steps": "250"}, im("blue")),
                            ({"rank": "8", "steps": "250"}, im("green"))])
    assert g.getpixel((g.width - 5 - 16, g.height - 5 - 16)) == (128, 128, 128)  # rank 16 x 500: not trained
    assert g.getpixel((g.width - 5 - 16 - 36, g.height - 5 - 16)) == (0, 0, 255)  # rank 16 x 250


def test_checkpoints_also_shown_on_the_distilled_model(run, comfy, tiny, base_dir):
    """Train on Base, generate with the distilled klein: each checkpoint beside Base at 4 steps, CFG 1."""
    import comfy.utils as cu
    import folder_paths
    from klein_lora_studio.devtools import tiny_models

    distilled_file = "klein-tiny-distilled.safetensors"
    path = base_dir / "models" / "diffusion_models" / distilled_file
    if not path.exists():  # same architecture, other weights: what a distilled model of the same size is
        cu.save_torch_file(tiny_models.flux2_state_dict(**tiny_models.TINY, seed=7), str(path))
    folder_paths.filename_list_cache.clear()
    distilled = comfy.UNETLoader().load_unet(distilled_file, "default")[0]
    node = comfy.NODE_CLASS_MAPPINGS["KleinCheckpointSampler"]
    ckpt = str(run["result"].checkpoints[0])
    with torch.inference_mode():
        plain = node.execute(**_sampler_inputs(run, tiny, checkpoints=ckpt, seed=5))
        both = node.execute(**_sampler_inputs(run, tiny, checkpoints=ckpt, seed=5, distilled_model=distilled))
    assert both.args[0].shape[2] > plain.args[0].shape[2] + 64  # 2 more columns: distilled base + checkpoint
    assert both.args[1].split("Report:")[0] == plain.args[1].split("Report:")[0]  # metrics stay on Base
    d = sp.distilled_columns(distilled, tiny.clip, tiny.vae, [ckpt], sp.prompt_suite(TRIGGER, [("car", "a red car")]),
                             sp.SampleSettings(2, 4.0, 5, 64, 64))
    assert [c.label for c in d] == ["distilled: base (no LoRA)", "distilled: step 10"]
    wide = tiny_models.flux2_state_dict(hidden=384, double=1, single=2, context=192)
    other = base_dir / "models" / "diffusion_models" / "klein-other-size.safetensors"
    cu.save_torch_file(wide, str(other))
    folder_paths.filename_list_cache.clear()
    with pytest.raises(ValueError, match="same size"):
        sp.check_same_size(run["unet"], comfy.UNETLoader().load_unet(other.name, "default")[0])
