"""``radpipe import``: a model trained elsewhere becomes a radpipe artifact.

A source is read by the reader of its kind (:data:`SOURCES`, the first that claims it):

- a ``.pt2`` file (``torch.export.save``): kept as it is, ``format: torch-export``;
- a ``.onnx`` file: kept as it is, ``format: onnx`` (needs ``radpipe[onnx]``);
- a folder: a MONAI bundle, read as data (plugin/models/monai_bundle.py): its
  ``network_def`` becomes ``monai.networks.nets.<Name>``, ``models/model.pt`` safetensors,
  ``network_data_format`` the input and classes, and its preprocessing pipeline keys,
  ``format: module``;
- otherwise an architecture id (plugin/models/registry.py: a built-in, an installed
  package's ``radpipe.architectures`` entry point, or ``monai.networks.nets.<Name>``) with
  ``--weights`` (safetensors, or a state dict that ``torch.load(weights_only=True)`` reads)
  and ``--params`` (the factory's keyword arguments): ``format: module``.

A reader returns the artifact's files and what the source itself records (input,
classes); :func:`import_model` adds what the command line gives, writes the artifact
through :func:`~plugin.models.artifact.write_artifact` and, before it is renamed into
place, loads it exactly as the node will (every check of invariant 9 included) and runs
it once, so an artifact that is written is one the node can serve. Nothing a source
contains is executed: programs and graphs are checked as data, weights are tensors, and
architectures are code already installed here.

This module is for the command only; the node never imports it.
"""

import hashlib
import io
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from torch import Tensor

from plugin.models.artifact import (
    MODEL_FILES,
    MODULE,
    ONNX,
    TORCH_EXPORT,
    WEIGHTS,
    ArtifactError,
    FileContent,
    load_artifact,
    sha256_file,
    write_artifact,
)
from plugin.models.inputspec import InputSpec
from plugin.models.monai_bundle import CHECKPOINT_KEYS, MODEL_PT, BundleError, read_bundle, translate
from plugin.models.onnx_model import OnnxError
from plugin.models.onnx_model import input_spec as onnx_input_spec
from plugin.models.pt2 import ProgramError, load_program
from plugin.models.pt2 import input_spec as program_input_spec
from plugin.models.registry import UnknownArchitecture, factory


class ImportRefused(Exception):
    """The source cannot become an artifact; ``str()`` says why in one line."""


@dataclass(frozen=True)
class ImportRequest:
    """What ``radpipe import`` was given. ``input`` and ``classes`` complete (or must
    agree with) what the source records; ``weights`` and ``params`` are for an
    architecture id."""

    source: str
    out: Path
    name: str | None = None
    classes: list[str] | None = None
    task: str = "classification"
    input: InputSpec | None = None
    weights: Path | None = None
    params: dict[str, Any] = field(default_factory=dict)
    force: bool = False


@dataclass(frozen=True)
class Imported:
    """What a reader makes of a source: the artifact's files, its manifest keys
    (``format`` at least), the input and classes the source records (None where it records
    none), notes for the user (what the node will do differently, what was left out), and
    the pipeline keys the source's own preprocessing translates to (a MONAI bundle's)."""

    files: dict[str, FileContent]
    manifest: dict[str, Any]
    input: InputSpec | None = None
    classes: list[str] | None = None
    notes: list[str] = field(default_factory=list)
    pipeline: dict[str, Any] = field(default_factory=dict)


Reader = Callable[[ImportRequest], Imported]


def _file(request: ImportRequest) -> tuple[Path, bytes]:
    path = Path(request.source)
    try:
        return path, path.read_bytes()
    except OSError as e:
        raise ImportRefused(f"{path}: cannot read it: {e.strerror}") from e


def _provenance(path: Path, sha256: str) -> dict[str, str]:
    return {"file": path.name, "sha256": sha256}


def _batch_note(spec: InputSpec | None) -> list[str]:
    if spec is None or spec.batch is None:
        return []
    return [f"exported for batch size {spec.batch} only: the node gives it {spec.batch} image(s) per call, padded"]


