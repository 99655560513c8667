"""The example workflows, written in one place and emitted in both of ComfyUI's formats.

`python -m klein_lora_studio.devtools.workflows` (ComfyUI importable, e.g. COMFYUI_PATH set) rewrites
example_workflows/*.json: the UI format (drag and drop) and its API twin (`api/*_api.json`, POST /prompt).
Widget order and socket types are read from the real node definitions, so the files match what
the frontend builds. `to_tiny` turns an API workflow into one that runs on the tiny dev models.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "example_workflows"
API_OUT = OUT / "api"  # a subfolder: ComfyUI's template browser lists only the top level


def api_path(name: str) -> Path:
    return API_OUT / f"{name}_api.json"


@dataclass
class N:
    id: int
    type: str
    values: dict = field(default_factory=dict)  # widget values and links: name -> value | (node id, slot)
    title: str | None = None


def _base_loaders() -> list[N]:
    return [
        N(1, "UNETLoader", {"unet_name": "flux-2-klein-base-4b.safetensors", "weight_dtype": "default"}),
        N(2, "CLIPLoader", {"clip_name": "qwen_3_4b.safetensors", "type": "flux2", "device": "default"}),
        N(3, "VAELoader", {"vae_name": "flux2-vae.safetensors"}),
    ]


TRIGGERS = {"style": "kln_style", "character": "kln_person", "object": "kln_object", "image-to-image": "kln_edit"}


def recipe_lora(recipe: str) -> list[N]:
    """Dataset -> block targets (the recipe's preset) -> trainer (the recipe's values) -> loss graph."""
    from ..trainer.training.recipes import RECIPES

    r = RECIPES[recipe]
    return _base_loaders() + [
        N(4, "KleinDatasetLoader", {"folder": f"klein_{recipe}_dataset", "trigger": TRIGGERS[recipe], "resolution": 1024,
                                    "vae": (3, 0), "clip": (2, 0)}),
        N(5, "KleinBlockTargetSelector", {"model": (1, 0), "preset": r.target_preset}),
        N(6, "KleinLoRATrainer", {"model": (1, 0), "dataset": (4, 0), "targets": (5, 0), "recipe": recipe,
                                  "save_every": max(r.steps // 6, 1), "output_name": f"klein_{recipe}",
                                  "clip": (2, 0), "vae": (3, 0)}),
        N(7, "LossGraphNode", {"loss": (6, 3), "filename_prefix": f"klein_{recipe}_loss"}),
    ]


def image_to_image_lora() -> list[N]:
    """The seed's showcase: reference -> target pairs (pimpmyride_control/001.png -> pimpmyride/001.png)."""
    nodes = recipe_lora("image-to-image")
    nodes[3].values.update(folder="pimpmyride", control_folder="pimpmyride_control", trigger="pimpmyride")
    nodes[5].values["output_name"] = "klein_pimpmyride"
    return nodes


def evaluate_lora() -> list[N]:
    """Train (sampling the suite every save_every steps), then the full 50-step grid, metrics and report."""
    nodes = recipe_lora("style")
    nodes[5].values["output_name"] = "klein_style_evaluated"
    return nodes + [
        N(8, "KleinCheckpointSampler", {"model": (1, 0), "clip": (2, 0), "vae": (3, 0), "run": (6, 4),
                                        "trigger": TRIGGERS["style"], "dataset": (4, 0)}),
        N(9, "SaveImage", {"images": (8, 0), "filename_prefix": "klein_style_checkpoint_grid"}),
    ]


def rank_steps_grid() -> list[N]:
    """The seed's grid: rank 8/16/32 trained to 1000 steps, checkpoints at 250/500/750, one prompt, one seed."""
    nodes = recipe_lora("style")[:5]
    for i, rank in enumerate((8, 16, 32)):
        nodes.append(N(6 + i, "KleinLoRATrainer", {
            "model": (1, 0), "dataset": (4, 0), "targets": (5, 0), "recipe": "custom", "recipe.rank": rank,
            "recipe.alpha": float(rank), "recipe.learning_rate": 3e-4, "recipe.steps": 1000, "save_every": 250,
            "output_name": f"klein_style_r{rank}"}, title=f"rank {rank}"))
    nodes.append(N(9, "KleinRankStepsGrid", {"model": (1, 0), "clip": (2, 0), "vae": (3, 0),
                                            "prompt": f"{TRIGGERS['style']}, a portrait of a woman",
                                            "runs.run_1": (6, 4), "runs.run_2": (7, 4), "runs.run_3": (8, 4)}))
    return nodes


