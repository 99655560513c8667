"""In-memory log of the pack's websocket events, so a page reloaded mid-run can replay the chart.

ComfyUI's websocket only delivers events to pages that are connected when they are sent; the trainer's
progress would be lost on a reload. Every event the pack sends is `record`ed (nodes/lora_trainer.py
`_send`), which keeps a copy here (per trainer node, the current or last run only) and pushes it to
the page. `GET /klein_lora/history`
(nodes/web_routes.py) returns `events()`. Nothing here knows about training: it stores small dicts.
"""
from __future__ import annotations

import threading
import time

MAX_EVENTS = 20000  # per node; past it the oldest half of the progress points is thinned

_lock = threading.Lock()
_runs: dict[str, list[dict]] = {}  # node id -> [{"event", "data", "t"}] of its current/last run
_last_step: dict[str, int] = {}


def record(event: str, data: dict) -> None:
    """Keep `data` for replay. A progress step that does not move forward starts a new run for its node."""
    node = str(data.get("node"))
    step = data.get("step")
    with _lock:
        if event.endswith(".progress") and isinstance(step, int):
            if step <= _last_step.get(node, 0):
                _runs.pop(node, None)
            _last_step[node] = step
        log = _runs.setdefault(node, [])
        log.append({"event": event, "data": dict(data), "t": time.time()})
        if len(log) > MAX_EVENTS:
            _thin(log)


def _thin(log: list[dict]) -> None:
    """Drop every other progress point in the older half (checkpoints, samples and validation stay)."""
    half = len(log) // 2
    old = [e for i, e in enumerate(log[:half]) if not e["event"].endswith(".progress") or i % 2 == 0]
    log[:] = old + log[half:]


def events(node: str | None = None) -> list[dict]:
    """The recorded events in order, for one node or all of them."""
    with _lock:
        if node is not None:
            return list(_runs.get(str(node), []))
        merged = [e for log in _runs.values() for e in log]
    return sorted(merged, key=lambda e: e["t"])


def clear() -> None:
    with _lock:
        _runs.clear()
        _last_step.clear()
