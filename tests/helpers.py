"""Test helpers; the synthetic concept datasets live in devtools/datasets.py (the demo uses them too)."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from ..devtools.datasets import TRIGGER, concept_image, write_concept_dataset  # noqa: F401 - the tests' import


def gloo_gradient_worker(rank: int, world: int, port: int, out) -> None:
    """A spawned rank of tests/test_distributed.py (here: spawn children import it by its package name)."""
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    from klein_lora_studio.trainer.training.distributed import Ranks

    ranks = Ranks(rank, world)
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # a global batch of 3 over 2 ranks: 2 + 1 rows
    part = ranks.shard(3)
    loss = ((x[part] @ w) ** 2).mean()
    loss.backward()
    total = ranks.average_gradients([w], part.stop - part.start, 3, loss.detach())
    out.put((rank, w.grad.tolist(), float(total)))
    dist.destroy_process_group()


# ------------------------------------------------------------------ the encoded tiny set-up and the trainer node
# One factory for dataset -> encode -> unet -> targets (the `encoded` fixture in conftest.py calls it), and the
# trainer node called only by keyword through `trainer_inputs`, so no test depends on its argument order.

@dataclass
class Encoded:
    unet: object
    data: object
    targets: object


def encode_tiny(tiny, folder: Path, n: int = 3, size: int = 64, groups=("double",), layers: str = "attention",
                all_linears: bool = False, write=write_concept_dataset, **encode) -> Encoded:
    """A dataset of `n` images in `folder`, encoded by the tiny VAE and text encoder, a fresh tiny unet and its
    targets (`all_linears`: the selector's linear-layer names, as the node passes them). `write(folder, n=, size=)`
    writes the dataset (a concept dataset by default) and returns its folder, or (target, control) folders of
    image-to-image pairs."""
    import torch
    from klein_lora_studio.trainer.data import dataset as ds
    from klein_lora_studio.trainer.model import targets as tg

    written = write(folder, n=n, size=size)
    if isinstance(written, tuple):
        written, encode["control_folder"] = written
    with torch.inference_mode():
        data = ds.encode_folder(written, tiny.vae, tiny.clip, size, TRIGGER, **encode)
    unet = tiny.unet()
    dm = unet.model.diffusion_model
    names = tg.linear_layer_names(dm) if all_linears else None
    return Encoded(unet, data, tg.resolve_targets(list(groups), layers, tg.BlockCounts.of_model(dm), linear_names=names))


TRAINER_DEFAULTS = dict(output_name="klein_lora", save_every=0, batch_size=1, seed=0, save_dtype="bf16")


def trainer_inputs(setup: Encoded, recipe: str = "custom", rank: int = 4, alpha: float = 4.0,
                   learning_rate: float = 2e-3, steps: int = 6, **inputs) -> dict:
    """KleinLoRATrainer.execute's keyword inputs as ComfyUI passes them: the recipe as its DynamicCombo value (rank,
    alpha, learning_rate and steps only with 'custom'), the other inputs as given, else TRAINER_DEFAULTS."""
    combo = {"recipe": recipe}
    if recipe == "custom":
        combo.update(rank=rank, alpha=alpha, learning_rate=learning_rate, steps=steps)
    return dict(model=setup.unet, dataset=setup.data, targets=setup.targets, recipe=combo,
                **{**TRAINER_DEFAULTS, **inputs})


def run_trainer(setup: Encoded, **kw):
    """The trainer node's execute, in inference mode as ComfyUI's executor runs it."""
    import torch
    from klein_lora_studio.nodes.lora_trainer import KleinLoRATrainer

    with torch.inference_mode():
        return KleinLoRATrainer.execute(**trainer_inputs(setup, **kw))


def post_prompt(workflow: dict, url: str) -> tuple[int, dict]:
    """POST /prompt as the page does: (HTTP status, ComfyUI's answer)."""
    import json
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url + "/prompt", data=json.dumps({"prompt": workflow}).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


# ------------------------------------------------------------------ the micro world
@contextlib.contextmanager
def micro_models_folder(root):
    """The micro models in their own models folder, put first in ComfyUI's search paths for the test only (the
    session's shared models folder holds the random tiny taef2, which the micro one must not replace)."""
    import folder_paths

    from ..microworld import models

    paths = models.write_micro_models(root)
    kinds = ("diffusion_models", "vae_approx", "text_encoders")
    for kind in kinds:
        folder_paths.add_model_folder_path(kind, str(root / kind), is_default=True)
    try:
        yield paths
    finally:
        for kind in kinds:
            folder_paths.folder_names_and_paths[kind][0].remove(str(root / kind))
        folder_paths.filename_list_cache.clear()


def out_of_memory_at_step(monkeypatch, step: int, tried: str = "2.00 GiB") -> None:
    """The trainer's step `step` (1-based, counting this run's steps) raises CUDA's out-of-memory error; the
    others run the real `loop.train_step`."""
    import torch

    from ..trainer.training import loop

    real, calls = loop.train_step, {"n": 0}

    def step_or_oom(*a, **kw):
        calls["n"] += 1
        if calls["n"] == step:
            raise torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {tried}")
        return real(*a, **kw)
    monkeypatch.setattr(loop, "train_step", step_or_oom)
