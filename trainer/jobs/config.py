"""A training run as a plain file (JSON or YAML): what the trainer node exports and `python -m <pack>.train` runs.

    {"version": 1,
     "comfyui":  {"path": ".../ComfyUI", "base_directory": "..."},          # optional; env / CLI override
     "model":    {"file": "flux-2-klein-base-4b.safetensors", "weight_dtype": "default"},
     "dataset":  {"encoded": "klein_lora_runs/<name>/dataset.safetensors"}  # or folder + vae + clip (below)
     "targets":  {"groups": ["double", ...], "layers": "attention", "streams": "both", "modules": [...]},
     "train":    {TrainConfig's fields: rank, alpha, learning_rate, steps, batch_size, seed, ...},
     "sampling": {"clip": ["qwen_3_4b.safetensors"], "clip_type": "flux2", "vae": "flux2-vae.safetensors",
                  "sample_steps": 20}}                                       # optional

Model, clip and vae files are names in ComfyUI's model folders or absolute paths. `dataset.encoded` is the
encoded dataset the node exported (trainer/data/dataset_file.py), relative to ComfyUI's output folder; without
it the run encodes `dataset.folder` (relative to ComfyUI's input folder, as the Dataset Loader resolves it)
with `dataset.vae` and `dataset.clip`, through the same latent/text cache. The LoRA, checkpoints and states go
to models/loras under `train.output_name`, as the node's do.

The sections are pydantic models (`extra="forbid"`; a file is read in strict mode, so "8" is not a rank);
`json_schema()` is their JSON Schema (`python -m <pack>.train --schema`). Every error names the field's path
and what to do: pydantic's errors are reworded by `describe`, the pack's own rules raise their advice.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from ..model import targets as tg
from ..paths import safe_name
from ..training.config import TrainConfig

VERSION = 1
RUNS_FOLDER = "klein_lora_runs"  # under ComfyUI's output folder: exported configs and encoded datasets
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # UNETLoader's choices
DEV_CLIP_TYPE = "klein_tiny_dev"  # the tests' tiny text encoder (devtools), only with KLEIN_LORA_DEV_NODES=1


class ConfigError(ValueError):
    pass


# ------------------------------------------------------------------ field rules: advice without the field's path

def _section_problem(message: str) -> PydanticCustomError:
    """A rule over several fields of a section: its message names the fields itself (no path is prefixed)."""
    return PydanticCustomError("klein_section", "{message}", {"message": message})


def _rule(kind: type, ok: Callable[[Any], bool], advice: str, **schema) -> Any:
    """`kind` failing with '<path> <value>: <advice>' unless ok(value); `schema` shows the rule in the JSON Schema."""
    def check(value):
        if not ok(value):
            raise ValueError(f"{value}: {advice}")
        return value

    return Annotated[kind, AfterValidator(check), Field(json_schema_extra=schema)]


def _one_of(options: tuple[str, ...]) -> Any:
    def check(value: str) -> str:
        if value not in options:
            raise ValueError(f"'{value}' is not one of {list(options)}.")
        return value

    return Annotated[str, AfterValidator(check), Field(json_schema_extra={"enum": list(options)})]


def _not_empty(advice: str) -> Any:
    def check(value: str) -> str:
        if not value.strip():
            raise ValueError(f"is empty: {advice}")
        return value

    return Annotated[str, AfterValidator(check)]


def _as_list(value):
    return [value] if isinstance(value, str) else value


Names = Annotated[list[str], BeforeValidator(_as_list)]  # a single name is a list of one
AtLeastOne = _rule(int, lambda v: v >= 1, "use 1 or more.", minimum=1)
ModelFile = _not_empty("name the klein Base diffusion model (a file in models/diffusion_models or an absolute path).")
Resolution = _rule(int, lambda v: v >= 64 and v % 16 == 0, "use a multiple of 16, at least 64.", minimum=64,
                   multipleOf=16)
WeightDtype = _one_of(WEIGHT_DTYPES)
LayerKind = _one_of(tg.LAYER_KINDS)
Stream = _one_of(tg.STREAMS)
Dropout = _rule(float, lambda v: 0.0 <= v < 1.0, "use a value in [0, 1).", minimum=0, exclusiveMaximum=1)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ------------------------------------------------------------------ the sections

class ModelSpec(_Section):
    file: ModelFile
    weight_dtype: WeightDtype = "default"


class DatasetSpec(_Section):
    encoded: str = ""
    folder: str = ""
    trigger: str = ""
    resolution: Resolution = 1024
    control_folder: str = ""
    bucketing: bool = True
    repeats: AtLeastOne = 1
    caption_dropout: Dropout = 0.0
    shuffle_tags: bool = False
    use_cache: bool = True
    vae: str = ""
    clip: Names = Field(default_factory=list)
    clip_type: str = "flux2"

    @model_validator(mode="after")
    def _encoded_or_encodable(self) -> DatasetSpec:
        if not self.encoded and not self.folder:
            raise _section_problem("dataset: give dataset.encoded (an exported encoded dataset) or dataset.folder "
                                   "with dataset.vae and dataset.clip to encode it.")
        if not self.encoded and not (self.vae and self.clip):
            raise _section_problem(f"dataset.folder '{self.folder}' needs dataset.vae and dataset.clip (model files) "
                                   "to be encoded; or export the run from the trainer node, which writes "
                                   "dataset.encoded.")
        return self


class TargetSpec(_Section):
    groups: Names = Field(default_factory=lambda: list(tg.GROUPS),
                          json_schema_extra={"items": {"type": "string", "enum": list(tg.GROUPS)}})
    layers: LayerKind = "attention"
    streams: Stream = "both"
    modules: Names = Field(default_factory=list)  # when given, exactly these (checked against the model)

    @model_validator(mode="after")
    def _known_groups(self) -> TargetSpec:
        unknown = [g for g in self.groups if g not in tg.GROUPS]
        if unknown or not (self.groups or self.modules):
            raise _section_problem(f"targets.groups {self.groups}: choose one or more of {list(tg.GROUPS)}.")
        return self


class SamplingSpec(_Section):
    clip: Names = Field(default_factory=list)
    clip_type: str = "flux2"
    vae: str = ""
    sample_steps: AtLeastOne = 20

    @property
    def enabled(self) -> bool:
        return bool(self.clip and self.vae)

    @model_validator(mode="after")
    def _both_or_neither(self) -> SamplingSpec:
        if bool(self.clip) != bool(self.vae):
            raise _section_problem("sampling: give both sampling.clip and sampling.vae to sample checkpoints, or "
                                   "neither.")
        return self


class ComfySpec(_Section):
    path: str = ""
    base_directory: str = ""


# ------------------------------------------------------------------ train: TrainConfig's own fields

def _train_section() -> type[BaseModel]:
    """The train section's model, made from TrainConfig's fields: their names, types and defaults live there."""
    hints = typing.get_type_hints(TrainConfig)
    fields = {}
    for f in dataclasses.fields(TrainConfig):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = Field(default_factory=f.default_factory)
        else:
            default = ...
        fields[f.name] = (hints[f.name], default)
    # strict here too: the section is validated on its own (train_config), outside the file's strict call
    return create_model("TrainSection", __config__=ConfigDict(extra="forbid", strict=True), **fields)


TrainSection = _train_section()


def train_config(raw) -> TrainConfig:
    """The train section as the loop's TrainConfig, checked by its own rules and the LoRA file-name rule."""
    cfg = raw if isinstance(raw, TrainConfig) else TrainConfig(**TrainSection.model_validate(raw).model_dump())
    try:
        cfg.validate()
    except ValueError as e:
        raise _section_problem(f"train: {e}") from None
    try:
        safe_name(cfg.output_name, "train.output_name")  # the LoRA's file name: no folders, no '..'
    except ValueError as e:
        raise _section_problem(str(e)) from None
    return cfg