def style_lora() -> list[N]:
    return recipe_lora("style")


def style_lora_low_vram() -> list[N]:
    """The style recipe for consumer GPUs: the base in fp8 (Load Diffusion Model) and the trainer's low_vram
    (checkpointing + 8-bit AdamW): klein 4B at 1024² in ~6 GiB (bench/RESULTS.md)."""
    nodes = recipe_lora("style")
    nodes[0].values["weight_dtype"] = "fp8_e4m3fn"
    nodes[5].values.update(low_vram=True, output_name="klein_style_low_vram")
    return nodes


def merge_strength_sweep() -> list[N]:
    """The seed's weight tuning: a style and a subject LoRA over a grid of weights, then merged at the pick."""
    return _base_loaders() + [
        N(4, "KleinStrengthSweep", {"model": (1, 0), "clip": (2, 0), "vae": (3, 0), "lora_a": "klein_style.safetensors",
                                    "lora_b": "klein_character.safetensors", "strengths": "0.25, 0.5, 0.75, 1.0",
                                    "prompt": "kln_style, kln_person, a portrait in a garden"}),
        N(5, "SaveImage", {"images": (4, 0), "filename_prefix": "klein_strength_sweep"}),
        N(6, "KleinLoRAFile", {"lora_name": "klein_style.safetensors", "weight": 0.75}),
        N(7, "KleinLoRAFile", {"lora_name": "klein_character.safetensors", "weight": 1.0}),
        N(8, "KleinLoRAMerge", {"loras.lora_1": (6, 0), "loras.lora_2": (7, 0), "mode": "exact",
                                "output_name": "klein_style_character"}),
    ]


WORKFLOWS = {f"klein_{r}_lora": (lambda r=r: recipe_lora(r)) for r in ("style", "character", "object")}
WORKFLOWS.update(klein_style_lora_low_vram=style_lora_low_vram, klein_image_to_image_lora=image_to_image_lora,
                 klein_style_evaluate=evaluate_lora,
                 klein_rank_steps_grid=rank_steps_grid, klein_merge_strength_sweep=merge_strength_sweep)
SEED_NAMES = ("seed", "noise_seed")  # the frontend adds a "control after generate" widget after these


def _defaults(spec: dict) -> object:
    kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(kind, list) and kind:
        return kind[0]
    return opts.get("options", [None])[0] if kind == "COMBO" else None


DYNAMIC_COMBO = "COMFY_DYNAMICCOMBO_V3"  # V3's DynamicCombo: its chosen option's inputs follow it as "<combo>.<input>"
AUTOGROW = "COMFY_AUTOGROW_V3"  # V3's Autogrow: its sockets are "<input>.<slot name>"


def _autogrow_slots(name: str, opts: dict, values: dict) -> list[tuple[str, object, dict]]:
    """The sockets of an Autogrow input that `values` connects, in slot order (the frontend adds the empty one)."""
    template = opts["template"]
    (spec,) = [*template["input"].get("required", {}).values(), *template["input"].get("optional", {}).values()]
    slots = template.get("names") or [f"{template['prefix']}{i}" for i in range(template["max"])]
    return [(f"{name}.{slot}", spec[0], spec[1] if len(spec) > 1 else {}) for slot in slots
            if f"{name}.{slot}" in values]


def _inputs(cls, values: dict | None = None) -> list[tuple[str, object, dict]]:
    """(name, type, options) of every input in order; a DynamicCombo as a combo of its option keys, followed by the
    inputs of the option `values` chooses (the first by default), and an Autogrow as the sockets `values` connects,
    named as the frontend and the prompt name them."""
    it, values = cls.INPUT_TYPES(), values or {}
    out = []
    for group in ("required", "optional"):
        for name, spec in it.get(group, {}).items():
            kind, opts = spec[0], spec[1] if len(spec) > 1 else {}
            if kind == AUTOGROW:
                out.extend(_autogrow_slots(name, opts, values))
                continue
            if kind != DYNAMIC_COMBO:
                out.append((name, kind, opts))
                continue
            options = {o["key"]: o["inputs"] for o in opts["options"]}
            out.append((name, list(options), {k: v for k, v in opts.items() if k != "options"}))
            chosen = options[values.get(name, next(iter(options)))]
            for sub_group in ("required", "optional"):
                for sub, sub_spec in chosen.get(sub_group, {}).items():
                    out.append((f"{name}.{sub}", sub_spec[0], sub_spec[1] if len(sub_spec) > 1 else {}))
    return out


