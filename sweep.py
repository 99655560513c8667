"""Run a sweep of a run config as independent jobs over the GPUs: `python -m klein_lora_studio.sweep CONFIG
--set rank=8,16 --set learning_rate=1e-4,3e-4 --gpus 0,1`.

Every combination of the --set values is one job (its own config, output name and LoRA), run with
`python -m klein_lora_studio.train` on one slot of --gpus (a GPU, or "0+1" for a data-parallel pair)
while the other slots run others. The manifest (sweep.json, beside the job configs) lists each job's
status, LoRA and checkpoints; the Rank x Steps Grid node reads it (sweep_manifest).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m klein_lora_studio.sweep", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="base run config (.json/.yaml), e.g. the trainer node's export")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=V1,V2",
                        help="a train field (rank, learning_rate, steps, ...) or section.field and its values")
    parser.add_argument("--gpus", default="0", help="job slots: '0,1' one job per GPU; '0+1' a data-parallel pair; "
                                                    "'cpu,cpu' two CPU slots (tests)")
    parser.add_argument("--out", default=None, help="folder for the job configs and sweep.json (default: sweep/ "
                                                    "beside the config)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(message)s")
    from .trainer.jobs import sweep as job_queue

    try:
        sets = job_queue.parse_sets(args.set)
        slots = job_queue.parse_slots(args.gpus)

        def show(job: dict, event: dict) -> None:
            if event["klein_lora"] in ("done", "error") or event.get("step") == event.get("total"):
                print(json.dumps({"job": job["name"], **event}), flush=True)

        manifest = job_queue.run_sweep(args.config, sets, slots, args.out, show)
    except ValueError as e:
        logging.error("Klein LoRA sweep: %s", e)
        return 2
    data = json.loads(manifest.read_text())
    failed = [j["name"] for j in data["jobs"] if j["status"] != "done"]
    print(json.dumps({"klein_lora": "sweep", "manifest": str(manifest), "jobs": len(data["jobs"]), "failed": failed}),
          flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
