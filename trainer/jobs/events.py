"""The job protocol: a run's progress as JSON lines on stdout, written by the child, read by the parent.

One object per event, its kind under EVENT_KEY (start, step, checkpoint, samples, warning, done, error;
stopping at the peak also begin, await_verdict, stopped); any other line on stdout (ComfyUI's own messages)
is not such an object and is passed over. Both sides import only this module: the child (trainer/jobs/
runner.py, train.py) and the parent (trainer/jobs/launch.py, session.py).

The one message the other way: a child started with --await-verdicts stops after each checkpoint but the
last (event await_verdict) until the parent, which samples and judges the checkpoints, writes the verdict
on the child's stdin: {EVENT_KEY: "verdict", "step": N, "stop": null or the StopDecision's fields}.
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


def verdict_line(step: int, decision) -> str:
    """The parent's answer to await_verdict: go on (decision None) or stop (a StopDecision)."""
    return json.dumps({EVENT_KEY: "verdict", "step": step,
                       "stop": decision.to_dict() if decision is not None else None}) + "\n"


def read_verdict(stream, step: int) -> dict | None:
    """The child side: wait for the verdict on checkpoint `step`; the StopDecision's fields, or None to go on.
    A parent gone (end of input) means no one judges the run any more: it goes on to its last step."""
    while line := stream.readline():
        obj = parse_event(line)
        if obj is not None and obj[EVENT_KEY] == "verdict" and obj.get("step") == step:
            return obj.get("stop")
    return None
