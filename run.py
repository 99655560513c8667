"""Run an API-format workflow on a running ComfyUI and follow it in the terminal.

    python -m klein_lora_studio.run WORKFLOW_API.json [--server http://127.0.0.1:8188]
                                   [--set NODE.INPUT=VALUE ...]

Posts the graph (POST /prompt), follows ComfyUI's websocket (progress, the trainer's loss events,
errors), prints the output files from /history and exits non-zero with ComfyUI's own error text
when the graph is invalid (1) or a node fails (2). `--set 7.steps=800` overrides an input of node
"7" (or of the node whose title or class_type is given), so a sweep needs no JSON editing.
Standard library + aiohttp (a ComfyUI requirement) only: it must not import torch or ComfyUI.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path


def apply_overrides(workflow: dict, sets: list[str]) -> dict:
    for item in sets:
        target, _, raw = item.partition("=")
        node, _, name = target.rpartition(".")
        if not node or not name or not _:
            raise SystemExit(f"--set '{item}' is not NODE.INPUT=VALUE")
        ids = [k for k, v in workflow.items()
               if k == node or v.get("class_type") == node or v.get("_meta", {}).get("title") == node]
        if not ids:
            raise SystemExit(f"--set '{item}': no node with id, class_type or title '{node}'")
        try:
            value = json.loads(raw)
        except ValueError:
            value = raw
        for k in ids:
            workflow[k]["inputs"][name] = value
    return workflow


def _bar(step: int, total: int, width: int = 30) -> str:
    filled = int(width * step / max(total, 1))
    return "[" + "#" * filled + "." * (width - filled) + f"] {step}/{total}"


async def run(workflow: dict, server: str, out=sys.stdout) -> int:
    import aiohttp

    client = uuid.uuid4().hex
    ws_url = server.replace("http", "ws", 1) + f"/ws?clientId={client}"
    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        async with session.post(server + "/prompt", json={"prompt": workflow, "client_id": client}) as r:
            body = await r.json()
            if r.status != 200:
                print(f"ComfyUI refused the workflow: {json.dumps(body.get('error', body), indent=1)}", file=out)
                for node, err in body.get("node_errors", {}).items():
                    for e in err.get("errors", []):
                        print(f"  node {node} ({err.get('class_type')}): {e.get('message')}: {e.get('details')}", file=out)
                return 1
        prompt_id = body["prompt_id"]
        print(f"queued {prompt_id}", file=out)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            m = json.loads(msg.data)
            kind, data = m.get("type"), m.get("data", {})
            if data.get("prompt_id") not in (None, prompt_id):
                continue
            if kind == "klein_lora.progress":
                print(f"\rtrain {_bar(data['step'], data['total'])} loss {data['loss']:.4f}", end="", file=out, flush=True)
                if data["step"] == data["total"]:
                    print(file=out)
            elif kind == "executing" and data.get("node"):
                print(f"running node {data['node']}", file=out)
            elif kind == "execution_error":
                print(f"\nnode {data.get('node_id')} ({data.get('node_type')}) failed: {data.get('exception_message')}",
                      file=out)
                return 2
            elif kind == "execution_interrupted":
                print("\ninterrupted", file=out)
                return 3
            elif kind == "executing" and data.get("node") is None:
                # not "execution_success": ComfyUI sends it before it stores the history (main.py task_done),
                # so /history raced and came back empty; "executing None" follows the store
                break
        history = {}
        for _ in range(50):  # the history entry lands just after the last websocket message
            async with session.get(f"{server}/history/{prompt_id}") as r:
                history = (await r.json()).get(prompt_id, {})
            if history.get("status", {}).get("completed") or history.get("outputs"):
                break
            await asyncio.sleep(0.1)
    for node, outputs in history.get("outputs", {}).items():
        for key, values in outputs.items():
            for v in values if isinstance(values, list) else [values]:
                print(f"output {node}.{key}: {v if not isinstance(v, dict) else v.get('filename', v)}", file=out)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("workflow", type=Path, help="API-format workflow JSON (ComfyUI: Export (API))")
    ap.add_argument("--server", default="http://127.0.0.1:8188")
    ap.add_argument("--set", action="append", default=[], metavar="NODE.INPUT=VALUE")
    args = ap.parse_args(argv)
    workflow = apply_overrides(json.loads(args.workflow.read_text(encoding="utf-8")), args.set)
    return asyncio.run(run(workflow, args.server.rstrip("/")))


if __name__ == "__main__":
    sys.exit(main())