Train = Annotated[TrainConfig, PlainValidator(train_config, json_schema_input_type=TrainSection),
                  PlainSerializer(dataclasses.asdict)]


class RunConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: int = VERSION
    model: ModelSpec
    dataset: DatasetSpec
    train: Train
    targets: TargetSpec = Field(default_factory=TargetSpec)
    sampling: SamplingSpec = Field(default_factory=SamplingSpec)
    comfyui: ComfySpec = Field(default_factory=ComfySpec)

    @field_validator("version")
    @classmethod
    def _supported(cls, version: int) -> int:
        if not 1 <= version <= VERSION:
            raise ValueError(f"{version!r} is not supported (this pack reads 1..{VERSION}); export the config again "
                             "with this pack.")
        return version

    def to_dict(self) -> dict:
        return self.model_dump()

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def validate(self, source: str = "config") -> None:  # pydantic's deprecated classmethod of that name
        """Check again (fields may have been set since): ConfigError naming each bad field."""
        from_dict(self.to_dict(), source)


SECTIONS: dict[str, type[BaseModel]] = {"model": ModelSpec, "dataset": DatasetSpec, "train": TrainSection,
                                        "targets": TargetSpec, "sampling": SamplingSpec, "comfyui": ComfySpec}
_KINDS = {"int_type": "a whole number", "float_type": "a number", "bool_type": "true or false", "string_type": "text",
          "list_type": "a list of text"}
_MAPPING = ("model_type", "model_attributes_type", "dict_type")


# ------------------------------------------------------------------ errors in the pack's words

def _path(loc: tuple) -> str:
    """('dataset', 'clip', 1) -> 'dataset.clip[1]'."""
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else str(p)) for i, p in enumerate(loc))


