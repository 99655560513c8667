"""Queue-time checks of what ComfyUI's own validation cannot see: the model behind a linked MODEL.

ComfyUI validates widget values when a prompt is queued; a linked MODEL has no value until the graph
runs. So an on_prompt handler (it sees the whole prompt of every POST /prompt) follows each trainer's
and target selector's MODEL link back to its loader (UNETLoader or CheckpointLoaderSimple, through
LoRA loaders), reads the file's safetensors header (trainer/model/model_check.py: names and shapes, cached)
and works out whether it is klein and whether the trainer's rank fits the targeted layers.

ComfyUI swallows exceptions raised in on_prompt handlers, so the handler only records its findings,
in a ContextVar of the request (the POST /prompt handler awaits validate_prompt in the same asyncio
task right after the handlers run), and the nodes' `validate_inputs` turn a finding into a
validation error on the right node. Nothing is written into the prompt, so a submitted prompt
cannot plant or hide a finding. A MODEL whose source cannot be traced (another loader, a node in
between that is not a LoRA loader) gets no finding: the run-time checks (loop.check_klein,
lora.check_rank) still stand.
"""
from __future__ import annotations

import logging
from contextvars import ContextVar
from dataclasses import dataclass

from ..trainer.lora import layers as lora
from ..trainer.model import model_check
from ..trainer.model import targets as tg
from ..trainer.training import recipes
from .web_routes import install_once

TRAINER, SELECTOR = "KleinLoRATrainer", "KleinBlockTargetSelector"
# loader class -> (file widget, models folder, display name); their output 0 is the MODEL
LOADERS = {"UNETLoader": ("unet_name", "diffusion_models", "Load Diffusion Model"),
           "CheckpointLoaderSimple": ("ckpt_name", "checkpoints", "Load Checkpoint")}
# nodes whose output 0 is their `model` input with something applied: the architecture is unchanged
PASS_THROUGH = {"LoraLoaderModelOnly": "model", "LoraLoader": "model", TRAINER: "model"}

_findings: ContextVar[dict[str, str] | None] = ContextVar("klein_lora_queue_findings", default=None)


@dataclass(frozen=True)
class ModelSource:
    node: str  # the loader's node id
    loader: str  # its display name
    file: str  # the file name as chosen in the loader
    facts: model_check.ModelFacts


