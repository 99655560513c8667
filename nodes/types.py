"""The pack's own wire types: the frontend connects only matching sockets."""
from comfy_api.latest import io

KleinDataset = io.Custom("KLEIN_DATASET")
KleinTargets = io.Custom("KLEIN_TARGETS")
CATEGORY = "Klein LoRA"
