"""Model artifacts: a folder with ``manifest.json`` and the model's files.

The manifest is the source of truth (its keys are a contract, documented in
pipelines/README.md, "The artifact manifest"): the ``format`` the model is stored in, the
``task``, the ``input`` it takes, its ``classes``, the sha256 of every file, and the
library versions that wrote it. Formats:

- ``module``: a registered architecture (plugin/models/registry.py) and its weights in
  ``weights.safetensors``;
- ``torch-export``: a torch.export program, ``model.pt2``, checked as data (plugin/models/pt2.py);
- ``onnx``: an ONNX graph, ``model.onnx``, served by ONNX Runtime (plugin/models/onnx_model.py).

Loading checks every hash before reading a byte of a model, and none of the formats
carries code that loading would run (DESIGN invariant 9). Whatever the format, the loaded
:class:`Artifact` serves through one interface: ``module`` maps a float32 batch on
``device`` to logits.
"""

import hashlib
import json
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from plugin import __version__
from plugin.models.adapter import SpecAdapter
from plugin.models.compile_cache import CompileCache
from plugin.models.inputspec import InputSpec, input_mismatch
from plugin.models.onnx_model import OnnxModule
from plugin.models.pt2 import load_program, program_module
from plugin.models.registry import build
from plugin.pipeline import Pipeline

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
MODULE, TORCH_EXPORT, ONNX = "module", "torch-export", "onnx"
MODEL_FILES = {MODULE: WEIGHTS, TORCH_EXPORT: "model.pt2", ONNX: "model.onnx"}  # the file the SR's model hash is of
TASKS = ("classification", "segmentation")  # class logits per image or window; per-voxel
# manifest keys of artifacts written by `radpipe optimize` (see plugin/models/serving.py)
OPTIMIZED_KEYS = {"layers", "quantization", "gpu"}

FileContent = bytes | Mapping[str, Tensor]  # bytes as they are, or tensors for safetensors


class ArtifactError(Exception):
    """The artifact is missing, incomplete, does not match its recorded hashes, or holds
    a model radpipe will not load."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def artifact_format(manifest: dict[str, Any]) -> str:
    """The manifest's ``format``; ``format: 1`` (written before the formats existed) is ``module``."""
    value = manifest.get("format", MODULE)
    return MODULE if value == 1 else str(value)


def model_file(manifest: dict[str, Any]) -> str:
    return MODEL_FILES[artifact_format(manifest)]


def model_sha256(manifest: dict[str, Any]) -> str:
    """The model's identity, as the SR records it: the model file's sha256. A program
    quantized by ``radpipe optimize`` serves from ``model.pt2`` and the observer
    statistics in ``weights.safetensors`` together: its identity is the hash of both
    hashes, so that two calibrations of one program differ."""
    files = manifest["files"]
    own = str(files[model_file(manifest)])
    if artifact_format(manifest) == TORCH_EXPORT and "quantization" in manifest:
        return hashlib.sha256(f"{own} {files[WEIGHTS]}".encode()).hexdigest()
    return own


