"""Writing optimized artifacts (and ONNX files for comparison).

An optimized artifact is an ordinary radpipe artifact, ``weights.safetensors`` plus
``manifest.json``, that the node loads with the same hash checks. The weights file holds
the fp32 (pruned) weights and, for int8, the quantization observers' statistics under
``observer.*``; the manifest adds what the node needs to rebuild the served program
(``layers``, ``quantization``, ``gpu``) and what a reviewer needs to trust it (where it
came from, complexity before/after, calibration, evaluation, versions). The directory is
written beside its target and renamed into place, so a reader never sees half of it.
"""

import hashlib
import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from plugin.models.artifact import FORMAT_VERSION, MANIFEST, WEIGHTS, sha256_file
from plugin.preprocess import PreprocessStep


def preprocessing_record(steps: list[PreprocessStep]) -> dict[str, Any]:
    """The steps and their hash: an artifact is only valid behind the preprocessing it was
    calibrated and evaluated with."""
    dumped = [step.model_dump(exclude_none=True) for step in steps]
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return {"steps": dumped, "sha256": hashlib.sha256(canonical.encode()).hexdigest()}


def versions() -> dict[str, str]:
    found = {"torch": str(torch.__version__)}
    for package in ("torchao", "torch-pruning", "monai"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_artifact(target: Path, tensors: dict[str, Tensor], manifest: dict[str, Any], replace: bool = False) -> Path:
    """Write ``tensors`` and ``manifest`` (plus hashes and versions) as the artifact ``target``."""
    if target.exists() and not replace:
        raise FileExistsError(f"{target} exists; pass --force to replace it")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(staging / WEIGHTS))
        full = {
            "format": FORMAT_VERSION,
            **manifest,
            "torch_version": torch.__version__.split("+")[0],
            "versions": versions(),
            "files": {WEIGHTS: sha256_file(staging / WEIGHTS)},
        }
        (staging / MANIFEST).write_text(json.dumps(full, indent=2) + "\n")
        staging.chmod(0o755)
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> Path:
    """fp32 ONNX with a dynamic batch axis (TorchScript-based exporter: no onnxscript needed)."""
    import warnings

    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not gone
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
        )
    return path