def _is_link(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and isinstance(v[1], int)


def trace_model(prompt: dict, link) -> ModelSource | None:
    """The loader file behind a MODEL link, through LoRA loaders; None when it cannot be known at queue time."""
    import folder_paths

    seen = set()
    while _is_link(link) and str(link[0]) not in seen:
        nid = str(link[0])
        seen.add(nid)
        node = prompt.get(nid)
        if not isinstance(node, dict) or link[1] != 0:
            return None
        kind, inputs = node.get("class_type"), node.get("inputs") or {}
        if kind in PASS_THROUGH:
            link = inputs.get(PASS_THROUGH[kind])
            continue
        if kind not in LOADERS:
            return None
        widget, folder, title = LOADERS[kind]
        name = inputs.get(widget)
        path = folder_paths.get_full_path(folder, name) if isinstance(name, str) else None
        if path is None:  # not a file of that folder: the loader's own validation says so
            return None
        facts = model_check.file_facts(path)
        return ModelSource(nid, title, name, facts) if facts is not None else None
    return None


def _as_int(v) -> int | None:
    if isinstance(v, bool) or _is_link(v):
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _rank_problem(prompt: dict, inputs: dict, src: ModelSource) -> str | None:
    """The trainer's effective rank against the widths of the layers its selector targets in that model."""
    recipe = inputs.get("recipe")  # a DynamicCombo: its 'custom' option's rank comes as "recipe.rank"
    rank = _as_int(inputs.get("recipe.rank", inputs.get("rank")))
    sel = prompt.get(str(inputs["targets"][0])) if _is_link(inputs.get("targets")) else None
    if inputs.get("adapter") == "lokr":  # LoKr's rank sizes a Kronecker factor, not the layer (lora.check_rank)
        return None
    if not isinstance(recipe, str) or (rank is None and recipe == recipes.CUSTOM) or not isinstance(sel, dict) \
            or sel.get("class_type") != SELECTOR:
        return None
    w = sel.get("inputs") or {}
    switches = tuple(w.get(k) for k in ("double_blocks", "single_early", "single_mid", "single_late"))
    values = (w.get("preset"), w.get("layers"), w.get("streams"))
    if not all(isinstance(s, bool) for s in switches) or not all(isinstance(v, str) for v in values):
        return None
    try:
        rank = recipes.apply_recipe(recipe, rank or 1, 1.0, 1e-4, 1)[0]
        groups, layers, streams = tg.selection(values[0], switches, values[1], values[2])
        facts = src.facts
        targets = tg.resolve_targets(groups, layers, tg.BlockCounts(facts.double, facts.single), streams,
                                     set(facts.linears))
    except (KeyError, ValueError):  # an unknown preset or an empty selection: the selector reports it when it runs
        return None
    if any(m not in facts.widths for m in targets.modules):  # packed weights: widths unknown
        return None
    problem = lora.rank_problem(rank, {m: facts.widths[m] for m in targets.modules})
    if problem is None:
        return None
    via = f" (recipe '{recipe}' sets rank {rank}; choose recipe 'custom' to set your own)" if recipe != recipes.CUSTOM else ""
    return f"{problem[:-1]}{via}. The MODEL is '{src.file}' ({src.facts.describe()})."


def findings(prompt: dict) -> dict[str, str]:
    """{node id: the queue-time error} for the trainers and target selectors of an API-format prompt."""
    out = {}
    for nid, node in prompt.items():
        kind = node.get("class_type") if isinstance(node, dict) else None
        if kind not in (TRAINER, SELECTOR):
            continue
        inputs = node.get("inputs") or {}
        src = trace_model(prompt, inputs.get("model"))
        if src is None:
            continue
        problem = model_check.model_problem(src.facts, src.file, f"node {src.node}, {src.loader}")
        if problem is None and kind == TRAINER:
            problem = _rank_problem(prompt, inputs, src)
        if problem is not None:
            out[str(nid)] = problem
    return out


def notices(prompt: dict) -> dict[str, str]:
    """{trainer node id: a warning that must not block the prompt}: a base named as the distilled klein."""
    out = {}
    for nid, node in prompt.items():
        if not isinstance(node, dict) or node.get("class_type") != TRAINER:
            continue
        src = trace_model(prompt, (node.get("inputs") or {}).get("model"))
        note = model_check.distilled_warning(src.file, f"node {src.node}, {src.loader}") if src else None
        if note is not None:
            out[str(nid)] = note
    return out


def on_prompt(json_data):
    """ComfyUI's on_prompt hook: record this request's findings; the prompt itself is passed on untouched."""
    _findings.set({})  # first, so nothing of an earlier request on this context can carry over
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if isinstance(prompt, dict):
        try:
            _findings.set(findings(prompt))
            for nid, note in notices(prompt).items():
                logging.warning("Klein LoRA: trainer node %s: %s", nid, note)
        except Exception:  # noqa: BLE001 - a check that breaks must not block a prompt: run time still checks
            logging.warning("Klein LoRA: the queue-time model check failed; the run will check instead", exc_info=True)
    return json_data


def problem(node_cls) -> str | None:
    """The finding for the node being validated (`node_cls` is the V3 class clone carrying its unique_id)."""
    hidden = getattr(node_cls, "hidden", None)
    node_id = getattr(hidden, "unique_id", None) if hidden is not None else None
    return (_findings.get() or {}).get(str(node_id)) if node_id is not None else None


def register() -> bool:
    """Add the on_prompt handler once; False when no server runs (library use)."""
    return install_once("queue-time model check", lambda server: server.add_on_prompt_handler(on_prompt))