def versions() -> dict[str, str]:
    """The versions of what reads and runs the model, recorded in every manifest."""
    found = {"radpipe": __version__, "torch": str(torch.__version__)}
    for package in ("torchao", "torch-pruning", "monai", "onnxruntime"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def describe(manifest: dict[str, Any]) -> str:
    """One line on what an artifact holds, for the command line."""
    spec = InputSpec.from_manifest(manifest.get("input", {}))
    batch = "" if spec is None else f" ({'any batch' if spec.batch is None else f'batch {spec.batch} only'})"
    shape = "not recorded" if spec is None else spec.text()
    return f"{artifact_format(manifest)} model, input {shape}{batch}, classes {', '.join(manifest['classes'])}"


@dataclass(frozen=True)
class Artifact:
    """A loaded, hash-checked model with its manifest. ``module`` takes a float32 batch
    on ``device`` and returns the logits; ``device`` is where the model runs."""

    path: Path
    manifest: dict[str, Any]
    module: nn.Module
    device: torch.device

    @property
    def format(self) -> str:
        return artifact_format(self.manifest)

    @property
    def sha256(self) -> str:
        """Hash of the model's file (weights, program or graph): what the SR records as
        the model's identity (:func:`model_sha256`)."""
        return model_sha256(self.manifest)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp32"))

    @property
    def input(self) -> InputSpec | None:
        return InputSpec.from_manifest(self.manifest.get("input", {}))


def write_artifact(
    target: Path,
    files: Mapping[str, FileContent],
    manifest: dict[str, Any],
    replace: bool = False,
    check: Callable[[Path], object] | None = None,
) -> Path:
    """Write ``files`` and ``manifest`` (plus the files' hashes and the library versions)
    as the artifact folder ``target``. The folder is staged beside ``target``, checked
    with ``check`` (e.g. loaded as the node would load it) and renamed into place, so a
    reader never sees half of it and a failed check leaves nothing behind."""
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists; pass --force to replace it")
    for key in ("format", "classes", "input"):
        if key not in manifest:
            raise ValueError(f"manifest: missing required key {key!r}")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name, content in files.items():
            if isinstance(content, bytes):
                (staging / name).write_bytes(content)
            else:
                save_file({k: v.detach().contiguous().cpu() for k, v in content.items()}, str(staging / name))
        full = {**manifest, "versions": versions(), "files": {name: sha256_file(staging / name) for name in files}}
        (staging / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        staging.chmod(0o755)
        if check is not None:
            check(staging)
        if target.exists():
            previous = target.with_name(f".{target.name}.replaced")
            target.rename(previous)
            staging.rename(target)
            shutil.rmtree(previous)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def save_artifact(directory: Path, module: nn.Module, manifest: dict[str, Any]) -> Path:
    """Write ``module`` as a ``module`` artifact. ``manifest`` must hold ``architecture``
    ({"id", "params"}), ``input`` and ``classes``; anything else (training, evaluation
    figures) is recorded as given."""
    if "architecture" not in manifest:
        raise ValueError("manifest: missing required key 'architecture'")
    return write_artifact(directory, {WEIGHTS: module.state_dict()}, {"format": MODULE, **manifest}, replace=True)


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and hash-check an artifact's manifest; raise :class:`ArtifactError` if wrong."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{manifest_path}: not valid JSON: {e}") from e
    kind = artifact_format(manifest)
    if kind not in MODEL_FILES:
        raise ArtifactError(f"{manifest_path}: unknown format {kind!r}; radpipe reads {', '.join(MODEL_FILES)}")
    task = manifest.get("task", TASKS[0])
    if task not in TASKS:
        raise ArtifactError(f"{manifest_path}: task {task!r} is not one this radpipe serves ({', '.join(TASKS)})")
    try:
        InputSpec.from_manifest(manifest.get("input", {}))
    except (TypeError, ValueError) as e:
        raise ArtifactError(f"{manifest_path}: input: {e}") from e
    files = manifest.get("files")
    if not isinstance(files, dict) or MODEL_FILES[kind] not in files:
        raise ArtifactError(f"{manifest_path}: 'files' must record the sha256 of {MODEL_FILES[kind]}")
    for name, expected in files.items():
        file_path = directory / name
        if Path(name).name != name or not file_path.is_file():
            raise ArtifactError(f"{directory}: {name} is listed in the manifest but missing")
        actual = sha256_file(file_path)
        if actual != expected:
            raise ArtifactError(
                f"{file_path}: sha256 {actual} does not match the manifest's {expected}; "
                "refusing to load a modified artifact"
            )
    return manifest


def serving_problem(pipeline: Pipeline) -> str | None:
    """Why ``pipeline``'s artifact cannot serve it, found without loading the model: a
    file that does not match its hash, a manifest radpipe does not read, or an input the
    pipeline's preprocessing does not yield. None if there is none of those."""
    try:
        manifest = read_manifest(pipeline.artifact_dir)
    except ArtifactError as e:
        return str(e)
    return input_mismatch(InputSpec.from_manifest(manifest.get("input", {})), pipeline)


def checked_bytes(directory: Path, manifest: dict[str, Any], name: str | None = None) -> bytes:
    """A file's bytes (the model file's by default), hash-checked as read: the bytes
    checked are the bytes loaded."""
    name = name or model_file(manifest)
    data = (directory / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]:
        raise ArtifactError(f"{directory / name}: changed since its hash was checked; refusing to load it")
    return data


def _spec(directory: Path, manifest: dict[str, Any]) -> InputSpec:
    spec = InputSpec.from_manifest(manifest.get("input", {}))
    if spec is None:
        raise ArtifactError(f"{directory}: the manifest's input must record channels and sizes")
    return spec


def _load_module(
    directory: Path, manifest: dict[str, Any], device: torch.device, cache: CompileCache | None
) -> tuple[nn.Module, dict[str, Any]]:
    module = build(manifest["architecture"])
    if OPTIMIZED_KEYS & manifest.keys():
        # written by `radpipe optimize`: pruned layer shapes, int8 or GPU variants
        from plugin.models.serving import load_optimized

        module, precision = load_optimized(module, load_file(str(directory / WEIGHTS)), manifest, device, cache)
        return module, {**manifest, "precision": precision}  # what actually serves on this device
    module.load_state_dict(load_file(str(directory / WEIGHTS)))
    return module.eval().to(device), manifest


def _one_line(error: Exception, limit: int = 400) -> str:
    """A loader's message on one line, cut short (a state dict's lists every tensor)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _device(module: nn.Module, fallback: torch.device) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else fallback


def load_artifact(
    directory: Path,
    device: torch.device,
    manifest: dict[str, Any] | None = None,
    compile_cache: CompileCache | None = None,
) -> Artifact:
    """Load a hash-checked artifact onto ``device`` in eval mode. ``manifest``: what
    :func:`read_manifest` just returned for ``directory``, so its files are not hashed twice.
    ``compile_cache``: the node's cache of compiled int8 programs (none: compiled in process)."""
    if manifest is None:
        manifest = read_manifest(directory)
    kind = artifact_format(manifest)
    if kind == MODULE:
        try:
            module, manifest = _load_module(directory, manifest, device, compile_cache)
        except (KeyError, ValueError, RuntimeError) as e:
            raise ArtifactError(f"{directory}: weights do not fit the manifest's architecture: {_one_line(e)}") from e
        return Artifact(directory, manifest, module, _device(module, device))
    spec = _spec(directory, manifest)
    data = checked_bytes(directory, manifest)
    try:
        if kind == TORCH_EXPORT and "quantization" in manifest:
            # written by `radpipe optimize`: the program's int8 variant, rebuilt here
            from plugin.models.serving import load_quantized_program

            observers = load_safetensors(checked_bytes(directory, manifest, WEIGHTS))
            program = load_quantized_program(load_program(data), observers, manifest, device, compile_cache)
            return Artifact(directory, manifest, SpecAdapter(program, spec), _device(program, device))
        if kind == TORCH_EXPORT:
            program = program_module(load_program(data), device)
            return Artifact(directory, manifest, SpecAdapter(program, spec), _device(program, device))
        session = OnnxModule(data, device)
        return Artifact(directory, manifest, SpecAdapter(session, spec), session.device)
    except Exception as e:  # refused by radpipe's checks, or by torch / ONNX Runtime, whatever they raise
        raise ArtifactError(f"{directory / model_file(manifest)}: {_one_line(e)}") from e
