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
encoded dataset the node exported (trainer/dataset_file.py), relative to ComfyUI's output folder; without it
the run encodes `dataset.folder` (relative to ComfyUI's input folder, as the Dataset Loader resolves it) with
`dataset.vae` and `dataset.clip`, through the same latent/text cache. The LoRA, checkpoints and states go to
models/loras under `train.output_name`, as the node's do. Every error names the field and what to do.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..model import targets as tg
from ..paths import safe_name
from ..training.config import TrainConfig

VERSION = 1
RUNS_FOLDER = "klein_lora_runs"  # under ComfyUI's output folder: exported configs and encoded datasets
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")  # UNETLoader's choices
DEV_CLIP_TYPE = "klein_tiny_dev"  # the tests' tiny text encoder (devtools), only with KLEIN_LORA_DEV_NODES=1


class ConfigError(ValueError):
    pass


@dataclass
class ModelSpec:
    file: str
    weight_dtype: str = "default"


@dataclass
class DatasetSpec:
    encoded: str = ""
    folder: str = ""
    trigger: str = ""
    resolution: int = 1024
    control_folder: str = ""
    bucketing: bool = True
    repeats: int = 1
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    use_cache: bool = True
    vae: str = ""
    clip: list[str] = field(default_factory=list)
    clip_type: str = "flux2"


@dataclass
class TargetSpec:
    groups: list[str] = field(default_factory=lambda: list(tg.GROUPS))
    layers: str = "attention"
    streams: str = "both"
    modules: list[str] = field(default_factory=list)  # when given, exactly these (checked against the model)


@dataclass
class SamplingSpec:
    clip: list[str] = field(default_factory=list)
    clip_type: str = "flux2"
    vae: str = ""
    sample_steps: int = 20

    @property
    def enabled(self) -> bool:
        return bool(self.clip and self.vae)


@dataclass
class ComfySpec:
    path: str = ""
    base_directory: str = ""


@dataclass
class RunConfig:
    model: ModelSpec
    dataset: DatasetSpec
    train: TrainConfig
    targets: TargetSpec = field(default_factory=TargetSpec)
    sampling: SamplingSpec = field(default_factory=SamplingSpec)
    comfyui: ComfySpec = field(default_factory=ComfySpec)
    version: int = VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def validate(self) -> None:
        if not self.model.file.strip():
            raise ConfigError("model.file is empty: name the klein Base diffusion model (a file in "
                              "models/diffusion_models or an absolute path).")
        if self.model.weight_dtype not in WEIGHT_DTYPES:
            raise ConfigError(f"model.weight_dtype '{self.model.weight_dtype}' is not one of {list(WEIGHT_DTYPES)}.")
        d = self.dataset
        if not d.encoded and not d.folder:
            raise ConfigError("dataset: give dataset.encoded (an exported encoded dataset) or dataset.folder with "
                              "dataset.vae and dataset.clip to encode it.")
        if not d.encoded and not (d.vae and d.clip):
            raise ConfigError(f"dataset.folder '{d.folder}' needs dataset.vae and dataset.clip (model files) to be "
                              "encoded; or export the run from the trainer node, which writes dataset.encoded.")
        if d.resolution < 64 or d.resolution % 16:
            raise ConfigError(f"dataset.resolution {d.resolution}: use a multiple of 16, at least 64.")
        if d.repeats < 1:
            raise ConfigError(f"dataset.repeats {d.repeats}: use 1 or more.")
        if not 0.0 <= d.caption_dropout < 1.0:
            raise ConfigError(f"dataset.caption_dropout {d.caption_dropout}: use a value in [0, 1).")
        t = self.targets
        for name, value, allowed in (("layers", t.layers, tg.LAYER_KINDS), ("streams", t.streams, tg.STREAMS)):
            if value not in allowed:
                raise ConfigError(f"targets.{name} '{value}' is not one of {list(allowed)}.")
        unknown = [g for g in t.groups if g not in tg.GROUPS]
        if unknown or not (t.groups or t.modules):
            raise ConfigError(f"targets.groups {t.groups}: choose one or more of {list(tg.GROUPS)}.")
        if self.sampling.sample_steps < 1:
            raise ConfigError(f"sampling.sample_steps {self.sampling.sample_steps}: use 1 or more.")
        if bool(self.sampling.clip) != bool(self.sampling.vae):
            raise ConfigError("sampling: give both sampling.clip and sampling.vae to sample checkpoints, or neither.")
        try:
            self.train.validate()
            safe_name(self.train.output_name, "train.output_name")  # the LoRA's file name: no folders, no '..'
        except ValueError as e:
            raise ConfigError(f"train: {e}") from e


_SECTIONS = {"model": ModelSpec, "dataset": DatasetSpec, "train": TrainConfig, "targets": TargetSpec,
             "sampling": SamplingSpec, "comfyui": ComfySpec}
_REQUIRED = ("model", "dataset", "train")


def _section(name: str, cls, raw) -> object:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name} must be a mapping of fields, not {type(raw).__name__}.")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"{name}: unknown field(s) {unknown}; known: {sorted(fields)}.")
    missing = [n for n, f in fields.items() if n not in raw and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{name}: missing field(s) {missing}.")
    out = {}
    for key, value in raw.items():
        out[key] = _coerce(f"{name}.{key}", fields[key], value)
    return cls(**out)


def _coerce(where: str, f: dataclasses.Field, value):
    """Check a value against the field's annotated type (JSON has no int/float distinction for 1e-4 vs 1)."""
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, not {value!r}.")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be a whole number, not {value!r}.")
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, not {value!r}.")
        value = float(value)
    elif kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be text, not {value!r}.")
    elif kind.startswith("list"):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{where} must be a list of text, not {value!r}.")
    return value


def from_dict(raw: dict, source: str = "config") -> RunConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: a run config is a mapping with sections {sorted(_SECTIONS)}.")
    version = raw.get("version")
    if version is None:
        raise ConfigError(f"{source}: no 'version' field (this pack writes version {VERSION}).")
    if not isinstance(version, int) or version > VERSION or version < 1:
        raise ConfigError(f"{source}: version {version!r} is not supported (this pack reads 1..{VERSION}); "
                          "export the config again with this pack.")
    unknown = sorted(set(raw) - set(_SECTIONS) - {"version"})
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) {unknown}; known: {sorted(_SECTIONS)}.")
    for name in _REQUIRED:
        if name not in raw:
            raise ConfigError(f"{source}: the '{name}' section is missing.")
    try:
        cfg = RunConfig(version=version, **{name: _section(name, cls, raw[name])
                                            for name, cls in _SECTIONS.items() if name in raw})
        cfg.validate()
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return cfg


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

    cfg.validate()
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
