"""Klein Micro World: the micro klein models and a dataset of their world, a sandbox that trains in minutes on a CPU.

The micro models (microworld/models.py: klein's 5 + 20 block structure at hidden 128, a taef2 trained on
the world, the tiny frozen Qwen3) know a procedural world of coloured shapes, so a LoRA trained on them
shows (or fails to show) its concept within minutes: a place to learn the trainer's knobs before a
GPU-day on the real 4B. Files: the diffusion model goes into models/diffusion_models (loaded by the stock
UNETLoader, so jobs and other graphs can load it again); the text encoder cannot go through CLIPLoader
(it builds the full Qwen3 size from the key widths) and the VAE not through VAELoader under a name of its
own (VAELoader reads taef2 only as vae_approx/taef2_encoder.* + taef2_decoder.*, the names of the real
taef2), so both are built here from the pack's committed weights and nothing is written to vae_approx.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from comfy_api.latest import io

from .types import CATEGORY

DATASET_PREFIX = "klein_micro_"  # input/<prefix><concept>_<images>_s<seed>


def dataset_name(concept: str, images: int, seed: int) -> str:
    return f"{DATASET_PREFIX}{concept}_{images}_s{seed}"


def diffusion_models_folder(paths: list[str]) -> Path:
    """models/diffusion_models among ComfyUI's folders for the kind (models/unet is listed first), else the first."""
    return Path(next((p for p in paths if Path(p).name == "diffusion_models"), paths[0]))


def install_unet(folder: Path) -> str:
    """<diffusion_models folder>/klein-micro.safetensors (checked against the manifest); a different file there is never
    replaced. Returns the name UNETLoader lists it under."""
    from ..microworld import models
    from ..trainer.paths import _atomic_write

    src = models.verify_committed()[models.UNET_FILE]
    dst = folder / models.UNET_FILE
    models._check_free(src, dst, "diffusion model")
    if not dst.exists():
        _atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp))
    return models.UNET_FILE


def micro_vae():
    """The micro taef2 as a VAE, built as VAELoader("taef2") builds one, from the committed pair."""
    import comfy.sd
    import comfy.utils

    from ..microworld import models

    files = models.verify_committed()
    sd = {f"taesd_{part}.{k}": v for part, name in models.TAEF2_FILES.items()
          for k, v in comfy.utils.load_torch_file(str(files[name])).items()}
    vae = comfy.sd.VAE(sd=sd, metadata={"tae_latent_channels": 128})
    vae.throw_exception_if_invalid()
    return vae


def write_world_dataset(input_dir: Path, concept: str, images: int, seed: int) -> tuple[str, str]:
    """input/<name> (and <name>_control for the transform): written once, then reused as it is, so edits to its
    captions are kept (delete the folder to regenerate). Returns the folder names the Dataset Loader takes."""
    from ..microworld import world

    name = dataset_name(concept, images, seed)
    folder = input_dir / name
    control = name + "_control" if concept == "transform" else ""
    if folder.is_dir() and any(folder.iterdir()):
        logging.info("Klein Micro World: reusing %s (delete it to regenerate)", folder)
    else:
        world.write_dataset(folder, concept, images, seed)
    return name, control


class KleinMicroWorld(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        from ..microworld import world

        concepts = list(world.CONCEPTS)
        return io.Schema(
            node_id="KleinMicroWorld",
            display_name="Klein Micro World (sandbox)",
            category=CATEGORY,
            description="The micro klein models (klein's block structure at 6.8M parameters, pretrained on a world of "
                        "coloured shapes) and a dataset of that world carrying a new concept: train a LoRA in minutes "
                        "on any machine to learn the knobs before spending a GPU-day on the real model.",
            inputs=[
                io.Combo.Input("concept", options=concepts, default="style",
                               tooltip="The concept the dataset teaches: " + "; ".join(
                                   f"{c.name} (trigger '{c.trigger}', the {c.recipe} recipe): {c.what}"
                                   for c in world.CONCEPTS.values()) + "."),
                io.Int.Input("images", default=24, min=4, max=512,
                             tooltip="Dataset images (128 px, captioned from their attributes with the trigger)."),
                io.Int.Input("dataset_seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Which scenes the dataset draws (deterministic). The folder is written once per "
                                     "concept/images/seed and then reused as it is: edit its captions to experiment, "
                                     "delete it to regenerate."),
            ],
            outputs=[
                io.Model.Output(display_name="MODEL",
                                tooltip="The micro klein diffusion model, through the stock Load Diffusion Model from "
                                        "models/diffusion_models/klein-micro.safetensors (written there if missing; a "
                                        "different file of that name is never replaced)."),
                io.Clip.Output(display_name="CLIP",
                               tooltip="The micro text encoder (klein's Qwen3 layout at width 64, frozen). Load CLIP "
                                       "cannot load it (it builds the full Qwen3 size), so it is built here."),
                io.Vae.Output(display_name="VAE",
                              tooltip="The micro taef2, trained on the world. Load VAE reads taef2 only as "
                                      "models/vae_approx/taef2_encoder.* + taef2_decoder.*, the names of the real "
                                      "taef2, so it is built here from the pack's files and nothing is written "
                                      "there: use this output wherever the micro models sample or encode."),
                io.String.Output(display_name="folder",
                                 tooltip="The dataset folder in ComfyUI's input/ (klein_micro_<concept>_<images>_s<seed>) "
                                         "for the Klein Dataset Loader's folder."),
                io.String.Output(display_name="control_folder",
                                 tooltip="The transform concept's reference images (<folder>_control), empty for the "
                                         "others: for the Dataset Loader's control_folder."),
                io.String.Output(display_name="trigger",
                                 tooltip="The concept's trigger word, already in every caption: for the Dataset "
                                         "Loader's trigger and your prompts."),
            ],
        )

    @classmethod
    def execute(cls, concept: str, images: int, dataset_seed: int) -> io.NodeOutput:
        import folder_paths

        import nodes

        from ..microworld import models, world

        unet = install_unet(diffusion_models_folder(folder_paths.get_folder_paths("diffusion_models")))
        (model,) = nodes.UNETLoader().load_unet(unet, "default")
        folder, control = write_world_dataset(Path(folder_paths.get_input_directory()), concept, images, dataset_seed)
        return io.NodeOutput(model, models.micro_clip(), micro_vae(), folder, control, world.CONCEPTS[concept].trigger)
