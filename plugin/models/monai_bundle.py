"""A MONAI bundle folder read as data: its network, input, classes and preprocessing.

A bundle (``configs/metadata.json``, ``configs/inference.json`` or ``.yaml``,
``models/model.pt``) is meant to be run by MONAI's ``ConfigParser``, which builds whatever
a ``_target_`` names and evaluates every ``$`` string as Python. radpipe runs none of it
(DESIGN invariant 9): the configs are parsed as JSON or safe YAML, ``network_def`` becomes a
registry id only when its ``_target_`` is an ``nn.Module`` class that ``monai.networks.nets``
exports, its arguments must be literal data (``@`` references are followed to literal data),
and anything else is refused with :class:`BundleError`.

The bundle's ``preprocessing`` (and its inferer and output activation) are read the same
way and translated into pipeline keys where a radpipe step does the same thing
(:data:`TRANSLATORS`); what does not map is listed, never run.

This module is for ``radpipe import`` only; the node never imports it.
"""

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from plugin.models.inputspec import DTYPES, InputSpec
from plugin.models.registry import MONAI_NETS, UnknownArchitecture, factory

METADATA = Path("configs/metadata.json")
CONFIGS = (Path("configs/inference.json"), Path("configs/inference.yaml"), Path("configs/inference.yml"))
MODEL_PT = Path("models/model.pt")
# keys under which a checkpoint (MONAI's CheckpointSaver, a training script) holds the state dict
CHECKPOINT_KEYS = ("model", "state_dict", "network")

_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
_REFERENCE = re.compile(r"::|#")  # MONAI's id separators (``#`` before MONAI 1.2)


class BundleError(Exception):
    """The bundle cannot become an artifact; ``str()`` says why in one line."""


def _shown(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 4] + "...'"


def _evaluated(value: object) -> str | None:
    """What MONAI would make of a ``$`` or ``%`` string (None for any other value)."""
    if isinstance(value, str) and value.startswith("$"):
        return "a Python expression"
    if isinstance(value, str) and value.startswith("%"):
        return "a macro (config from another file)"
    return None


def _read(path: Path) -> dict[str, Any]:
    """A config file as data: JSON, or YAML with the safe loader (no tags, no objects)."""
    try:
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (OSError, UnicodeDecodeError, ValueError, yaml.YAMLError) as e:
        raise BundleError(f"{path}: cannot read it: {' '.join(str(e).split())}") from e
    if not isinstance(data, dict):
        raise BundleError(f"{path}: not a mapping of keys")
    return data


class _Untranslated(Exception):
    """A transform (or one of its arguments) that no pipeline key expresses."""


