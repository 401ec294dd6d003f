"""What an optimized artifact records besides its weights, and ONNX files for comparison.

An optimized artifact is an ordinary radpipe artifact of format ``module``, written by
plugin/models/artifact.py's ``write_artifact`` (staged and renamed into place): the
weights file holds the fp32 (pruned) weights and, for int8, the quantization observers'
statistics under ``observer.*``; the manifest adds what the node needs to rebuild the
served program (``layers``, ``quantization``, ``gpu``) and what a reviewer needs to trust
it (where it came from, complexity before/after, calibration, evaluation, versions).
"""

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from plugin.preprocess import PreprocessStep


def preprocessing_record(steps: list[PreprocessStep]) -> dict[str, Any]:
    """The steps and their hash: an artifact is only valid behind the preprocessing it was
    calibrated and evaluated with."""
    dumped = [step.model_dump(exclude_none=True) for step in steps]
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return {"steps": dumped, "sha256": hashlib.sha256(canonical.encode()).hexdigest()}


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
