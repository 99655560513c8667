"""The example workflows on disk are what devtools/workflows.py writes from the live node definitions."""
import asyncio
import json

import pytest
from klein_lora_studio.devtools import workflows as wf

pytestmark = pytest.mark.comfy


def test_example_workflows_are_up_to_date(comfy):
    from klein_lora_studio import nodes as pack_nodes

    mappings = dict(comfy.NODE_CLASS_MAPPINGS)
    for cls in asyncio.run(asyncio.run(pack_nodes.comfy_entrypoint()).get_node_list()):
        mappings[cls.GET_SCHEMA().node_id] = cls
    for name, make in wf.WORKFLOWS.items():
        ui, api = wf.build(make(), mappings)
        assert json.loads((wf.OUT / f"{name}.json").read_text()) == ui, f"run devtools.workflows: {name} is stale"
        assert json.loads(wf.api_path(name).read_text()) == api, f"{name}_api is stale"
