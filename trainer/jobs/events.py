"""The job protocol: a run's progress as JSON lines on stdout, written by the child, read by the parent.

One object per event, its kind under EVENT_KEY (start, step, checkpoint, samples, warning, done, error);
any other line on stdout (ComfyUI's own messages) is not such an object and is passed over. Both sides
import only this module: the child (trainer/jobs/runner.py, train.py) and the parent (trainer/jobs/launch.py).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

EVENT_KEY = "klein_lora"
PACKAGE = "klein_lora_studio"  # the import name a child process finds the pack under
PACK_DIR = Path(__file__).resolve().parents[2]  # the pack's folder (trainer/jobs/ is two levels below it)


def emit_line(event: str, **data) -> None:
    """One progress event as a JSON line on stdout."""
    sys.stdout.write(json.dumps({EVENT_KEY: event, **data}) + "\n")
    sys.stdout.flush()


def parse_event(line: str) -> dict | None:
    """The event of a progress line, None for any other output."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return obj if isinstance(obj, dict) and EVENT_KEY in obj else None
