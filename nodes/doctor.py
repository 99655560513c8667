"""Klein Dataset Doctor: check a training folder before training (glue over trainer/data/doctor.py)."""
from __future__ import annotations

import logging

from comfy_api.latest import io, ui

from ..trainer.data import doctor, folders
from ..trainer.training.recipes import RECIPES
from .types import CATEGORY

NO_TASK = "none"


class KleinDatasetDoctor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="KleinDatasetDoctor",
            display_name="Klein Dataset Doctor",
            category=CATEGORY,
            description="Checks a training folder before training: near-duplicates, one shared background, reused "
                        "framing, corner watermarks, captions, low resolution, image-to-image pairs and dataset size. "
                        "Returns a text report and a contact sheet with the problem images outlined.",
            is_output_node=True,
            inputs=[
                io.String.Input("folder", default="klein_dataset",
                                tooltip="Folder of images with same-name .txt captions (the target images for "
                                        "image-to-image), relative to ComfyUI's input directory or inside a root "
                                        "listed in klein_lora_studio.json."),
                io.String.Input("trigger", default="kln_concept",
                                tooltip="Trigger word every caption should contain; leave empty to skip that check."),
                io.Int.Input("resolution", default=1024, min=64, max=4096, step=16,
                             tooltip="Training resolution: images whose short side is smaller are flagged (upscaled)."),
                io.Combo.Input("task", options=[NO_TASK, *RECIPES], default="character",
                               tooltip="The recipe's task, for the recommended dataset size (style 50-200, character "
                                       "20-60, object 30-100, image-to-image 30-100 pairs); 'none' skips it."),
                io.String.Input("control_folder", default="", optional=True,
                                tooltip="Image-to-image only: the folder of control (input) images, matched to the "
                                        "targets by file name. Empty for other tasks."),
            ],
            outputs=[
                io.String.Output(display_name="report",
                                 tooltip="Every problem found, each naming its files and what to do."),
                io.Image.Output(display_name="contact_sheet",
                                tooltip="Thumbnails of the images, the problem ones outlined in the colour of "
                                        "their problem (legend on top)."),
            ],
        )

    @classmethod
    def validate_inputs(cls, folder: str, control_folder: str = "") -> bool | str:
        """At queue time: a missing or disallowed folder fails before anything runs."""
        return folders.check(folder, control_folder)

    @classmethod
    def fingerprint_inputs(cls, folder: str, control_folder: str = "", **_) -> str:
        """Re-run when a file in the folders changed (names, sizes, times), and only then."""
        return folders.fingerprint(folder, control_folder)

    @classmethod
    def execute(cls, folder: str, trigger: str, resolution: int, task: str, control_folder: str = "") -> io.NodeOutput:
        found = folders.resolve(folder, control_folder)
        report = doctor.examine(found.folder, trigger, resolution, None if task == NO_TASK else task, found.control,
                                roots=found.roots)
        for w in report.warnings:
            logging.warning("Klein dataset doctor: %s", w)
        sheet = report.contact_sheet()
        return io.NodeOutput(report.text, sheet, ui=ui.PreviewImage(sheet, cls=cls))
