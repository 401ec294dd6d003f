"""Model artifacts: a directory with ``weights.safetensors`` and ``manifest.json``.

The manifest is the source of truth: which registered architecture to build (and with
which parameters), what input it expects, its class names, and the sha256 of every
file. Loading checks every hash before reading a byte of weights, and weights are read
with safetensors, which cannot execute code (unlike a pickled ``torch.save``).
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from plugin.models.architectures import build

MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
FORMAT_VERSION = 1
# manifest keys of artifacts written by `radpipe optimize` (see plugin/models/serving.py)
OPTIMIZED_KEYS = {"layers", "quantization", "gpu"}


class ArtifactError(Exception):
    """The artifact is missing, incomplete, or does not match its recorded hashes."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Artifact:
    """A loaded, hash-checked model with its manifest."""

    path: Path
    manifest: dict[str, Any]
    module: nn.Module

    @property
    def sha256(self) -> str:
        """Hash of the weights file: what the SR records as the model's identity."""
        return self.manifest["files"][WEIGHTS]

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def precision(self) -> str:
        return str(self.manifest.get("precision", "fp32"))


def save_artifact(directory: Path, module: nn.Module, manifest: dict[str, Any]) -> Path:
    """Write weights and a manifest whose ``files`` section hashes them.

    ``manifest`` must hold ``architecture`` ({"id", "params"}), ``input`` and ``classes``;
    anything else (training, evaluation figures) is recorded as given.
    """
    for key in ("architecture", "input", "classes"):
        if key not in manifest:
            raise ValueError(f"manifest: missing required key {key!r}")
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().contiguous().cpu() for name, t in module.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS))
    full = {
        "format": FORMAT_VERSION,
        **manifest,
        "torch_version": torch.__version__.split("+")[0],
        "files": {WEIGHTS: sha256_file(directory / WEIGHTS)},
    }
    (directory / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
    return directory


def read_manifest(directory: Path) -> dict[str, Any]:
    """Read and hash-check an artifact's manifest; raise :class:`ArtifactError` if wrong."""
    manifest_path = directory / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{directory}: no {MANIFEST}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{manifest_path}: not valid JSON: {e}") from e
    files = manifest.get("files")
    if not isinstance(files, dict) or WEIGHTS not in files:
        raise ArtifactError(f"{manifest_path}: 'files' must record the sha256 of {WEIGHTS}")
    for name, expected in files.items():
        file_path = directory / name
        if not file_path.is_file():
            raise ArtifactError(f"{directory}: {name} is listed in the manifest but missing")
        actual = sha256_file(file_path)
        if actual != expected:
            raise ArtifactError(
                f"{file_path}: sha256 {actual} does not match the manifest's {expected}; "
                "refusing to load a modified artifact"
            )
    return manifest


def load_artifact(directory: Path, device: torch.device, manifest: dict[str, Any] | None = None) -> Artifact:
    """Load a hash-checked artifact onto ``device`` in eval mode. ``manifest``: what
    :func:`read_manifest` just returned for ``directory``, so its files are not hashed twice."""
    if manifest is None:
        manifest = read_manifest(directory)
    try:
        module = build(manifest["architecture"])
        if OPTIMIZED_KEYS & manifest.keys():
            # written by `radpipe optimize`: pruned layer shapes, int8 or GPU variants
            from plugin.models.serving import load_optimized

            module, precision = load_optimized(module, load_file(str(directory / WEIGHTS)), manifest, device)
            manifest = {**manifest, "precision": precision}  # what actually serves on this device
        else:
            module.load_state_dict(load_file(str(directory / WEIGHTS)))
            module.eval().to(device)
    except (KeyError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{directory}: weights do not fit the manifest's architecture: {e}") from e
    return Artifact(path=directory, manifest=manifest, module=module)
