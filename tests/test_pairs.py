"""Image-to-image pairs: matching and its errors, and training on encoded pairs through the stock edit graph.

The training test samples the way a stock ComfyUI edit graph does: the reference goes through the
stock ReferenceLatent node into the conditioning, and ComfyUI's KSampler samples it. On these pairs
(colours through the tiny random VAE, whose latents barely tell colours apart) the LoRA learns the
targets' mean; that it uses the reference is test_pairs_reference.py's proof.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import pytest
import torch
from klein_lora_studio.trainer.data import dataset as ds
from PIL import Image

TRIGGER = "zxq"


CORNERS = [(r, g, b) for r in (20.0, 235.0) for g in (20.0, 235.0) for b in (20.0, 235.0)]


def control_image(size: int, seed: int) -> np.ndarray:
    """One of the eight corners of the RGB cube (by seed) with a little noise: the target depends on it."""
    rng = np.random.default_rng(seed)
    arr = np.zeros((size, size, 3), np.float32) + np.array(CORNERS[seed % len(CORNERS)], np.float32)
    return arr + rng.normal(0, 8, arr.shape)


def invert(arr: np.ndarray) -> np.ndarray:
    return 255.0 - arr


def _save(arr: np.ndarray, path: Path) -> None:
    Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(path)


def write_pairs(root: Path, n: int, size: int = 64, seed0: int = 0) -> tuple[Path, Path]:
    """root/pairs_control/00i.png -> root/pairs/00i.png (the colour-inverted control), one caption per target."""
    target, control = root / "pairs", root / "pairs_control"
    target.mkdir(parents=True, exist_ok=True)
    control.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        arr = control_image(size, seed0 + i)
        _save(arr, control / f"{i:03d}.png")
        _save(invert(arr), target / f"{i:03d}.png")
        (target / f"{i:03d}.txt").write_text("invert the colours", encoding="utf-8")
    return target, control


# ------------------------------------------------------------------ matching (no ComfyUI needed)


def test_pairs_match_by_name_and_take_the_targets_caption(tmp_path):
    target, control = write_pairs(tmp_path, 3)
    Image.open(control / "001.png").save(control / "001.jpg")  # the extension may differ
    (control / "001.png").unlink()
    items, missing, _ = ds.scan_pairs(target, control, TRIGGER)
    assert [(it.image.name, it.control.name) for it in items] == [("000.png", "000.png"), ("001.png", "001.jpg"),
                                                                   ("002.png", "002.png")]
    assert items[0].caption == "zxq, invert the colours" and missing == []


def test_pair_folder_that_matches_nothing_names_both_sides(tmp_path):
    target, control = write_pairs(tmp_path, 2)
    for p in control.iterdir():
        p.rename(control / f"ctl_{p.name}")
    with pytest.raises(ValueError, match=r"matches none of the 2 images.*000\.png.*ctl_000\.png.*Name each control"):
        ds.scan_pairs(target, control, TRIGGER)


def test_missing_partners_are_named(tmp_path):
    target, control = write_pairs(tmp_path, 3)
    (control / "001.png").unlink()
    _save(control_image(64, 9), control / "007.png")
    with pytest.raises(ValueError) as e:
        ds.scan_pairs(target, control, TRIGGER)
    msg = str(e.value)
    assert "1 target(s)" in msg and "001.png" in msg and "1 control(s)" in msg and "007.png" in msg


def test_empty_control_folder_and_ambiguous_names(tmp_path):
    target, control = write_pairs(tmp_path, 2)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="control folder .*empty has no images"):
        ds.scan_pairs(target, empty, TRIGGER)
    Image.open(control / "000.png").save(control / "000.webp")
    with pytest.raises(ValueError, match=r"several images with one name: 000\.png and 000\.webp"):
        ds.scan_pairs(target, control, TRIGGER)


def test_pair_of_another_aspect_ratio_is_an_error_naming_both(tmp_path):
    target, control = write_pairs(tmp_path, 2)
    _save(control_image(64, 0)[:, :48], control / "001.png")  # 48x64 control for a 64x64 target
    with pytest.raises(ValueError, match=r"pair 001\.png: target .*64x64 but control .*48x64"):
        ds.encode_folder(target, None, None, 64, TRIGGER, control_folder=control)


# ------------------------------------------------------------------ learning (real ComfyUI, tiny klein)


def _with_reference(cond, latent: torch.Tensor):
    """The stock ReferenceLatent node, as a graph would run it."""
    from comfy_extras.nodes_edit_model import ReferenceLatent

    return ReferenceLatent.execute(conditioning=cond, latent={"samples": latent}).result[0]


def _edit_sample(comfy, model, clip, prompt: str, ref: torch.Tensor, seed: int, steps: int = 8) -> torch.Tensor:
    """A stock edit graph: text -> ReferenceLatent(control) -> KSampler (euler, CFG 1) from an empty latent."""
    with torch.inference_mode():
        pos = _with_reference(clip.encode_from_tokens_scheduled(clip.tokenize(prompt)), ref[None])
        neg = _with_reference(clip.encode_from_tokens_scheduled(clip.tokenize("")), ref[None])
        latent = {"samples": torch.zeros(1, *ref.shape)}
        return comfy.common_ksampler(model, seed, steps, 1.0, "euler", "simple", pos, neg, latent)[0]["samples"][0].float()


@pytest.mark.comfy
def test_pair_training_feeds_the_stock_edit_graph(comfy, tiny, base_dir, encoded):
    import comfy.sd as comfy_sd
    from klein_lora_studio.trainer.model import targets as tg
    from klein_lora_studio.trainer.training import loop

    setup = encoded("i2i", n=8, size=64, groups=tg.GROUPS, layers="attention_mlp", write=write_pairs, bucketing=True)
    held_pairs = functools.partial(write_pairs, seed0=8 * 10 + 1)  # 2 new colours
    held = encoded("i2i_held", n=2, size=64, write=held_pairs).data
    unet, data, targets = setup.unet, setup.data, setup.targets
    assert data.references is not None and len(data.references) == 8
    assert data.references[0].shape == data.latents[0].shape
    assert "8 image-to-image pairs" in data.report()

    dm = unet.model.diffusion_model
    assert (dm.params.default_ref_method, dm.params.ref_index_scale) == ("index", 10.0)  # klein's, as detected
    cfg = loop.TrainConfig(rank=8, alpha=8, learning_rate=4e-3, steps=80, batch_size=2, output_name="i2i", seed=0)
    with torch.inference_mode():
        result = loop.train_lora(unet, data, targets, cfg, base_dir / "models" / "loras")
        trained = comfy_sd.load_lora_for_models(unet, None, result.lora, 1.0, 0)[0]

    # The stock graph hands the diffusion model the very tensors training used: ref_latents=[control latent]
    # and the caption's 512-token conditioning.
    seen = {}

    def spy(apply_model, args):
        seen.update(args["c"])
        return apply_model(args["input"], args["timestep"], **args["c"])

    spied = trained.clone()
    spied.set_model_unet_function_wrapper(spy)
    _edit_sample(comfy, spied, tiny.clip, data.captions[0], held.references[0], seed=1, steps=1)
    assert len(seen["ref_latents"]) == 1 and torch.equal(seen["ref_latents"][0][0].float(), held.references[0])
    assert torch.equal(seen["c_crossattn"][0].float(), held.contexts[0])

    dist, cos = {}, {}
    for name, model in (("base", unet), ("trained", trained)):
        outs = [_edit_sample(comfy, model, tiny.clip, data.captions[0], ref, seed=1) for ref in held.references]
        dist[name] = sum((o - t).pow(2).mean().item() for o, t in zip(outs, held.latents, strict=True)) / len(outs)
        # same seed, two controls: how the output changes with the control vs how the target does
        cos[name] = torch.nn.functional.cosine_similarity((outs[0] - outs[1]).flatten(),
                                                          (held.latents[0] - held.latents[1]).flatten(), dim=0).item()
    print(f"I2I distance to the expected target: base {dist['base']:.4f}, trained {dist['trained']:.4f}; "
          f"output change vs target change between two controls (cosine): base {cos['base']:.3f}, "
          f"trained {cos['trained']:.3f}")
    assert dist["trained"] < 0.7 * dist["base"], dist