def _is_widget(kind, opts: dict | None = None) -> bool:
    if (opts or {}).get("forceInput"):
        return False  # a socket-only input of a widget type
    return isinstance(kind, list) or str(kind) in ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")


def build(nodes: list[N], mappings: dict) -> tuple[dict, dict]:
    """(UI workflow, API workflow) for a node list."""
    api, ui_nodes, links = {}, [], []
    out_links: dict[tuple[int, int], list[int]] = {}
    for n in nodes:
        cls = mappings[n.type]
        inputs = {}
        for name, kind, opts in _inputs(cls, n.values):
            if name in n.values:
                v = n.values[name]
                inputs[name] = [str(v[0]), v[1]] if isinstance(v, tuple) else v
            elif _is_widget(kind, opts):
                inputs[name] = _defaults((kind, opts))
        api[str(n.id)] = {"class_type": n.type, "inputs": inputs, "_meta": {"title": n.title or n.type}}
    for order, n in enumerate(nodes):
        cls = mappings[n.type]
        ui_inputs, widgets = [], []
        for name, kind, opts in _inputs(cls, n.values):
            v = api[str(n.id)]["inputs"].get(name)
            if isinstance(v, list) and not _is_widget(kind, opts):
                link_id = len(links) + 1
                src, slot = int(v[0]), v[1]
                src_type = mappings[next(x.type for x in nodes if x.id == src)].RETURN_TYPES[slot]
                links.append([link_id, src, slot, n.id, len(ui_inputs), src_type])
                out_links.setdefault((src, slot), []).append(link_id)
                ui_inputs.append({"name": name, "type": str(kind), "link": link_id})
            elif _is_widget(kind, opts):
                widgets.append(v)
                if opts.get("control_after_generate") or name in SEED_NAMES:
                    widgets.append("fixed")
        ui_nodes.append({"id": n.id, "type": n.type, "pos": [40 + 360 * (order // 3), 60 + 320 * (order % 3)],
                         "size": [320, 260], "flags": {}, "order": order, "mode": 0, "inputs": ui_inputs,
                         "outputs": [], "properties": {"Node name for S&R": n.type}, "widgets_values": widgets,
                         **({"title": n.title} if n.title else {})})
    for node, n in zip(ui_nodes, nodes, strict=True):
        cls = mappings[n.type]
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node["outputs"] = [{"name": str(names[i]), "type": str(t), "links": out_links.get((n.id, i), []),
                            "slot_index": i} for i, t in enumerate(cls.RETURN_TYPES)]
    ui = {"last_node_id": max(n.id for n in nodes), "last_link_id": len(links), "nodes": ui_nodes, "links": links,
          "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}
    return ui, api


def thumbnail(path: Path, nodes: list[N], api_format: bool = False, title: str | None = None) -> Path:
    """A card for ComfyUI's template browser, which shows `<workflow stem>.jpg` beside each example workflow."""
    from PIL import Image, ImageDraw, ImageFont

    from ..trainer.training.recipes import RECIPES

    trainer = next((n.values for n in nodes if n.type == "KleinLoRATrainer"), None)
    if trainer is not None:  # the recipe's values, or the custom ones
        r = RECIPES.get(trainer["recipe"])
        trainer = {"recipe": trainer["recipe"], **({k: getattr(r, k) for k in ("rank", "alpha", "learning_rate", "steps")}
                                                  if r else {k: trainer[f"recipe.{k}"] for k in ("rank", "alpha",
                                                                                                 "learning_rate", "steps")})}
    preset = next((n.values["preset"] for n in nodes if n.type == "KleinBlockTargetSelector"), None)
    w, h = 512, 384
    img = Image.new("RGB", (w, h), (24, 26, 32))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default
    d.rectangle([0, 0, w, 6], fill=(56, 189, 248))
    d.text((28, 30), "Klein LoRA Studio", font=font(26), fill=(160, 170, 185))
    d.text((28, 70), title or f"{trainer['recipe']} LoRA", font=font(54 if not title else 40), fill=(240, 244, 248))
    lines = ([f"rank {trainer['rank']} / alpha {trainer['alpha']:g}",
              f"lr {trainer['learning_rate']:g}, {trainer['steps']} steps", f"blocks: {preset}"] if trainer
             else ["weights 0.25 ... 1.0 of each LoRA", "then an exact merge"])
    lines.append("API format: run.py / POST /prompt" if api_format else "FLUX.2 [klein] Base 4B / 9B")
    for i, line in enumerate(lines):
        d.text((28, 150 + 30 * i), line, font=font(22), fill=(180, 190, 200))
    # a stylised falling loss curve: deterministic, so regenerating the cards changes nothing
    pts = [(330 + 7 * i, 340 - 120 * (0.25 + 0.75 * 0.88 ** i) + 6 * ((i * 7) % 5 - 2)) for i in range(26)]
    d.line(pts, fill=(56, 189, 248), width=3)
    img.save(path, "JPEG", quality=85)
    return path


def write_all(mappings: dict, out: Path = OUT) -> list[Path]:
    (out / "api").mkdir(parents=True, exist_ok=True)
    written = []
    for name, make in WORKFLOWS.items():
        nodes = make()
        ui, api = build(nodes, mappings)
        for path, data in ((out / f"{name}.json", ui), (out / "api" / f"{name}_api.json", api)):
            path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            written.append(path)
        title = None if name.endswith(tuple(f"_{r}_lora" for r in ("style", "character", "object"))) else \
            name.removeprefix("klein_").replace("_", " ")
        written.append(thumbnail(out / f"{name}.jpg", nodes, title=title))
    return written


def to_tiny(api: dict, dataset_folder: str, steps: int = 20, resolution: int = 64, save_every: int = 10,
            output_name: str | None = None, control_folder: str | None = None) -> dict:
    """The same graph on the tiny dev models (devtools.tiny_models) and a short schedule."""
    from .tiny_models import TE_FILE, UNET_FILE

    wf = copy.deepcopy(api)
    for node in wf.values():
        t, inp = node["class_type"], node["inputs"]
        if t == "UNETLoader":
            inp["unet_name"] = UNET_FILE
        elif t == "CLIPLoader":
            node["class_type"], node["inputs"] = "KleinTinyCLIPLoader", {"clip_name": TE_FILE}
        elif t == "VAELoader":
            inp["vae_name"] = "taef2"
        elif t == "KleinDatasetLoader":
            inp["folder"], inp["resolution"] = dataset_folder, resolution
            if inp.get("control_folder"):
                inp["control_folder"] = control_folder or ""
        elif t in ("KleinCheckpointSampler", "KleinRankStepsGrid", "KleinStrengthSweep"):
            inp.update(steps=2, resolution=resolution)
        elif t == "KleinLoRATrainer":
            from ..trainer.training.recipes import RECIPES

            r = RECIPES.get(inp["recipe"])  # the recipe's rank and alpha, set as custom values with a short run
            rank, alpha = (r.rank, r.alpha) if r else (inp["recipe.rank"], inp["recipe.alpha"])
            inp.update({"recipe": "custom", "recipe.rank": rank, "recipe.alpha": alpha, "recipe.learning_rate": 2e-3,
                        "recipe.steps": steps, "save_every": save_every, "sample_steps": 2})
            if output_name:
                inp["output_name"] = output_name if sum(n["class_type"] == t for n in wf.values()) == 1 else \
                    f"{output_name}_r{rank}"
    return wf


# ------------------------------------------------------------------ the micro-world sandbox (issue 16, item 8)
# Kept apart from WORKFLOWS: its dataset folder and trigger are links from Klein Micro World into the Dataset
# Loader's widgets, which build() does not write, so `sandbox_workflows` adds them to build()'s output.
SANDBOX_STEPS, SANDBOX_EVERY, SANDBOX_LR = 240, 80, 1.5e-3  # the H200 style run's learning rate (docs/quality.md)
SANDBOX_PROMPT = "a large red square at the center on a white background, in qzv style"


def micro_sandbox() -> list[N]:
    """A style LoRA on the micro klein models (Klein Micro World): the style recipe's rank, alpha and block preset
    at a learning rate for a 6.8M-parameter model, then one triggered sample through the stock sampler nodes."""
    from ..trainer.training.recipes import RECIPES

    r = RECIPES["style"]
    return [
        N(1, "KleinMicroWorld", {"concept": "style", "images": 24, "dataset_seed": 0}),
        N(2, "KleinDatasetLoader", {"folder": "klein_micro_style_24_s0", "trigger": "qzv", "resolution": 128,
                                    "vae": (1, 2), "clip": (1, 1)}),
        N(3, "KleinBlockTargetSelector", {"model": (1, 0), "preset": r.target_preset}),
        N(4, "KleinLoRATrainer", {"model": (1, 0), "dataset": (2, 0), "targets": (3, 0), "recipe": "custom",
                                  "recipe.rank": r.rank, "recipe.alpha": r.alpha, "recipe.learning_rate": SANDBOX_LR,
                                  "recipe.steps": SANDBOX_STEPS, "save_every": SANDBOX_EVERY,
                                  "output_name": "klein_micro_style", "clip": (1, 1), "vae": (1, 2), "sample_steps": 8}),
        N(5, "LossGraphNode", {"loss": (4, 3), "filename_prefix": "klein_micro_style_loss"}),
        N(6, "CLIPTextEncode", {"text": SANDBOX_PROMPT, "clip": (1, 1)}, title="prompt (with the trigger)"),
        N(7, "CLIPTextEncode", {"text": "", "clip": (1, 1)}, title="empty negative"),
        N(8, "EmptyFlux2LatentImage", {"width": 128, "height": 128, "batch_size": 1}),
        N(9, "KSamplerSelect", {"sampler_name": "euler"}),
        N(10, "Flux2Scheduler", {"steps": 20, "width": 128, "height": 128}),
        N(11, "SamplerCustom", {"model": (4, 0), "add_noise": True, "noise_seed": 0, "cfg": 4.0, "positive": (6, 0),
                                "negative": (7, 0), "sampler": (9, 0), "sigmas": (10, 0), "latent_image": (8, 0)}),
        N(12, "VAEDecode", {"samples": (11, 0), "vae": (1, 2)}),
        N(13, "SaveImage", {"images": (12, 0), "filename_prefix": "klein_micro_style_sample"}),
    ]


SANDBOX_WORKFLOWS = {"klein_micro_sandbox": micro_sandbox}
SANDBOX_WIDGET_LINKS = {"klein_micro_sandbox": {(2, "folder"): (1, 3), (2, "control_folder"): (1, 4),
                                                (2, "trigger"): (1, 5)}}


def link_widgets(ui: dict, api: dict, nodes: list[N], mappings: dict, links: dict) -> None:
    """Feed widgets from outputs, as the frontend saves a widget turned into an input: the API input becomes the
    link, the UI node gets an input marked with its widget (the widget keeps its value) and a link."""
    by_id = {n["id"]: n for n in ui["nodes"]}
    for (dst, name), (src, slot) in links.items():
        kind = str(mappings[next(x.type for x in nodes if x.id == src)].RETURN_TYPES[slot])
        api[str(dst)]["inputs"][name] = [str(src), slot]
        link_id = ui["last_link_id"] = ui["last_link_id"] + 1
        ui["links"].append([link_id, src, slot, dst, len(by_id[dst]["inputs"]), kind])
        by_id[dst]["inputs"].append({"name": name, "type": kind, "widget": {"name": name}, "link": link_id})
        by_id[src]["outputs"][slot]["links"].append(link_id)


def sandbox_workflows(mappings: dict) -> dict[str, tuple[list[N], dict, dict]]:
    """name -> (nodes, UI workflow, API workflow) of the sandbox workflows."""
    out = {}
    for name, make in SANDBOX_WORKFLOWS.items():
        nodes = make()
        ui, api = build(nodes, mappings)
        link_widgets(ui, api, nodes, mappings, SANDBOX_WIDGET_LINKS.get(name, {}))
        out[name] = (nodes, ui, api)
    return out


def write_sandbox(mappings: dict, out: Path = OUT) -> list[Path]:
    (out / "api").mkdir(parents=True, exist_ok=True)
    written = []
    for name, (nodes, ui, api) in sandbox_workflows(mappings).items():
        for path, data in ((out / f"{name}.json", ui), (out / "api" / f"{name}_api.json", api)):
            path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
            written.append(path)
        written.append(thumbnail(out / f"{name}.jpg", nodes, title="micro-world sandbox"))
    return written
# ------------------------------------------------------------------ end of the sandbox block


def _main() -> None:
    import asyncio
    import os

    from ..trainer.jobs import comfy_library

    nodes = comfy_library.boot(os.environ["COMFYUI_PATH"], cpu=True, builtin_nodes=True)
    from .. import nodes as pack_nodes

    ext = asyncio.run(pack_nodes.comfy_entrypoint())
    mappings = dict(nodes.NODE_CLASS_MAPPINGS)
    for cls in asyncio.run(ext.get_node_list()):
        mappings[cls.GET_SCHEMA().node_id] = cls
    for p in write_all(mappings) + write_sandbox(mappings):
        print(p)


if __name__ == "__main__":
    _main()
