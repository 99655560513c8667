"""The Doctor node inside a real ComfyUI: resolves the folder like the loader, returns the report and an IMAGE."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.comfy


def test_doctor_node_reports_and_returns_a_contact_sheet(comfy, base_dir):
    import folder_paths
    from klein_lora_studio.tests.test_doctor import on_plain_background, write

    folder = "doctor_node_set"
    write(base_dir / "input" / folder, {f"{i}.png": on_plain_background(i) for i in range(3)},
          captions={"0.png": "a thing"})
    write(base_dir / "input" / "doctor_node_ctrl", {"0.png": on_plain_background(9, size=64)}, caption=None)
    node = comfy.NODE_CLASS_MAPPINGS["KleinDatasetDoctor"]
    schema = node.GET_SCHEMA() if hasattr(node, "GET_SCHEMA") else node.define_schema()
    assert all(i.tooltip for i in schema.inputs), "every input needs a tooltip"
    out = node.execute(folder=folder, trigger="zxq", resolution=128, task="image-to-image",
                       control_folder="doctor_node_ctrl")
    report, sheet = out.args
    assert "only 1 pairs for image-to-image" in report  # 1 of 3 targets has a control partner
    assert "share one background colour" in report and "lack the trigger 'zxq'" in report
    assert "target 128x128, control 64x64" in report
    assert sheet.ndim == 4 and sheet.shape[0] == 1 and sheet.shape[-1] == 3
    assert out.ui is not None  # the sheet is previewed on the node
    assert folder_paths.get_input_directory() == str(base_dir / "input")
    with pytest.raises(ValueError, match="outside the allowed roots"):
        node.execute(folder="/etc", trigger="zxq", resolution=128, task="none", control_folder="")