@dataclass(frozen=True)
class Bundle:
    """The bundle's two configs, as data."""

    folder: Path
    metadata: dict[str, Any]
    config: dict[str, Any]
    config_path: Path

    @property
    def weights(self) -> Path:
        return self.folder / MODEL_PT

    def unplaced(self, error: BundleError) -> str:
        """An error's message without the config file's name (for a note on that file)."""
        return str(error).removeprefix(f"{self.config_path}: ")

    def _lookup(self, reference: str, where: str) -> Any:
        """What ``@reference`` (``a::b::0``, or ``a#b#0``) names in the inference config."""
        value: Any = self.config
        for part in _REFERENCE.split(reference):
            if isinstance(value, dict) and part in value:
                value = value[part]
            elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
                value = value[int(part)]
            else:
                raise BundleError(f"{self.config_path}: {where}: @{reference} names nothing in the config")
        return value

    def _followed(self, value: Any, where: str) -> Any:
        """``value``, or what its ``@`` reference (and theirs, in turn) names."""
        seen: set[str] = set()
        while isinstance(value, str) and value.startswith("@"):
            if value in seen:
                raise BundleError(f"{self.config_path}: {where}: {value} refers to itself")
            seen.add(value)
            value = self._lookup(value[1:], where)
        return value

    def literal(self, value: Any, where: str) -> Any:
        """``value`` as plain data, references followed. A ``$`` expression, a ``%`` macro
        (another file's content) or an object to build (``_target_``) is refused: it would
        run code, or pull in config that this reader did not check."""
        followed = self._followed(value, where)
        if followed is not value:
            value, where = followed, f"{where} ({value})"
        kind = _evaluated(value)
        if kind is not None:
            raise BundleError(
                f"{self.config_path}: {where}: {_shown(value)} is {kind}; radpipe reads a bundle as data "
                "and runs none of it"
            )
        if isinstance(value, dict):
            if "_target_" in value:
                raise BundleError(
                    f"{self.config_path}: {where}: builds an object (_target_ {_shown(value['_target_'])}); "
                    "radpipe takes only literal values here"
                )
            return {str(k): self.literal(v, f"{where}.{k}") for k, v in value.items()}
        if isinstance(value, list):
            return [self.literal(v, f"{where}.{i}") for i, v in enumerate(value)]
        if value is None or isinstance(value, (str, bool, int, float)):
            return value
        raise BundleError(f"{self.config_path}: {where}: a {type(value).__name__} is not JSON data")

    def network(self) -> dict[str, Any]:
        """``network_def`` as a manifest's ``architecture``: ``{"id": "monai.networks.nets.<Name>", "params": ...}``."""
        definition = self._followed(self.config.get("network_def"), "network_def")
        if not isinstance(definition, dict) or "_target_" not in definition:
            raise BundleError(f"{self.config_path}: no network_def with a _target_: radpipe builds the network from it")
        arch_id = network_id(definition["_target_"], f"{self.config_path}: network_def")
        for key, value in definition.items():
            if key.startswith("_") and key not in ("_target_", "_desc_") and (key, value) != ("_mode_", "default"):
                raise BundleError(
                    f"{self.config_path}: network_def.{key}: {_shown(value)}; radpipe builds the network "
                    "from its _target_ and literal arguments only"
                )
        params = {k: self.literal(v, f"network_def.{k}") for k, v in definition.items() if not k.startswith("_")}
        if params.get("pretrained"):
            raise BundleError(
                f"{self.config_path}: network_def.pretrained is true: the network would download weights each "
                "time it is built; the bundle's models/model.pt holds them (set it to false)"
            )
        return {"id": arch_id, "params": params}

    def _format(self, side: str, name: str) -> dict[str, Any]:
        """``network_data_format[side][name]`` (or the only entry of ``side``)."""
        metadata = self.folder / METADATA
        formats = self.metadata.get("network_data_format")
        if not isinstance(formats, dict):
            raise BundleError(
                f"{metadata}: no network_data_format: radpipe takes the model's input shape and classes from it"
            )
        entries = formats.get(side)
        if isinstance(entries, dict) and name not in entries and len(entries) == 1:
            name = next(iter(entries))
        entry = entries.get(name) if isinstance(entries, dict) else None
        if not isinstance(entry, dict):
            raise BundleError(f"{metadata}: network_data_format.{side} has no {name!r} entry")
        return entry

    def input_spec(self) -> InputSpec:
        """The model's input from ``network_data_format.inputs.image``: ``num_channels``,
        ``spatial_shape`` (a size given as an expression such as ``16*n`` is left open) and ``dtype``."""
        image = self._format("inputs", "image")
        channels, shape = image.get("num_channels"), image.get("spatial_shape")
        dtype = str(image.get("dtype", "float32")).removeprefix("torch.")
        where = f"{self.folder / METADATA}: network_data_format.inputs"
        if not isinstance(channels, int) or not isinstance(shape, list) or len(shape) not in (2, 3):
            raise BundleError(f"{where}: needs num_channels and a spatial_shape of 2 or 3 sizes")
        if dtype not in DTYPES:
            raise BundleError(f"{where}: dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        try:
            return InputSpec(channels, tuple(s if isinstance(s, int) else None for s in shape), dtype)
        except ValueError as e:
            raise BundleError(f"{where}: {e}") from e

    def classes(self) -> list[str] | None:
        """Class names from ``network_data_format.outputs.pred.channel_def`` (None if it names none)."""
        pred = self._format("outputs", "pred")
        if pred.get("format") == "segmentation":
            raise BundleError(
                f"{self.folder / METADATA}: a segmentation network; radpipe serves classifiers "
                "(one logit per class) for now"
            )
        names = pred.get("channel_def")
        count = pred.get("num_channels")
        if not isinstance(names, dict) or not isinstance(count, int):
            return None
        by_index = {str(index): str(name) for index, name in names.items()}
        if by_index.keys() != {str(i) for i in range(count)}:
            raise BundleError(
                f"{self.folder / METADATA}: outputs channel_def names channels {sorted(by_index)}, "
                f"not the {count} of num_channels"
            )
        return [by_index[str(i)] for i in range(count)]

    def transforms(self, key: str) -> list[Any]:
        """The transforms of the Compose at ``config[key]`` (each as written, references
        followed); ``[]`` where there is none. A list given as an expression is refused
        (the caller lists it as not translated)."""
        entry = self._followed(self.config.get(key), key)
        if entry is None:
            return []
        if isinstance(entry, dict) and _name(entry.get("_target_")) == "Compose":
            entry = self._followed(entry.get("transforms"), f"{key}.transforms")
        if isinstance(entry, dict):
            entry = [entry]
        if not isinstance(entry, list):
            kind = _evaluated(entry) or "not a list of transforms"
            raise BundleError(f"{self.config_path}: {key}: {_shown(entry)} is {kind}")
        return [self._followed(item, f"{key}.{i}") for i, item in enumerate(entry)]


def read_bundle(folder: Path) -> Bundle:
    """The bundle in ``folder``, its configs parsed (nothing built, nothing evaluated)."""
    if not (folder / METADATA).is_file():
        raise BundleError(f"{folder}: not a MONAI bundle: no {METADATA}")
    config_path = next((folder / c for c in CONFIGS if (folder / c).is_file()), None)
    if config_path is None:
        raise BundleError(f"{folder}: no {' or '.join(c.name for c in CONFIGS[:2])} in configs/")
    return Bundle(folder, _read(folder / METADATA), _read(config_path), config_path)


def network_id(target: object, where: str) -> str:
    """The registry id of a ``network_def`` ``_target_``: ``DenseNet121``,
    ``monai.networks.nets.DenseNet121``, ``$monai.networks.nets.DenseNet121`` and
    ``monai.networks.nets.densenet.DenseNet121`` are all ``monai.networks.nets.DenseNet121``.
    Anything but an ``nn.Module`` class that ``monai.networks.nets`` exports is refused."""
    text = target if isinstance(target, str) else ""
    dotted = text.removeprefix("$")
    if not _DOTTED.fullmatch(dotted):
        kind = _evaluated(target) or "not a class name"
        raise BundleError(f"{where}: _target_ {_shown(target)} is {kind}; radpipe builds only {MONAI_NETS}<Name>")
    module, _, name = dotted.rpartition(".")
    if module and not f"{module}.".startswith("monai.networks."):
        raise BundleError(
            f"{where}: _target_ {target!r} is outside monai.networks; radpipe builds only the networks "
            f"{MONAI_NETS.rstrip('.')} exports, and runs nothing a bundle names"
        )
    from monai.networks import nets

    exported = getattr(nets, name, None) if not name.startswith("_") else None
    if exported is None or module not in ("", MONAI_NETS.rstrip("."), getattr(exported, "__module__", "")):
        raise BundleError(f"{where}: _target_ {target!r} is not a network that {MONAI_NETS.rstrip('.')} exports")
    try:
        factory(MONAI_NETS + name)
    except UnknownArchitecture as e:
        raise BundleError(
            f"{where}: _target_ {target!r} is a {type(exported).__name__}, not a torch.nn.Module class; "
            "radpipe builds network classes only"
        ) from e
    return MONAI_NETS + name


# --- preprocessing -> pipeline keys -------------------------------------------------------------


def _name(target: object) -> str:
    """A transform's class name as a ``_target_`` spells it (``monai.transforms.Spacingd`` -> ``Spacingd``)."""
    return target.removeprefix("$").rpartition(".")[2] if isinstance(target, str) else ""


def _number(value: float) -> float | int:
    """Whole numbers as ints, for a readable YAML fragment."""
    return int(value) if float(value).is_integer() else float(value)


class _Args:
    """A transform's literal arguments; the translator takes those it understands, and
    any argument left over (other than the ones that do not change the image) makes the
    transform untranslated rather than translated wrongly."""

    IGNORED = frozenset({"keys", "allow_missing_keys", "dtype", "lazy", "meta_keys", "meta_key_postfix"})

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values
        self.taken: set[str] = set()

    def get(self, key: str, default: Any = None) -> Any:
        self.taken.add(key)
        return self.values.get(key, default)

    def number(self, key: str, default: float | None = None) -> float | None:
        value = self.get(key, default)
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise _Untranslated(f"{key} {_shown(value)} is not one number")
        return value

    def required(self, key: str) -> float:
        value = self.number(key)
        if value is None:
            raise _Untranslated(f"no {key}")
        return value

    def sizes(self, key: str, dims: int, kind: type | tuple[type, ...] = int) -> list[Any]:
        """``dims`` positive values of ``kind`` (one value stands for all of them)."""
        value = self.get(key)
        values: list[Any] = value if isinstance(value, list) else [value] * dims
        positive = [isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in values]
        if len(values) != dims or not all(positive) or not all(isinstance(v, kind) for v in values):
            raise _Untranslated(f"{key} {_shown(value)} is not {dims} positive values")
        return values

    def expect(self, key: str, *allowed: Any) -> None:
        """An argument the translation holds for only at these values (the first is MONAI's default)."""
        if self.get(key, allowed[0]) not in allowed:
            raise _Untranslated(f"{key}={self.values[key]!r}")

    def left(self) -> list[str]:
        return sorted(self.values.keys() - self.taken - self.IGNORED)


@dataclass
class Translation:
    """Pipeline keys made from a bundle (``input``, ``preprocess``, ``postprocess``), and
    notes on what was left out or only approximated."""

    dims: int
    input: dict[str, Any] = field(default_factory=dict)
    preprocess: list[dict[str, Any]] = field(default_factory=list)
    postprocess: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def pipeline(self) -> dict[str, Any]:
        keys = {"input": self.input, "preprocess": self.preprocess, "postprocess": self.postprocess}
        return {key: value for key, value in keys.items() if value}

    def volume_only(self) -> None:
        if self.dims != 3:
            raise _Untranslated("radpipe resamples volumes only (input.kind: volume)")


def _scale_intensity_range(args: _Args, t: Translation) -> str | None:
    a_min, a_max = args.required("a_min"), args.required("a_max")
    b_min, b_max, clip = args.number("b_min"), args.number("b_max"), args.get("clip", False)
    if a_max <= a_min:
        raise _Untranslated("a_max is not above a_min")
    if b_min is None or b_max is None:
        if clip:
            raise _Untranslated("clip without both b_min and b_max")
        slope = 1 / (a_max - a_min)
        t.preprocess.append({"rescale": {"slope": slope, "intercept": _number(-a_min * slope)}})
    elif clip:
        if b_max <= b_min:
            raise _Untranslated("b_max is not above b_min")
        t.preprocess.append({"window": {"center": _number((a_min + a_max) / 2), "width": _number(a_max - a_min)}})
        if (b_min, b_max) != (0, 1):
            t.preprocess.append({"rescale": {"slope": _number(b_max - b_min), "intercept": _number(b_min)}})
    else:
        slope = (b_max - b_min) / (a_max - a_min)
        t.preprocess.append({"rescale": {"slope": slope, "intercept": _number(b_min - a_min * slope)}})
    return None


def _normalize_intensity(args: _Args, t: Translation) -> str | None:
    mean, std = args.number("subtrahend"), args.number("divisor")
    args.expect("nonzero", False)
    channel_wise = bool(args.get("channel_wise", False))
    if mean is None and std is None:  # each image's own mean and std
        t.preprocess.append({"standardize": {"channel_wise": True} if channel_wise else {}})
        return None
    if mean is None or std is None:
        raise _Untranslated("one of subtrahend and divisor given, the other from each image")
    if std <= 0:
        raise _Untranslated("divisor is not positive")
    t.preprocess.append({"normalize": {"mean": _number(mean), "std": _number(std)}})  # scalars: every channel alike
    return None


def _resize(args: _Args, t: Translation) -> str | None:
    size = args.sizes("spatial_size", t.dims)
    args.expect("size_mode", "all")
    mode, corners, antialias = args.get("mode", "area"), args.get("align_corners"), args.get("anti_aliasing", False)
    args.get("anti_aliasing_sigma")
    t.preprocess.append({"resize": size})
    ours = "bilinear, antialiased when shrinking" if t.dims == 2 else "trilinear"
    exact = not corners and not antialias and mode == ("bilinear" if t.dims == 2 else "trilinear")
    if exact and t.dims == 3:
        return None
    if exact:
        return f"the same only when enlarging (radpipe's resize of slices is {ours}; MONAI's does not antialias)"
    return f"approximated: MONAI resizes with mode={mode}{', antialiased' if antialias else ''}; radpipe, {ours}"


def _crop_or_pad(size_key: str, note: str | None) -> Callable[[_Args, Translation], str | None]:
    """CenterSpatialCrop, SpatialPad and ResizeWithPadOrCrop: crop_or_pad centres as MONAI
    does (an odd difference puts the extra voxel where MONAI puts it)."""

    def translate(args: _Args, t: Translation) -> str | None:
        size = args.sizes(size_key, t.dims)
        if size_key == "spatial_size":
            args.expect("method", "symmetric")
            args.expect("mode", "constant")
        value = args.number("value", 0)
        t.preprocess.append({"crop_or_pad": size} if value == 0 else {"crop_or_pad": {**_sized(size), "value": value}})
        return note

    return translate


def _sized(size: list[int]) -> dict[str, int]:
    return dict(zip(("depth", "height", "width")[-len(size) :], size, strict=True))


def _spacing(args: _Args, t: Translation) -> str | None:
    t.volume_only()
    pixdim = args.sizes("pixdim", 3, (int, float))
    args.expect("mode", "bilinear")
    args.expect("padding_mode", "border")
    for key in ("diagonal", "align_corners", "scale_extent"):
        args.expect(key, False)
    args.get("recompute_affine")  # the affine after resampling, not the voxels
    t.input["spacing"] = [_number(p) for p in pixdim]
    if any(next(iter(step)) in ("window", "stack") for step in t.preprocess):
        return "radpipe resamples before it windows, the bundle after (values at the window's edges differ)"
    return None


RAS_LABELS = [["L", "R"], ["P", "A"], ["I", "S"]]  # what Orientation's letters mean (MONAI's RAS space)


def _orientation(args: _Args, t: Translation) -> str | None:
    t.volume_only()
    axcodes = args.get("axcodes")
    args.expect("as_closest_canonical", False)
    args.expect("labels", None, RAS_LABELS)
    if not isinstance(axcodes, str) or len(axcodes) != 3:
        raise _Untranslated(f"axcodes {_shown(axcodes)} is not a 3-letter code")
    t.input["orientation"] = axcodes.upper()
    return None


def _sliding_window(args: _Args, t: Translation) -> str | None:
    if t.dims != 3:
        raise _Untranslated("radpipe runs windows over volumes only")
    window = {"roi_size": args.sizes("roi_size", 3), "overlap": args.number("overlap", 0.25)}
    window["sw_batch_size"] = args.get("sw_batch_size", 1)
    args.expect("mode", "constant")
    args.expect("padding_mode", "constant")
    for key in ("sw_device", "device", "progress", "cache_roi_weight_map", "cpu_thresh", "buffer_steps"):
        args.get(key)  # where and how MONAI computes, not what
    t.input["sliding_window"] = window
    return "each window gets its own class scores, and postprocess.aggregate joins them (MONAI blends windows)"


def _activations(args: _Args, t: Translation) -> str | None:
    softmax, sigmoid = bool(args.get("softmax", False)), bool(args.get("sigmoid", False))
    args.expect("other", None)
    args.get("dim")
    if softmax == sigmoid:
        raise _Untranslated("neither softmax nor sigmoid alone: radpipe applies postprocess.activation (softmax)")
    t.postprocess["activation"] = "softmax" if softmax else "sigmoid"
    return None


Translator = Callable[[_Args, Translation], str | None]

# Per section of the inference config: MONAI transform (or inferer) -> what it becomes. A
# dictionary transform (``Spacingd``, ``SpacingD``, ``SpacingDict``) translates as its array transform.
TRANSLATORS: dict[str, dict[str, Translator]] = {
    "preprocessing": {
        "ScaleIntensityRange": _scale_intensity_range,
        "NormalizeIntensity": _normalize_intensity,
        "Resize": _resize,
        "CenterSpatialCrop": _crop_or_pad("roi_size", "crop_or_pad also pads an image smaller than roi_size"),
        "SpatialPad": _crop_or_pad("spatial_size", "crop_or_pad also crops an image larger than spatial_size"),
        "ResizeWithPadOrCrop": _crop_or_pad("spatial_size", None),
        "Spacing": _spacing,
        "Orientation": _orientation,
    },
    "inferer": {"SlidingWindowInferer": _sliding_window},
    "postprocessing": {"Activations": _activations},
}
# What the node does anyway: it reads DICOM, adds the channel axis, makes float32 tensors,
# runs whole images unless told otherwise, and turns probabilities into findings by threshold.
IMPLICIT = frozenset(
    {"LoadImage", "EnsureChannelFirst", "AddChannel", "EnsureType", "ToTensor", "ToDevice", "Identity"}
    | {"SimpleInferer", "AsDiscrete", "SaveImage", "Invert", "CopyItems"}
)


def _canonical(name: str, known: dict[str, Translator]) -> str:
    for base in (name, name.removesuffix("Dict"), name.removesuffix("D"), name.removesuffix("d")):
        if base in known or base in IMPLICIT:
            return base
    return name


def _translate_one(bundle: Bundle, transform: Any, where: str, known: dict[str, Translator], t: Translation) -> None:
    if not isinstance(transform, dict):
        t.notes.append(f"not translated: {where} {_shown(transform)}: {_evaluated(transform) or 'not a transform'}")
        return
    written = transform.get("_target_")
    name = _canonical(_name(written), known)
    if name in IMPLICIT or transform.get("_disabled_") is True:
        return
    try:
        if name not in known:
            raise _Untranslated("no pipeline key does what it does")
        try:
            args = _Args(bundle.literal({k: v for k, v in transform.items() if not k.startswith("_")}, where))
        except BundleError as e:
            raise _Untranslated(bundle.unplaced(e)) from e
        note = known[name](args, t)
        if args.left():
            raise _Untranslated(f"its argument(s) {', '.join(args.left())}")
    except _Untranslated as e:
        t.notes.append(f"not translated: {where} {written}: {e}")
        return
    if note:
        t.notes.append(f"{where} {written}: {note}")


def translate(bundle: Bundle, dims: int) -> Translation:
    """The bundle's ``preprocessing``, ``inferer`` and ``postprocessing`` as pipeline keys
    for a model of ``dims`` spatial dimensions, with notes on what does not map."""
    t = Translation(dims, {"kind": "volume"} if dims == 3 else {})
    for key, known in TRANSLATORS.items():
        try:
            transforms = bundle.transforms(key)
        except BundleError as e:
            t.notes.append(f"not translated: {bundle.unplaced(e)}")
            continue
        if key == "preprocessing" and not transforms:
            t.notes.append("the bundle has no preprocessing: the pipeline's preprocess is yours to write")
        for index, transform in enumerate(transforms):
            _translate_one(bundle, transform, key if key == "inferer" else f"{key}[{index}]", known, t)
    return t