def _grouped(errors: list[dict], kind: str) -> dict[str, list[str]]:
    """{parent path: [field names]} of one kind of error (missing, extra_forbidden), in the order met."""
    out: dict[str, list[str]] = {}
    for e in errors:
        if e["type"] == kind:
            out.setdefault(_path(e["loc"][:-1]), []).append(str(e["loc"][-1]))
    return out


def _reworded(e: dict) -> str:
    where, kind = _path(e["loc"]), e["type"]
    if kind == "klein_section":  # the message names its fields
        return e["msg"]
    if kind == "value_error":
        return f"{where} {e['ctx']['error']}"
    if kind in _KINDS:
        return f"{where} must be {_KINDS[kind]}, not {e['input']!r}."
    if kind in _MAPPING:
        return f"{where} must be a mapping of fields, not {type(e['input']).__name__}."
    return f"{where}: {e['msg']}."


def describe(error: ValidationError) -> list[str]:
    """pydantic's errors in this pack's words, each naming the field's path and what to do."""
    errors = error.errors()
    out = []
    for parent, names in _grouped(errors, "missing").items():
        out += [f"{parent}: missing field(s) {names}."] if parent else [f"the '{n}' section is missing." for n in names]
    for parent, names in _grouped(errors, "extra_forbidden").items():
        known = sorted(SECTIONS[parent].model_fields) if parent in SECTIONS else []
        out.append(f"{parent}: unknown field(s) {sorted(names)}; known: {known}." if parent
                   else f"unknown section(s) {sorted(names)}; known: {sorted(SECTIONS)}.")
    return out + [_reworded(e) for e in errors if e["type"] not in ("missing", "extra_forbidden")]


def _error(source: str, problems: list[str]) -> ConfigError:
    if len(problems) == 1:
        return ConfigError(f"{source}: {problems[0]}")
    return ConfigError(f"{source}: {len(problems)} problems:\n" + "\n".join(f"  - {p}" for p in problems))


# ------------------------------------------------------------------ reading, writing, changing

def from_dict(raw: dict, source: str = "config") -> RunConfig:
    """A file's mapping as a RunConfig, in strict mode (a file says 4, not "4"); ConfigError names every bad field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a run config is a mapping with sections {sorted(SECTIONS)}.")
    if raw.get("version") is None:
        raise ConfigError(f"{source}: no 'version' field (this pack writes version {VERSION}).")
    try:
        return RunConfig.model_validate(raw, strict=True)
    except ValidationError as e:
        raise _error(source, describe(e)) from None


def json_schema() -> dict:
    """The run config's JSON Schema (a file must say its version, which the Python constructor defaults)."""
    schema = RunConfig.model_json_schema()
    schema["required"] = ["version", *schema.get("required", [])]
    schema["title"] = "Klein LoRA Studio run config"
    return schema


def load(path: str | Path) -> RunConfig:
    """Read a JSON (.json) or YAML (.yaml/.yml) run config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"run config {path} does not exist.")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except Exception as e:  # noqa: BLE001 - JSON and YAML parse errors get the same advice
        raise ConfigError(f"run config {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {e}") from e
    return from_dict(raw, str(path))


def save(cfg: RunConfig, path: Path) -> Path:
    """Validate and write atomically as JSON."""
    from ..paths import atomic_write_text

    cfg.validate(str(path))
    return atomic_write_text(cfg.to_json() + "\n", Path(path))


def with_overrides(cfg: RunConfig, overrides: dict[str, object]) -> RunConfig:
    """A copy with `section.field` (or a bare train field: `rank`) set; used by the sweep queue."""
    raw = cfg.to_dict()
    for key, value in overrides.items():
        section, _, name = key.rpartition(".")
        section = section or "train"
        if section not in raw or not isinstance(raw[section], dict) or name not in raw[section]:
            raise ConfigError(f"--set {key}: no such field (use a train field such as rank, learning_rate, steps, "
                              "or section.field such as dataset.repeats).")
        raw[section][name] = value
    return from_dict(raw, "overrides")


def targets_for(spec: TargetSpec, diffusion_model) -> tg.KleinTargets:
    """The KleinTargets of `spec` on this model: the listed modules if given (checked), else resolved groups."""
    counts = tg.BlockCounts.of_model(diffusion_model)
    names = tg.linear_layer_names(diffusion_model)
    resolved = tg.resolve_targets(spec.groups or list(tg.GROUPS), spec.layers, counts, spec.streams, names)
    if not spec.modules:
        return resolved
    missing = [m for m in spec.modules if m not in names]
    if missing:
        raise ConfigError(f"targets.modules: {len(missing)} layer(s) are not linears of this model, e.g. "
                          f"{missing[:3]}: is model.file the klein model the config was made for?")
    return dataclasses.replace(resolved, modules=list(spec.modules))
