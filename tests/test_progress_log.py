"""The event recorder behind GET /klein_lora/history (no ComfyUI needed)."""
from __future__ import annotations

import importlib.util

import pytest
from klein_lora_studio.tests.conftest import REPO

# loaded by path: importing the nodes package would need ComfyUI, and the recorder does not
_spec = importlib.util.spec_from_file_location("klein_progress_log", REPO / "nodes" / "progress_log.py")
log = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(log)


@pytest.fixture(autouse=True)
def _clean():
    log.clear()
    yield
    log.clear()


def _progress(node: str, step: int, total: int = 10) -> None:
    log.record("klein_lora.progress", {"node": node, "step": step, "total": total, "loss": 1.0 / step})


def test_keeps_the_current_run_per_node_and_starts_over_when_steps_go_back():
    for s in (1, 2, 3):
        _progress("6", s)
    log.record("klein_lora.checkpoint", {"node": "6", "step": 3, "path": "/x/a.safetensors"})
    _progress("9", 1)
    assert [e["data"].get("step") for e in log.events("6")] == [1, 2, 3, 3]
    assert len(log.events()) == 5 and [e["t"] for e in log.events()] == sorted(e["t"] for e in log.events())
    _progress("6", 1)  # a new run on node 6
    assert [e["data"]["step"] for e in log.events("6")] == [1]
    assert len(log.events("9")) == 1


def test_recorded_data_is_a_copy():
    data = {"node": "6", "step": 1, "total": 2, "loss": 0.5}
    log.record("klein_lora.progress", data)
    data["loss"] = 99.0
    assert log.events("6")[0]["data"]["loss"] == 0.5


def test_long_runs_are_thinned_but_keep_checkpoints_and_the_latest_points(monkeypatch):
    monkeypatch.setattr(log, "MAX_EVENTS", 100)
    for s in range(1, 301):
        _progress("6", s, total=300)
        if s % 50 == 0:
            log.record("klein_lora.checkpoint", {"node": "6", "step": s, "path": f"c{s}"})
    events = log.events("6")
    assert len(events) <= 100
    assert [e["data"]["step"] for e in events if e["event"].endswith("checkpoint")] == [50, 100, 150, 200, 250, 300]
    steps = [e["data"]["step"] for e in events if e["event"].endswith("progress")]
    assert steps == sorted(steps) and steps[-1] == 300 and steps[0] == 1