def read_program(request: ImportRequest) -> Imported:
    """A torch.export program, checked as data (plugin/models/pt2.py) and loaded once."""
    path, data = _file(request)
    try:
        program = load_program(data)
        spec = program_input_spec(program)
    except ProgramError as e:
        raise ImportRefused(f"{path}: refused: {e}") from e
    except Exception as e:  # torch's own loader raises many types on a damaged or foreign file
        raise ImportRefused(f"{path}: torch.export cannot load it: {' '.join(str(e).split())}") from e
    manifest = {"format": TORCH_EXPORT, "imported_from": _provenance(path, hashlib.sha256(data).hexdigest())}
    return Imported({MODEL_FILES[TORCH_EXPORT]: data}, manifest, spec, notes=_batch_note(spec))


def read_onnx(request: ImportRequest) -> Imported:
    """An ONNX graph, parsed and checked by ONNX Runtime."""
    path, data = _file(request)
    try:
        spec = onnx_input_spec(data)
    except OnnxError as e:
        raise ImportRefused(f"{path}: {e}") from e
    manifest = {"format": ONNX, "imported_from": _provenance(path, hashlib.sha256(data).hexdigest())}
    return Imported({MODEL_FILES[ONNX]: data}, manifest, spec, notes=_batch_note(spec))


def read_state_dict(path: Path, wrappers: Sequence[str] = ()) -> dict[str, Tensor]:
    """Tensors by name from a safetensors file or a ``torch.save``'d state dict, read
    with ``weights_only=True``: a pickled object other than tensors is refused, never run.
    ``wrappers``: keys under which a checkpoint may hold the state dict (``{"model": ...}``)."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImportRefused(f"{path}: cannot read it: {e.strerror}") from e
    try:
        if data[8:9] == b"{":  # safetensors: an 8-byte header length, then its JSON header
            loaded: object = load_safetensors(data)
        else:
            loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except SafetensorError as e:
        raise ImportRefused(f"{path}: not a safetensors file: {e}") from e
    except Exception as e:  # pickle.UnpicklingError for what weights_only refuses; anything for a foreign file
        refused = re.search(r"GLOBAL ([\w.]+)", str(e))
        if refused is None:
            raise ImportRefused(f"{path}: not a weights file torch.load can read: {type(e).__name__}: {e}") from e
        raise ImportRefused(
            f"{path}: holds a pickled {refused[1]}, not only tensors; radpipe reads weights as tensors alone "
            "(torch.load weights_only=True): save model.state_dict(), or safetensors"
        ) from e
    if isinstance(loaded, Mapping) and not all(isinstance(v, Tensor) for v in loaded.values()):
        loaded = next((loaded[key] for key in wrappers if isinstance(loaded.get(key), Mapping)), loaded)
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        keys = list(loaded)[:5] if isinstance(loaded, Mapping) else type(loaded).__name__
        raise ImportRefused(f"{path}: not a state dict of tensors ({keys}): save model.state_dict()")
    return {str(k): v for k, v in loaded.items()}


def read_architecture(request: ImportRequest) -> Imported:
    """A registered architecture and a weights file: the weights become safetensors."""
    try:
        factory(request.source)
    except UnknownArchitecture as e:
        raise ImportRefused(f"{request.source}: neither a .pt2 or .onnx file nor a known architecture: {e}") from e
    if request.weights is None:
        raise ImportRefused(f"{request.source}: an architecture needs its weights: give --weights FILE")
    tensors = read_state_dict(request.weights)
    manifest = {
        "format": MODULE,
        "architecture": {"id": request.source, "params": request.params},
        "imported_from": {"architecture": request.source, **_provenance(request.weights, sha256_file(request.weights))},
    }
    return Imported({WEIGHTS: tensors}, manifest)


def read_monai_bundle(request: ImportRequest) -> Imported:
    """A MONAI bundle folder: nothing in it is built or evaluated but the weights, read as
    tensors; the network is MONAI's own class, installed here."""
    folder = Path(request.source)
    try:
        bundle = read_bundle(folder)
        architecture = bundle.network()
        spec = bundle.input_spec()
        classes = bundle.classes()
        translation = translate(bundle, len(spec.spatial))
    except BundleError as e:
        raise ImportRefused(str(e)) from e
    dims = architecture["params"].get("spatial_dims", len(spec.spatial))
    if dims != len(spec.spatial):
        raise ImportRefused(
            f"{bundle.config_path}: network_def.spatial_dims is {dims}, but network_data_format's input has "
            f"{len(spec.spatial)} spatial dimensions"
        )
    tensors = read_state_dict(bundle.weights, CHECKPOINT_KEYS)
    manifest = {
        "format": MODULE,
        "architecture": architecture,
        "imported_from": {
            "monai_bundle": folder.resolve().name,
            "name": bundle.metadata.get("name"),
            "version": bundle.metadata.get("version"),
            "file": str(MODEL_PT),
            "sha256": sha256_file(bundle.weights),
            "pipeline": translation.pipeline,
            "notes": translation.notes,
        },
    }
    return Imported({WEIGHTS: tensors}, manifest, spec, classes, translation.notes, translation.pipeline)


