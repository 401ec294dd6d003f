"""Pipeline files: the schema of one YAML pipeline and how a directory of them is loaded.

A pipeline says which series it wants (``match``), when a series is complete
(``completion``), how to turn pixels into model input (``preprocess``), which model
(``model``), how to turn model output into findings (``postprocess``), what to write
(``outputs``) and where to send it (``destinations``). See ``pipelines/README.md``.
"""

import hashlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator

from plugin.match import Condition, parse_condition
from plugin.preprocess import PreprocessStep


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Completion(_Strict):
    """When a series counts as complete: no new instance for ``quiet_seconds``, or
    ``max_wait_seconds`` after its first instance, whichever comes first."""

    level: Literal["series"] = "series"
    quiet_seconds: float = Field(default=5.0, ge=0)
    max_wait_seconds: float = Field(default=600.0, gt=0)
    min_instances: int = Field(default=1, ge=1)


class ModelSpec(_Strict):
    """``artifact`` is a directory (relative to the pipeline file) holding
    ``manifest.json`` and ``weights.safetensors``."""

    artifact: Path
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=32, ge=1, le=4096)


class FindingSpec(_Strict):
    """A finding reported in the SR: ``label`` names one of the model's classes;
    ``code`` is ``[scheme, value, meaning]`` (e.g. ``[SCT, "27925004", Nodule]``)."""

    label: str
    code: tuple[str, str, str]
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)


class Postprocess(_Strict):
    activation: Literal["softmax"] = "softmax"
    aggregate: Literal["max"] = "max"
    findings: list[FindingSpec] = Field(min_length=1)


class SROutput(_Strict):
    sop_class: Literal["comprehensive3d"] = "comprehensive3d"


class Output(_Strict):
    sr: SROutput


class Pipeline(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str
    match: dict[str, Any] = Field(min_length=1)
    completion: Completion = Completion()
    preprocess: list[PreprocessStep] = []
    model: ModelSpec
    postprocess: Postprocess
    outputs: list[Output] = [Output(sr=SROutput())]
    destinations: list[str] | None = None
    priority: int = 0

    _conditions: list[Condition] = PrivateAttr(default_factory=list)
    _source: Path | None = PrivateAttr(default=None)
    _sha256: str = PrivateAttr(default="")

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) else value

    @field_validator("match")
    @classmethod
    def _parse_match(cls, value: dict[str, Any]) -> dict[str, Any]:
        for keyword, spec in value.items():
            parse_condition(keyword, spec)  # raises ValueError with the reason
        return value

    def model_post_init(self, context: Any) -> None:
        self._conditions = [parse_condition(k, v) for k, v in self.match.items()]

    @property
    def conditions(self) -> list[Condition]:
        return self._conditions

    @property
    def source(self) -> Path | None:
        """The YAML file this pipeline was read from."""
        return self._source

    @property
    def sha256(self) -> str:
        """Hash of the YAML file's bytes: identifies exactly which version ran a job."""
        return self._sha256

    def destinations_in(self, configured: list[str]) -> list[str]:
        """Where results go: the listed destinations, or every configured one when the
        pipeline lists none (``destinations: []`` sends nowhere)."""
        return configured if self.destinations is None else self.destinations

    @property
    def artifact_dir(self) -> Path:
        base = self._source.parent if self._source else Path.cwd()
        return (base / self.model.artifact).resolve()


class PipelineError(Exception):
    """A pipeline file is invalid; ``str()`` is ``file: location: message`` lines."""


def _format(path: Path, error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        location = ".".join(str(p) for p in item["loc"]) or "(top level)"
        lines.append(f"{path}: {location}: {item['msg']}")
    return "\n".join(lines)


def load_pipeline(path: Path) -> Pipeline:
    """Read and validate one pipeline file (YAML safe loader only)."""
    data = path.read_bytes()
    try:
        raw = yaml.safe_load(data)
    except yaml.YAMLError as e:
        raise PipelineError(f"{path}: {e}") from e
    if not isinstance(raw, dict):
        raise PipelineError(f"{path}: a pipeline file must be a mapping")
    try:
        pipeline = Pipeline.model_validate(raw)
    except ValidationError as e:
        raise PipelineError(_format(path, e)) from e
    pipeline._source = path.resolve()
    pipeline._sha256 = hashlib.sha256(data).hexdigest()
    if not (pipeline.artifact_dir / "manifest.json").is_file():
        raise PipelineError(f"{path}: model.artifact: no manifest.json in {pipeline.artifact_dir}")
    return pipeline


def pipeline_files(directory: Path) -> list[Path]:
    return sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")])


def load_pipeline_files(paths: list[Path], destinations: set[str]) -> list[Pipeline]:
    """Load and cross-check pipeline files; raise :class:`PipelineError` listing every
    error of every file at once. Returns the pipelines most urgent first."""
    pipelines: list[Pipeline] = []
    errors: list[str] = []
    for path in paths:
        try:
            pipeline = load_pipeline(path)
        except PipelineError as e:
            errors.append(str(e))
            continue
        errors += [
            f"{path}: destinations: unknown destination {d!r} (node config has {sorted(destinations)})"
            for d in pipeline.destinations or []
            if d not in destinations
        ]
        if any(p.name == pipeline.name for p in pipelines):
            errors.append(f"{path}: name: pipeline name {pipeline.name!r} is already used by another file")
        pipelines.append(pipeline)
    if errors:
        raise PipelineError("\n".join(errors))
    return sorted(pipelines, key=lambda p: (-p.priority, p.name))


def load_pipelines(directory: Path, destinations: set[str]) -> list[Pipeline]:
    """Load every ``*.yaml``/``*.yml`` file of a pipelines folder."""
    return load_pipeline_files(pipeline_files(directory), destinations)
