"""What an optimized artifact records besides its model, and ONNX files for comparison.

An optimized artifact is an ordinary radpipe artifact in its source's format, written by
plugin/models/artifact.py's ``write_artifact`` (staged and renamed into place):

- ``module``: the weights file holds the fp32 (pruned) weights and, for int8, the
  quantization observers' statistics under ``observer.*``;
- ``torch-export``: the imported ``model.pt2`` as it was, and the observer statistics in
  ``weights.safetensors``;
- ``onnx``: the graph ONNX Runtime's static quantization made, in ``model.onnx``.

The manifest adds what the node needs to rebuild the served program (``layers``,
``quantization``, ``gpu``) and what a reviewer needs to trust it (where it came from,
complexity before/after, calibration, evaluation, versions).
"""

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from plugin.preprocess import PreprocessStep


def preprocessing_record(steps: list[PreprocessStep], shape: Sequence[int]) -> dict[str, Any]:
    """The steps and their hash: an artifact is only valid behind the preprocessing it was
    calibrated and evaluated with; and the ``shape`` (C, *spatial) of what they yielded,
    which the node compiles an int8 program for where the model's input leaves a size open."""
    dumped = [step.model_dump(exclude_none=True) for step in steps]
    canonical = json.dumps(dumped, sort_keys=True, separators=(",", ":"))
    return {"steps": dumped, "sha256": hashlib.sha256(canonical.encode()).hexdigest(), "shape": list(shape)}


class _Forward(nn.Module):
    """Calls ``model.forward`` itself, in the mode the model is in. An imported program's
    graph checks its input in a forward pre-hook that TorchScript tracing cannot follow,
    and refuses ``train()``/``eval()``, which the exporter would call."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.training = False  # every model exported here is in eval mode

    def forward(self, images: Tensor) -> Tensor:
        return self.model.forward(images)


def export_onnx(model: nn.Module, example: Tensor, path: Path) -> Path:
    """fp32 ONNX of an eval-mode module or program graph, with a dynamic batch axis
    (TorchScript-based exporter: no onnxscript needed)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is deprecated, not gone
        torch.onnx.export(
            _Forward(model),
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=17,
            dynamo=False,
            training=torch.onnx.TrainingMode.PRESERVE,
            do_constant_folding=False,  # which the exporter advises against when preserving; ONNX Runtime folds
        )
    return path
