"""Klein Dataset Loader: encode a caption folder once, after a Dataset Doctor check (glue over trainer/data)."""
from __future__ import annotations

import logging

import comfy.utils
from comfy_api.latest import io

from ..trainer.data import cache, captions, dataset, doctor, folders
from .types import CATEGORY, KleinDataset


class KleinDatasetLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinDatasetLoader",
            display_name="Klein Dataset Loader",
            category=CATEGORY,
            description="Encodes a folder of captioned images (or image-to-image pairs) once (VAE + text encoder) "
                        "for the Klein LoRA Trainer, after a Dataset Doctor check whose warnings head the report.",
            inputs=[
                io.String.Input("folder", default="klein_dataset",
                                tooltip="Folder of images (png/jpg/webp) with same-name .txt captions, relative to "
                                        "ComfyUI's input directory or inside a root listed in klein_lora_studio.json. "
                                        "For image-to-image these are the targets (the results)."),
                io.String.Input("trigger", default="kln_concept",
                                tooltip="Trigger word; put first in every caption that does not contain it."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=16,
                             tooltip="Training resolution in pixels (multiple of 16): the square side, or with "
                                     "bucketing the side of a square of the same area as each bucket."),
                io.Vae.Input("vae", tooltip="The FLUX.2 VAE that encodes the images to latents."),
                io.Clip.Input("clip", tooltip="The klein text encoder (CLIPLoader, type flux2) for the captions."),
                io.String.Input("control_folder", default="", optional=True,
                                tooltip="Image-to-image: folder of control (input) images, matched to the targets by "
                                        "file name without extension (001.png -> 001.png). Empty = single images "
                                        "(text-to-image LoRA)."),
                io.Boolean.Input("bucketing", default=True, optional=True,
                                 tooltip="On: keep each image's aspect ratio (nearest of 1:1 ... 2:1 buckets of about "
                                         "resolution^2 pixels; a batch never mixes buckets). Off: square centre crops."),
                io.Int.Input("repeats", default=1, min=1, max=100, optional=True, advanced=True,
                             tooltip="Times each image is seen per epoch (balances a small set against others)."),
                io.Float.Input("caption_dropout", default=0.0, min=0.0, max=0.9, step=0.01, optional=True, advanced=True,
                               tooltip="Share of steps that train on the empty caption (0.05-0.1 keeps CFG with an "
                                       "empty negative working and lets the concept show without the trigger)."),
                io.Boolean.Input("shuffle_tags", default=False, optional=True, advanced=True,
                                 tooltip="For comma-separated tag captions: encode up to 4 shuffled orders per "
                                         "caption (trigger tag kept first) and pick one per step."),
                io.Boolean.Input("use_cache", default=True, optional=True, advanced=True,
                                 tooltip="Keep latents and caption encodings in output/klein_lora_cache so the next "
                                         "run re-encodes only changed files (keyed by file content and model weights)."),
            ],
            outputs=[
                KleinDataset.Output(display_name="dataset",
                                    tooltip="The encoded images and captions, for the Klein LoRA Trainer (and the "
                                            "Checkpoint Sampler's metrics)."),
                io.String.Output(display_name="report",
                                 tooltip="What was encoded: the Doctor's warnings first, then counts, buckets and "
                                         "notes (converted, upscaled or cut files)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder: str | None = None, control_folder: str | None = "") -> bool | str:
        """At queue time: a missing or disallowed folder fails before any model loads. A linked folder (e.g. from
        Klein Micro World, which writes it) has no value yet (None): it is checked when the node runs."""
        if folder is None or control_folder is None:
            return True
        return folders.check(folder, control_folder)

    @classmethod
    def fingerprint_inputs(cls, folder: str | None = None, control_folder: str | None = "", **_) -> str | float:
        """Re-run when a file in the folders changed (names, sizes, times), and only then; a linked folder (no value
        before the graph runs) on every run (NaN never equals itself), which the latent cache keeps cheap."""
        if folder is None or control_folder is None:
            return float("nan")
        return folders.fingerprint(folder, control_folder)

    @classmethod
    def execute(cls, folder: str, trigger: str, resolution: int, vae, clip, control_folder: str = "",
                bucketing: bool = True, repeats: int = 1, caption_dropout: float = 0.0, shuffle_tags: bool = False,
                use_cache: bool = True) -> io.NodeOutput:
        found = folders.resolve(folder, control_folder)
        trigger = trigger.strip()
        warnings = doctor_warnings(found, trigger, resolution, captions.encoder_tokenizer(clip))
        pbar = comfy.utils.ProgressBar(1)
        options = dict(progress=lambda i, n: pbar.update_absolute(i, n), control_folder=found.control,
                       bucketing=bucketing, repeats=repeats, caption_dropout=caption_dropout,
                       shuffle_tags=shuffle_tags, roots=found.roots)
        if use_cache:
            data = cache.encode_folder_cached(found.folder, vae, clip, resolution, trigger, cache.default_cache_dir(),
                                              **options)
        else:
            data = dataset.encode_folder(found.folder, vae, clip, resolution, trigger, **options)
        data.warnings = warnings
        logging.info("Klein dataset: %s", data.report().splitlines()[len(warnings) + 2 if warnings else 0])
        return io.NodeOutput(data, data.report())


def doctor_warnings(found: folders.DatasetFolders, trigger: str, resolution: int, tokenizer=None) -> list[str]:
    """The Dataset Doctor's findings, as warnings only: a failing check must never block loading."""
    try:
        report = doctor.examine(found.folder, trigger, resolution, "image-to-image" if found.control else None,
                                found.control, roots=found.roots, tokenizer=tokenizer)
    except Exception as e:  # noqa: BLE001 - the doctor advises; the loader's own errors are the real checks
        logging.warning("Klein dataset doctor could not run on %s: %s", found.folder, e)
        return [f"Dataset Doctor could not run: {e}"]
    for w in report.warnings:
        logging.warning("Klein dataset doctor: %s", w)
    return report.warnings
