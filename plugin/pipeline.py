"""Pipeline files: the schema of one YAML pipeline and how a folder of them is loaded.

A pipeline says which series it wants (``match``), when a series or study is complete
(``completion``), which series of a study to use (``input``), how to turn pixels into
model input (``preprocess``), which model (``model``), how to turn model output into
findings or outlined lesions (``task``, ``postprocess``), what to write (``outputs``) and
where to send it (``destinations``). ``pipelines/README.md`` teaches the format; errors
are reported as ``file:line:column: location: message``, every one of them at once.
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError
from pydicom.datadict import tag_for_keyword

from plugin.accel.recipe import Recipe, task_problem
from plugin.match import Rule, parse_match
from plugin.metrics import BASELINE_QUANTITIES, Band
from plugin.preprocess import PreprocessStep
from plugin.yamlfile import Location, YAMLError, YAMLFile, read_yaml, validation_errors


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _keyword(value: str | None) -> str | None:
    if value is not None and tag_for_keyword(value) is None:
        raise ValueError(f"unknown DICOM keyword {value!r}")
    return value


class Completion(_Strict):
    """When a series (``level: series``) or a whole study (``level: study``) is complete:
    no new instance for ``quiet_seconds``, or ``max_wait_seconds`` after the first, or as
    soon as it holds the number of instances the ``expected_count_tag`` attribute of its
    first instance announces (e.g. ``ImagesInAcquisition``)."""

    level: Literal["series", "study"] = "series"
    quiet_seconds: float = Field(default=5.0, ge=0, le=86400)
    max_wait_seconds: float = Field(default=600.0, gt=0, le=7 * 86400)
    min_instances: int = Field(default=1, ge=1)
    expected_count_tag: str | None = None

    _check_tag = field_validator("expected_count_tag")(_keyword)


class SlidingWindow(_Strict):
    """Run a volume model on windows of ``roi_size`` ``[depth, height, width]`` voxels,
    laid out as MONAI's ``sliding_window_inference`` lays them out: neighbours share
    ``overlap`` of a window along each axis, the last window ends flush with the volume, and
    a volume smaller than the window is padded with zeros. ``sw_batch_size`` windows go to
    the model per call. Each window gets its own class logits, and
    ``postprocess.aggregate`` turns the windows' probabilities into the series' (as it does
    slices')."""

    roi_size: tuple[
        Annotated[int, Field(gt=0, le=4096)], Annotated[int, Field(gt=0, le=4096)], Annotated[int, Field(gt=0, le=4096)]
    ]
    overlap: float = Field(default=0.25, ge=0.0, lt=1.0)
    sw_batch_size: int = Field(default=1, ge=1, le=1024)


_AXES = {"L": 0, "R": 0, "P": 1, "A": 1, "S": 2, "I": 2}
_Millimetres = Annotated[float, Field(gt=0, le=1000)]


class InputSelection(_Strict):
    """Which images the model sees. For ``level: study``, ``series`` is a match block
    that picks the study's series to use; among several, ``choose`` decides. Images are
    ordered by ``sort``: position along the slice normal, or InstanceNumber.

    ``kind``: ``slice`` feeds the model one image at a time; ``volume`` stacks the series
    into one volume in modality units (see plugin/volume.py), reoriented to
    ``orientation`` (one letter per axis of ``[D, H, W]``: the direction its index grows
    towards, e.g. ``SPL`` for axial slices from the feet up, ``RAS`` as MONAI's
    ``Orientation(axcodes="RAS")``; none keeps the series' axes) and resampled to
    ``spacing`` mm per axis (none keeps the series' spacing). Preprocessing then runs on the
    volume, and the model gets it whole or by ``sliding_window``. A series whose slices do
    not fill one grid (uneven spacing, gantry tilt, mixed orientations) fails its job with
    that reason."""

    series: dict[str, Any] | None = None
    choose: Literal["most_instances", "first", "last"] = "most_instances"
    sort: Literal["position", "instance_number"] = "position"
    kind: Literal["slice", "volume"] = "slice"
    orientation: str | None = None
    spacing: tuple[_Millimetres, _Millimetres, _Millimetres] | None = None
    sliding_window: SlidingWindow | None = None

    _series_rule: Rule | None = PrivateAttr(default=None)

    @field_validator("orientation", "spacing", "sliding_window")
    @classmethod
    def _volume_only(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.data.get("kind") != "volume":
            raise ValueError(f"{info.field_name} is for volumes: set input.kind: volume")
        return value

    @field_validator("orientation")
    @classmethod
    def _orientation_code(cls, value: str | None) -> str | None:
        if value is not None and (
            len(value) != 3 or not set(value) <= _AXES.keys() or sorted(_AXES[c] for c in value) != [0, 1, 2]
        ):
            raise ValueError(
                f"{value!r} is not an orientation code: one letter per axis from R/L, A/P, S/I, "
                "each pair once (e.g. RAS, LPS, SPL)"
            )
        return value

    @property
    def series_rule(self) -> Rule | None:
        return self._series_rule


class ModelSpec(_Strict):
    """``artifact``: a folder (relative to the pipeline file) with ``manifest.json`` and
    ``weights.safetensors``. ``device``: auto (CUDA when present), cpu or cuda.
    ``batch_window_ms``: how long a series whose last batch is short waits for the next
    queued series of this pipeline to fill it. ``optimize``: the recipe ``radpipe
    optimize`` runs (see plugin/accel/recipe.py); the node itself ignores it."""

    artifact: Path
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(default=32, ge=1, le=4096)
    batch_window_ms: float = Field(default=20, ge=0, le=10000)
    optimize: Recipe | None = None


CODING_SCHEMES = ("SCT", "DCM", "LN")
_Code = tuple[Literal["SCT", "DCM", "LN"], str, str]


def _located(title: str, errors: Sequence[tuple[Location, str]]) -> ValidationError:
    """A validation error at each given location (relative to the validated object), so
    that a check across keys points at the key to fix rather than at their parent."""
    return ValidationError.from_exception_data(
        title,
        [
            InitErrorDetails(type=PydanticCustomError("value_error", message), loc=loc, input=None)
            for loc, message in errors
        ],
    )


class FindingSpec(_Strict):
    """A finding reported in the SR: ``label`` names one of the model's classes; ``code``
    is ``[scheme, value, meaning]`` with scheme SCT (SNOMED CT), DCM or LN (LOINC)."""

    label: str = Field(min_length=1)
    code: _Code
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)


class Apart(_Strict):
    """How a lesion stands apart in the image (see :class:`Outline`): once redrawn, the
    voxels at the outline's ``min_value`` or more connected to it within ``reach_mm`` of it
    add at most ``max_attached`` of its own volume; otherwise it is part of something larger
    and is dropped (one with no voxel at ``min_value`` attaches nothing). A lung nodule lies
    in lung, and touches a vessel at most; the mediastinum and the hilum, where a model may
    also see a round shape, go on."""

    max_attached: float = Field(ge=0.0)
    reach_mm: float = Field(default=4.0, gt=0.0)


class Alone(Apart):
    """A second, lower score for lesions that stand alone in the image (see :class:`Outline`):
    a lesion whose mean probability is under its segment's ``min_mean_probability`` but at
    least this ``min_mean_probability`` is reported when it stands apart (:class:`Apart`), by
    default with at most 0.3 of its volume attached; otherwise, or with no voxel at
    ``min_value``, it is dropped. A nodule lies in lung; a vessel, seen end-on where it ends,
    goes on: the series tells them apart where the model's score does not."""

    min_mean_probability: float = Field(ge=0.0, le=1.0)
    max_attached: float = Field(default=0.3, ge=0.0)


class Outline(_Strict):
    """Where a segment's lesions are outlined by the image's own values rather than by the
    model's probabilities: each lesion that passed the filters (and grew, if it does) is
    redrawn as the voxels connected to it whose value, in modality units (HU for CT), is at
    least ``min_value``, that lie within ``reach_mm`` of its outline as the model drew it,
    and where the model gave the segment at least ``min_probability``. The model says where
    a lesion is, the image where its edge is: about halfway between the lesion's value and
    its surroundings' (-450 HU between solid nodules and lung), which a model places only
    roughly for faint or small lesions. A lesion with no such voxel keeps the model's
    outline. A voxel goes to the lesion whose outline as the model drew it is nearer, and
    lesions stay a voxel apart: they do not merge. A lesion that comes apart (its pieces
    parted by values under ``min_value``) stays one lesion. Which lesions are found, and
    their scores, do not change, except through ``alone`` (optional, :class:`Alone`) for the
    lesions scored in its band, and ``apart`` (optional, :class:`Apart`) for the others."""

    min_value: float
    reach_mm: float = Field(default=3.0, gt=0.0)
    min_probability: float = Field(default=0.01, ge=0.0, le=1.0)
    alone: Alone | None = None
    apart: Apart | None = None


class SegmentSpec(_Strict):
    """A segment outlined by a segmentation model: ``label`` names one of the model's
    classes (an output channel); ``code`` is the segmented property type and ``category``
    its category (``[scheme, value, meaning]``, as a finding's code), as DICOM SEG and the
    SR record them. A voxel is in the segment when its probability is at least
    ``threshold`` (see plugin/segment.py for softmax). A connected part (a lesion) is
    dropped when it is smaller than ``min_volume_mm3``, when its voxels' mean probability is
    below ``min_mean_probability`` (the lesion's score, as a detector's), or when it is less
    compact than ``min_compactness``: its volume over that of a ball as wide as its longest
    axial diameter, 1 for a ball, lower for flat shapes such as vessels branching in the
    slice plane (the default 0 keeps every shape); a lesion cut by the series' first or last
    slice counts twice its volume (mirrored at the cut). ``grow_threshold`` (at most
    ``threshold``; by default equal to it) is hysteresis: a lesion that passed the filters
    grows into the voxels connected to it whose probability is at least ``grow_threshold``,
    and its outline and measurements are those of the grown lesion; the filters judge it as
    detected, on its voxels at or above ``threshold``: growing changes outlines and
    measurements, not which lesions are found. E.g. ``{threshold: 0.5, grow_threshold: 0.3}``.
    ``outline`` (optional, see :class:`Outline`) then redraws each lesion by the image's values."""

    label: str = Field(min_length=1)
    code: _Code
    category: _Code = ("SCT", "49755003", "Morphologically abnormal structure")
    threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    min_volume_mm3: float = Field(default=0.0, ge=0.0)
    min_mean_probability: float = Field(default=0.0, ge=0.0, le=1.0)
    min_compactness: float = Field(default=0.0, ge=0.0)
    grow_threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    outline: Outline | None = None

    @field_validator("grow_threshold")
    @classmethod
    def _grows_below_threshold(cls, value: float | None, info: ValidationInfo) -> float | None:
        threshold = info.data.get("threshold")
        if value is not None and threshold is not None and value > threshold:
            raise ValueError(f"{value} is above threshold {threshold}: a lesion grows into less probable voxels")
        return value

    @model_validator(mode="after")
    def _alone_scores_lower(self) -> "SegmentSpec":
        alone = None if self.outline is None else self.outline.alone
        if alone is not None and alone.min_mean_probability >= self.min_mean_probability:
            raise _located(
                "SegmentSpec",
                [
                    (
                        ("outline", "alone", "min_mean_probability"),
                        f"{alone.min_mean_probability} is not below the segment's min_mean_probability "
                        f"{self.min_mean_probability}: a lesion alone is reported at a lower score",
                    )
                ],
            )
        return self


class Postprocess(_Strict):
    """``activation``: softmax (one class per image, or per voxel; for segmentation channel 0
    is the background) or sigmoid (independent labels). ``aggregate``: how slice
    probabilities become the series probability: max, mean, or top_k_mean (mean of the
    ``top_k`` highest). A classification pipeline lists ``findings``, a segmentation
    pipeline ``segments``."""

    activation: Literal["softmax", "sigmoid"] = "softmax"
    aggregate: Literal["max", "mean", "top_k_mean"] = "max"
    top_k: int = Field(default=3, ge=1)
    findings: list[FindingSpec] = []
    segments: list[SegmentSpec] = []

    @field_validator("segments")
    @classmethod
    def _unique_labels(cls, segments: list[SegmentSpec]) -> list[SegmentSpec]:
        labels = [s.label for s in segments]
        repeated = [
            ((i, "label"), f"segment {s.label!r} is listed twice")
            for i, s in enumerate(segments)
            if s.label in labels[:i]
        ]
        if repeated:
            raise _located("segments", repeated)
        return segments


_Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


def _ordered(band: tuple[float, float] | None) -> tuple[float, float] | None:
    if band is not None and band[0] > band[1]:
        raise ValueError(f"[low, high]: low {band[0]} is above high {band[1]}")
    return band


_FractionBand = Annotated[tuple[_Fraction, _Fraction], AfterValidator(_ordered)]


class FindingBaseline(_Strict):
    """What validation measured for one finding, as ``[low, high]`` fractions: the share of
    series evaluated Present (``positive_rate``) and the mean series probability
    (``mean_score``) that production should stay within. The node exports each bound as
    ``radpipe_finding_baseline{quantity, bound}``; the drift alerts of
    ``deploy/prometheus/alerts.yml`` fire when a day of series leaves the band."""

    positive_rate: _FractionBand | None = None
    mean_score: _FractionBand | None = None


class Monitoring(_Strict):
    """``findings``: a baseline band per finding label, e.g.
    ``{findings: {nodule: {positive_rate: [0.05, 0.2], mean_score: [0.1, 0.3]}}}``."""

    findings: dict[str, FindingBaseline] = {}


class SROutput(_Strict):
    """``comprehensive3d`` (default) or ``enhanced`` SR for PACS that lack the former."""

    sop_class: Literal["comprehensive3d", "enhanced"] = "comprehensive3d"


class KOSOutput(_Strict):
    """A Key Object Selection of the slice with the highest probability per finding."""

    when: Literal["positive", "always"] = "positive"


class SEGOutput(_Strict):
    """A DICOM Segmentation of a segmentation pipeline's segments: ``binary`` masks, or
    ``fractional`` ones that keep each voxel's probability (in 1/255 steps)."""

    type: Literal["binary", "fractional"] = "binary"


class Output(_Strict):
    sr: SROutput | None = None
    kos: KOSOutput | None = None
    seg: SEGOutput | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "Output":
        if sum(o is not None for o in (self.sr, self.kos, self.seg)) != 1:
            raise ValueError("each output names exactly one of: sr, kos, seg")
        return self


def _fits_input(value: Any, info: ValidationInfo) -> Any:
    """A preprocessing step or output that the pipeline's ``task`` and ``input.kind`` can use
    (checked item by item, so that an error points at the item)."""
    task = info.data.get("task")
    if isinstance(value, Output) and value.kos and task == "segmentation":
        raise ValueError("kos: key images are for task: classification; a segmentation pipeline writes seg and sr")
    if isinstance(value, Output) and value.seg and task == "classification":
        raise ValueError("seg: masks come from a segmentation model: set task: segmentation")
    selection = info.data.get("input")
    if selection is None:  # input itself is invalid, and reported
        return value
    if isinstance(value, PreprocessStep):
        dims = value.step.spatial_dims
        if selection.kind == "volume" and dims == 2:
            raise ValueError(
                f"{value.name}: [height, width] works on each slice; a volume (input.kind: volume) "
                "needs [depth, height, width]"
            )
        if selection.kind == "slice" and dims == 3:
            raise ValueError(f"{value.name}: [depth, height, width] is for volumes: set input.kind: volume")
    if isinstance(value, Output) and value.kos and selection.kind == "volume" and not selection.sliding_window:
        raise ValueError(
            "kos: a volume scored whole has no key image; with input.sliding_window the key image is "
            "the slice through the centre of the highest-scoring window"
        )
    return value


SHADOW_PRIORITY = -100  # the lowest: a shadow's jobs wait for every live job


class Pipeline(_Strict):
    """One pipeline file. ``mode: shadow`` (default ``live``) tries a candidate on live
    traffic without reporting it: with ``shadow_of: <live pipeline's name>`` it runs on each
    series (or study) that live pipeline takes and its own ``match`` also accepts (copy the
    live one's), after it (``priority`` defaults to -100 and must be below the live one's);
    its SR/SEG are written and journaled but never sent, whatever ``destinations`` says.
    Example: ``mode: shadow``, ``shadow_of: lung-nodule-demo``. ``radpipe compare`` and the
    ``radpipe_shadow_*`` metrics set its findings against the live one's."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    version: str = Field(min_length=1, max_length=32)
    task: Literal["classification", "segmentation"] = "classification"
    match: dict[str, Any] = Field(min_length=1)
    completion: Completion = Completion()
    input: InputSelection = InputSelection()
    preprocess: list[Annotated[PreprocessStep, AfterValidator(_fits_input)]] = []
    model: ModelSpec
    postprocess: Postprocess
    outputs: list[Annotated[Output, AfterValidator(_fits_input)]] = Field(default=[Output(sr=SROutput())], min_length=1)
    destinations: list[str] | None = None
    priority: int = Field(default=0, ge=-100, le=100)
    monitoring: Monitoring = Monitoring()
    mode: Literal["live", "shadow"] = "live"
    shadow_of: str | None = None

    _rule: Rule | None = PrivateAttr(default=None)
    _source: Path | None = PrivateAttr(default=None)
    _sha256: str = PrivateAttr(default="")

    @field_validator("version", mode="before")
    @classmethod
    def _version_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value

    @model_validator(mode="before")
    @classmethod
    def _shadow_runs_last(cls, data: Any) -> Any:
        """A shadow waits for live work unless its file says otherwise (checked across files)."""
        if isinstance(data, dict) and data.get("mode") == "shadow":
            return {"priority": SHADOW_PRIORITY, **data}
        return data

    @model_validator(mode="after")
    def _fits_task(self) -> "Pipeline":
        """A classification lists findings; a segmentation lists segments, outlines a volume
        and writes the SEG its SR points into; the recipe, if any, has the task's keys."""
        errors: list[tuple[Location, str]] = []
        if self.task == "classification":
            if not self.postprocess.findings:
                errors.append((("postprocess", "findings"), "a classification pipeline lists at least one finding"))
            if self.postprocess.segments:
                errors.append((("postprocess", "segments"), "segments are for task: segmentation"))
        else:
            if self.input.kind != "volume":
                errors.append((("task",), "segmentation outlines in 3D: set input.kind: volume"))
            if self.postprocess.findings:
                errors.append((("postprocess", "findings"), "findings are for task: classification"))
            if not self.postprocess.segments:
                errors.append((("postprocess", "segments"), "a segmentation pipeline lists at least one segment"))
            kinds = ["sr" if o.sr else "seg" if o.seg else "kos" for o in self.outputs]
            if kinds.count("seg") > 1:
                errors.append((("outputs",), "a segmentation pipeline writes one seg"))
            if "sr" in kinds and "seg" not in kinds:
                errors.append(
                    (("outputs", kinds.index("sr")), "sr: its lesions point at their segments: add an output seg: {}")
                )
        labels = [f.label for f in self.postprocess.findings]
        errors += [
            (("monitoring", "findings", label), f"{label!r} is not a finding of this pipeline (findings: {labels})")
            for label in self.monitoring.findings
            if label not in labels
        ]
        if self.mode == "shadow" and self.shadow_of is None:
            errors.append((("mode",), "a shadow names the live pipeline it shadows: add shadow_of: <its name>"))
        if self.mode == "live" and self.shadow_of is not None:
            errors.append((("shadow_of",), "only a pipeline with mode: shadow shadows another"))
        if self.model.optimize is not None and (problem := task_problem(self.model.optimize, self.task)):
            errors.append((("model", "optimize"), problem))  # caught by validate, not first by optimize
        if errors:
            raise _located("Pipeline", errors)
        return self

    @property
    def rule(self) -> Rule:
        assert self._rule is not None, "pipelines are created by load_pipeline"
        return self._rule

    @property
    def source(self) -> Path | None:
        """The YAML file this pipeline was read from."""
        return self._source

    @property
    def sha256(self) -> str:
        """Hash of the YAML file's bytes: identifies exactly which version ran a job."""
        return self._sha256

    @property
    def artifact_dir(self) -> Path:
        base = self._source.parent if self._source else Path.cwd()
        return (base / self.model.artifact).resolve()

    def bands(self) -> list[Band]:
        """The baseline bands of ``monitoring``, as the metrics export them."""
        return [
            Band(self.name, label, quantity, *band)
            for label, baseline in self.monitoring.findings.items()
            for quantity in BASELINE_QUANTITIES
            if (band := getattr(baseline, quantity)) is not None
        ]

    def destinations_in(self, configured: list[str]) -> list[str]:
        """Where results go: the listed destinations, or every configured one when the
        pipeline lists none (``destinations: []`` sends nowhere); a shadow's go nowhere."""
        if self.mode == "shadow":
            return []
        return configured if self.destinations is None else self.destinations


class PipelineError(Exception):
    """Pipeline files are invalid; ``str()`` is one ``file:line:column: message`` per error."""


def _shadow_problem(shadow: Pipeline, source: YAMLFile, pipelines: list[Pipeline]) -> str | None:
    """Why a shadow cannot run beside the live pipeline it names (None: it can, or it is live)."""
    if shadow.mode != "shadow":
        return None
    live = next((p for p in pipelines if p.name == shadow.shadow_of and p.mode == "live"), None)
    if live is None:
        live_names = sorted(p.name for p in pipelines if p.mode == "live")
        return (
            f"{source.where(('shadow_of',))}: shadow_of: no live pipeline {shadow.shadow_of!r} "
            f"is loaded with it (live pipelines: {live_names or 'none'})"
        )
    for key, mine, theirs in (
        ("task", shadow.task, live.task),
        ("completion.level", shadow.completion.level, live.completion.level),
    ):
        if mine != theirs:
            where = source.where(tuple(key.split(".")))
            return f"{where}: {key}: {mine!r} differs from {theirs!r} of the live pipeline {live.name}"
    if shadow.priority >= live.priority:
        return (
            f"{source.where(('priority',))}: priority: a shadow runs after its live pipeline: "
            f"set it below {live.priority} ({live.name}'s)"
        )
    return None


def _check_artifact(pipeline: Pipeline, source: YAMLFile) -> list[str]:
    """The artifact exists, is for the pipeline's task and has every class a finding or
    segment names (hashes are checked at load); with softmax, a segment is not the
    background (the first class)."""
    where = source.where(("model", "artifact"))
    manifest_path = pipeline.artifact_dir / "manifest.json"
    if not manifest_path.is_file():
        return [f"{where}: model.artifact: no manifest.json in {pipeline.artifact_dir}"]
    try:
        manifest = json.loads(manifest_path.read_text())
        classes = manifest["classes"]
    except (ValueError, KeyError) as e:
        return [f"{where}: model.artifact: unreadable manifest {manifest_path}: {e}"]
    errors = []
    task = manifest.get("task", "classification")
    if task != pipeline.task:
        errors.append(f"{where}: model.artifact: the model is for task: {task}, the pipeline's task is {pipeline.task}")
    postprocess = pipeline.postprocess
    for key, labels in (
        ("findings", [f.label for f in postprocess.findings]),
        ("segments", [s.label for s in postprocess.segments]),
    ):
        for i, label in enumerate(labels):
            where = f"{source.where(('postprocess', key, i, 'label'))}: postprocess.{key}.{i}.label"
            if label not in classes:
                errors.append(f"{where}: {label!r} is not a class of the model (classes: {classes})")
            elif key == "segments" and postprocess.activation == "softmax" and label == classes[0]:
                errors.append(f"{where}: {label!r} is the background (the first class) of a softmax model")
    return errors


def _parse(source: YAMLFile, sha256: str) -> tuple[Pipeline | None, list[str]]:
    raw = source.data
    if not isinstance(raw, dict):
        return None, [f"{source.where(())}: a pipeline file must be a mapping of keys"]
    errors: list[str] = []
    rule, match_errors = parse_match(raw.get("match", {}))
    errors += [f"{source.where(e.path)}: {'.'.join(map(str, e.path))}: {e.message}" for e in match_errors]
    selection = raw.get("input", {}).get("series") if isinstance(raw.get("input"), dict) else None
    series_rule = None
    if selection is not None:
        series_rule, selection_errors = parse_match(selection, ("input", "series"))
        errors += [f"{source.where(e.path)}: {'.'.join(map(str, e.path))}: {e.message}" for e in selection_errors]
    try:
        pipeline = Pipeline.model_validate(raw)
    except ValidationError as e:
        return None, errors + validation_errors(e, source.where)
    pipeline._rule = rule
    pipeline.input._series_rule = series_rule
    pipeline._source = source.path.resolve()
    pipeline._sha256 = sha256
    errors += _check_artifact(pipeline, source)
    return (pipeline if not errors else None), errors


def read_pipeline(path: Path) -> tuple[Pipeline | None, YAMLFile | None, list[str]]:
    """Parse one file; returns the pipeline (None when invalid), its YAML and every error."""
    try:
        data = path.read_bytes()
        source = read_yaml(path, data.decode("utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        return None, None, [f"{path}:1:1: cannot read: {e}"]
    except YAMLError as e:
        return None, None, str(e).splitlines()
    pipeline, errors = _parse(source, hashlib.sha256(data).hexdigest())
    return pipeline, source, errors


def load_pipeline(path: Path) -> Pipeline:
    """Read and validate one pipeline file; raise :class:`PipelineError` on any error."""
    pipeline, _, errors = read_pipeline(path)
    if errors or pipeline is None:
        raise PipelineError("\n".join(errors))
    return pipeline


def pipeline_files(directory: Path) -> list[Path]:
    return sorted(p for p in [*directory.glob("*.yaml"), *directory.glob("*.yml")] if not p.name.startswith("."))


def load_pipeline_files(paths: list[Path], destinations: set[str]) -> list[Pipeline]:
    """Load and cross-check a set of pipeline files (unique names, known destinations).
    The set is valid only as a whole: any error raises :class:`PipelineError` listing
    every error of every file. Returns the pipelines most urgent first."""
    pipelines: list[Pipeline] = []
    errors: list[str] = []
    names: dict[str, Path] = {}
    loaded: list[tuple[Pipeline, YAMLFile]] = []
    for path in paths:
        pipeline, source, file_errors = read_pipeline(path)
        errors += file_errors
        if pipeline is None or source is None:
            continue
        for i, destination in enumerate(pipeline.destinations or []):
            if destination not in destinations:
                errors.append(
                    f"{source.where(('destinations', i))}: destinations.{i}: unknown destination "
                    f"{destination!r} (the node config has {sorted(destinations) or 'none'})"
                )
        if pipeline.name in names:
            errors.append(
                f"{source.where(('name',))}: name: pipeline name {pipeline.name!r} "
                f"is already used by {names[pipeline.name]}"
            )
        names[pipeline.name] = path
        pipelines.append(pipeline)
        loaded.append((pipeline, source))
    errors += [error for p, source in loaded if (error := _shadow_problem(p, source, pipelines))]
    if errors:
        raise PipelineError("\n".join(errors))
    return sorted(pipelines, key=lambda p: (-p.priority, p.name))


def load_pipelines(directory: Path, destinations: set[str]) -> list[Pipeline]:
    """Load every ``*.yaml``/``*.yml`` file of a pipelines folder."""
    return load_pipeline_files(pipeline_files(directory), destinations)
