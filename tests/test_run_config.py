"""Run configs as pydantic models: field-path errors in the pack's words, strict file types, the JSON Schema."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import klein_lora_studio
import pytest
from klein_lora_studio.trainer.jobs import config as run_config
from klein_lora_studio.trainer.training.loop import TrainConfig

BASE = {"version": 1, "model": {"file": "m.safetensors"}, "dataset": {"encoded": "x.safetensors"},
        "train": {"rank": 4, "alpha": 4, "learning_rate": 1e-4, "steps": 10}}


def _error(change: dict) -> str:
    with pytest.raises(run_config.ConfigError) as e:
        run_config.from_dict({**BASE, **change}, "run.json")
    return str(e.value)


def test_every_bad_field_is_named_by_its_path_in_one_error():
    msg = _error({"dataset": {"encoded": "x", "clip": ["qwen.safetensors", 3], "resolution": 8, "bucketing": 1},
                  "sampling": {"sample_steps": 0}, "train": {**BASE["train"], "seed": 1.5}})
    assert msg.startswith("run.json: 5 problems:\n"), msg
    for line in ("dataset.clip[1] must be text, not 3.", "dataset.resolution 8: use a multiple of 16, at least 64.",
                 "dataset.bucketing must be true or false, not 1.", "sampling.sample_steps 0: use 1 or more.",
                 "train.seed must be a whole number, not 1.5."):
        assert f"\n  - {line}" in msg, (line, msg)


@pytest.mark.parametrize(("change", "expected"), [
    ({"model": 3}, "run.json: model must be a mapping of fields, not int."),
    ({"model": {"file": "m", "size": "4b"}}, "run.json: model: unknown field(s) ['size']; known: ['file', 'weight_dtype']."),
    ({"train": {"rank": 4}}, "run.json: train: missing field(s) ['alpha', 'learning_rate', 'steps']."),
    ({"targets": {"groups": "double", "layers": "mlp"}},
     "run.json: targets.layers 'mlp' is not one of ['attention', 'attention_mlp', 'all_linears']."),
    ({"dataset": {"encoded": "x", "caption_dropout": 1}}, "run.json: dataset.caption_dropout 1.0: use a value in [0, 1)."),
    ({"version": "1"}, "run.json: version must be a whole number, not '1'."),
])
def test_one_bad_field_gives_one_line_naming_it(change, expected):
    assert _error(change) == expected


def test_a_file_is_read_strictly_and_the_node_objects_construct_it():
    cfg = run_config.from_dict({**BASE, "targets": {"groups": "double"}, "sampling": {"clip": "c", "vae": "v"}})
    assert isinstance(cfg.train, TrainConfig) and cfg.train.alpha == 4.0 and isinstance(cfg.train.alpha, float)
    assert cfg.targets.groups == ["double"] and cfg.sampling.clip == ["c"] and cfg.sampling.enabled
    again = run_config.from_dict(json.loads(cfg.to_json()))
    assert again == cfg and again.to_dict()["train"] == dataclasses.asdict(cfg.train)
    built = run_config.RunConfig(model=run_config.ModelSpec(file="m.safetensors"),  # as trainer/jobs/export.py does
                                 dataset=run_config.DatasetSpec(encoded="x.safetensors"),
                                 train=TrainConfig(rank=4, alpha=4.0, learning_rate=1e-4, steps=10))
    assert built == run_config.from_dict(BASE) and built.version == run_config.VERSION
    built.train.steps = 0  # set after construction (train.py sets resume_from so): save checks again
    with pytest.raises(run_config.ConfigError, match="config: train: steps is 0"):
        built.validate()
    with pytest.raises(run_config.ConfigError, match=r"overrides: train.rank must be a whole number, not '8'"):
        run_config.with_overrides(cfg, {"rank": "8"})


def test_yaml_and_json_files_read_the_same(tmp_path):
    yaml = pytest.importorskip("yaml")
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(BASE), encoding="utf-8")
    (tmp_path / "run.json").write_text(json.dumps(BASE), encoding="utf-8")
    assert run_config.load(tmp_path / "run.yaml") == run_config.load(tmp_path / "run.json")
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({**BASE, "train": {**BASE["train"], "rnak": 8}}))
    with pytest.raises(run_config.ConfigError, match=r"bad.yaml: train: unknown field\(s\) \['rnak'\]"):
        run_config.load(tmp_path / "bad.yaml")


def test_schema_flag_prints_the_json_schema_of_every_section():
    root = Path(klein_lora_studio.__file__).parent.parent  # where the package name resolves
    out = subprocess.run([sys.executable, "-m", "klein_lora_studio.train", "--schema"], capture_output=True, text=True,
                         timeout=120, cwd=root, env=dict(os.environ, PYTHONPATH=str(root)))
    assert out.returncode == 0, out.stderr[-2000:]
    schema = json.loads(out.stdout)
    assert schema == run_config.json_schema()
    assert set(schema["required"]) == {"version", "model", "dataset", "train"}
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    for name, model in run_config.SECTIONS.items():
        section = defs[model.__name__]
        assert section["additionalProperties"] is False, name
        assert set(section["properties"]) == set(model.model_fields), name
    assert set(defs["TrainSection"]["properties"]) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert set(defs["TrainSection"]["required"]) == {"rank", "alpha", "learning_rate", "steps"}
    assert defs["ModelSpec"]["properties"]["weight_dtype"]["enum"] == list(run_config.WEIGHT_DTYPES)
    resolution = defs["DatasetSpec"]["properties"]["resolution"]
    assert (resolution["type"], resolution["minimum"], resolution["multipleOf"]) == ("integer", 64, 16)
