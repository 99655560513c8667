from __future__ import annotations

import logging

import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..trainer import dataset, paths
from .types import CATEGORY, KleinDataset


class KleinDatasetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinDatasetLoader",
            display_name="Klein Dataset Loader",
            category=CATEGORY,
            description="Encodes a folder of captioned images once (VAE + text encoder) for the Klein LoRA Trainer.",
            inputs=[
                io.String.Input("folder", default="klein_dataset",
                                tooltip="Folder of images (png/jpg/webp) with same-name .txt captions, relative to "
                                        "ComfyUI's input directory or inside a root listed in klein_lora_studio.json."),
                io.String.Input("trigger", default="kln_concept",
                                tooltip="Trigger word; put first in every caption that does not contain it."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=16,
                             tooltip="Training resolution in pixels (square, centre-cropped; multiple of 16)."),
                io.Vae.Input("vae", tooltip="The FLUX.2 VAE that encodes the images to latents."),
                io.Clip.Input("clip", tooltip="The klein text encoder (CLIPLoader, type flux2) for the captions."),
            ],
            outputs=[
                KleinDataset.Output(display_name="dataset"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, folder: str, trigger: str, resolution: int, vae, clip) -> io.NodeOutput:
        roots = paths.configured_dataset_roots(folder_paths.get_user_directory())
        where = paths.resolve_dataset_folder(folder, folder_paths.get_input_directory(), roots)
        pbar = comfy.utils.ProgressBar(1)
        data = dataset.encode_folder(where, vae, clip, resolution, trigger.strip(),
                                     progress=lambda i, n: pbar.update_absolute(i, n))
        logging.info("Klein dataset: %s", data.report().splitlines()[0])
        return io.NodeOutput(data, data.report())
