"""Every node the pack registers in ComfyUI, read from its V3 schema: a tooltip on each input and output.

The nodes are the ones ComfyUI's own loader registered for the pack (the `comfy` fixture loads it as a custom
node), so a node added later is checked without being listed here.
"""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfy


def _pack_nodes(comfy) -> dict[str, type]:
    """{node id: class} of the pack's nodes in ComfyUI's registry; the dev nodes (tests only) left out."""
    from klein_lora_studio.devtools.nodes import DEV_NODES

    dev = {n.GET_SCHEMA().node_id for n in DEV_NODES}
    return {nid: cls for nid, cls in comfy.NODE_CLASS_MAPPINGS.items()
            if getattr(cls, "RELATIVE_PYTHON_MODULE", "").endswith("klein_lora_studio") and nid not in dev}


def _untipped(schema) -> list[str]:
    """The inputs (nested ones of DynamicCombo options and Autogrow templates too) and outputs without a tooltip."""
    missing = []
    for top in schema.inputs:
        for item in top.get_all():  # [the input, *its dynamic inputs]
            if not (item.tooltip or "").strip():
                missing.append(f"input {item.id}")
    for i, out in enumerate(schema.outputs):
        if not (out.tooltip or "").strip():
            missing.append(f"output {out.display_name or out.id or i}")
    return missing


def test_every_input_and_output_of_every_node_has_a_tooltip(comfy):
    nodes = _pack_nodes(comfy)
    assert {"KleinLoRATrainer", "KleinBlockTargetSelector", "KleinDatasetLoader", "KleinLoRAMerge"} <= set(nodes), \
        sorted(nodes)
    missing = {nid: m for nid, cls in sorted(nodes.items()) if (m := _untipped(cls.GET_SCHEMA()))}
    assert not missing, "without a tooltip:\n" + "\n".join(f"  {nid}: {', '.join(m)}" for nid, m in missing.items())