# Source kinds, most specific first: the first whose test accepts SOURCE reads it; the
# architecture id takes the rest.
SOURCES: list[tuple[Callable[[str], bool], Reader]] = [
    (lambda source: source.endswith(".pt2"), read_program),
    (lambda source: source.endswith(".onnx"), read_onnx),
    (lambda source: Path(source).is_dir(), read_monai_bundle),
    (lambda source: True, read_architecture),
]


def _input(recorded: InputSpec | None, given: InputSpec | None) -> InputSpec:
    """The source's input completed by ``--input``, which must agree where the source fixes a size."""
    if given is None:
        if recorded is None:
            raise ImportRefused("the source records no input shape: give --input CxHxW (or CxDxHxW), e.g. 1x128x128")
        return recorded
    if recorded is None:
        return given
    if recorded.mismatch((given.channels, *given.spatial)) is not None:
        raise ImportRefused(f"--input {given.text()} does not fit the input the model records, {recorded.text()}")
    return InputSpec(given.channels, given.spatial, recorded.dtype, recorded.batch)


def _run_once(classes: list[str], task: str, out: Path) -> Callable[[Path], None]:
    """The check of the staged artifact: loaded as the node loads it, and run on two
    blank inputs, it returns one logit per class (segmentation: per class and voxel)."""

    def check(staging: Path) -> None:
        try:
            artifact = load_artifact(staging, torch.device("cpu"))
        except ArtifactError as e:
            raise ImportRefused(" ".join(str(e).replace(str(staging), str(out)).split())) from e
        spec = artifact.input
        assert spec is not None  # written by import_model
        blank = torch.zeros((2, spec.channels, *(64 if size is None else size for size in spec.spatial)))
        try:
            with torch.inference_mode():
                logits = artifact.module(blank)
        except Exception as e:  # whatever the model raises on its own input
            raise ImportRefused(f"the model fails on a {spec.text()} input: {' '.join(str(e).split())}") from e
        per_voxel = task == "segmentation"
        expected = (2, len(classes), *blank.shape[2:]) if per_voxel else (2, len(classes))
        if tuple(logits.shape) != expected:
            what = "for each voxel of its input" if per_voxel else "per input"
            raise ImportRefused(
                f"the model returns {'x'.join(map(str, logits.shape[1:]))} values per input, not one logit "
                f"for each of the {len(classes)} classes ({', '.join(classes)}) {what}"
            )

    return check


def import_model(request: ImportRequest) -> tuple[Path, Imported]:
    """Write the artifact for ``request``; returns its folder and what it holds."""
    if request.out.exists() and not request.force:
        raise ImportRefused(f"{request.out} exists; pass --force to replace it")
    reader = next(read for claims, read in SOURCES if claims(request.source))
    imported = reader(request)
    spec = _input(imported.input, request.input)
    classes = request.classes or imported.classes
    if not classes:
        raise ImportRefused("the source records no class names: give --classes, e.g. --classes normal,nodule")
    if len(set(classes)) != len(classes):
        raise ImportRefused(f"--classes names a class twice: {', '.join(classes)}")
    manifest = {
        **imported.manifest,
        "name": request.name or request.out.name,
        "task": request.task,
        "input": spec.to_manifest(),
        "classes": classes,
        "precision": "fp32" if spec.dtype == "float32" else spec.dtype.replace("float", "fp"),
    }
    target = write_artifact(
        request.out,
        imported.files,
        manifest,
        replace=request.force,
        check=_run_once(classes, request.task, request.out),
    )
    return target, replace(imported, manifest=manifest, input=spec, classes=classes)
