"""ONNX models, served by ONNX Runtime (the optional extra ``radpipe[onnx]``).

ONNX Runtime parses and checks the graph itself, so it is also what tells an ONNX file
from anything else. A session is made from the file's bytes (the same bytes that were
hash-checked), never from a path: a model that refers to external data files is then
refused, so an artifact cannot make the node read files outside it. Custom operators
would need a library registered with the session; radpipe registers none, so a graph
that uses one is refused too. Nothing in an ONNX file is executed as code.
"""

import logging
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from plugin.models.inputspec import DTYPES, InputSpec

log = logging.getLogger(__name__)

EXTRA = "pip install 'radpipe[onnx]'"
_TYPES = {"tensor(float)": "float32", "tensor(float16)": "float16"}  # what numpy holds


class OnnxError(ValueError):
    """Not an ONNX model radpipe can serve, or ONNX Runtime is missing; one line."""


def _runtime() -> ModuleType:
    try:
        import onnxruntime
    except ImportError as e:
        raise OnnxError(f"ONNX models need ONNX Runtime, which is not installed: {EXTRA}") from e
    return onnxruntime


def _session(data: bytes, providers: list[str]) -> Any:
    ort = _runtime()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # its failures are raised, and reported once, by radpipe
    options.intra_op_num_threads = torch.get_num_threads()  # one setting for both runtimes (radpipe bench --threads)
    try:
        return ort.InferenceSession(data, options, providers=providers)
    except Exception as e:  # ONNX Runtime raises its own exception types, one per failure kind
        raise OnnxError(f"not an ONNX model ONNX Runtime can run: {' '.join(str(e).split())[:300]}") from e


def _signature(session: Any) -> tuple[Any, Any]:
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1 or not outputs:
        raise OnnxError(f"the graph must take one input (a batch of images), not {len(inputs)}, and return the logits")
    return inputs[0], outputs[0]


def input_spec(data: bytes) -> InputSpec | None:
    """The input the graph declares: None where it leaves a size open (a named dimension),
    and None for the whole spec when it leaves the channels open (give ``--input``)."""
    graph_input, _ = _signature(_session(data, ["CPUExecutionProvider"]))
    dtype = _TYPES.get(graph_input.type)
    shape = graph_input.shape
    if dtype is None or len(shape) not in (4, 5):
        raise OnnxError(f"its input must be a float batch of 2D or 3D images, not {graph_input.type} {shape}")
    sizes = [size if isinstance(size, int) and size > 0 else None for size in shape]
    if sizes[1] is None:
        return None
    return InputSpec(sizes[1], tuple(sizes[2:]), dtype, sizes[0])


class OnnxModule(nn.Module):
    """An ONNX Runtime session behind the module interface: a batch tensor in, the
    graph's first output as a tensor out. ``device`` is where the session runs: CUDA
    when asked for and ONNX Runtime has its CUDA provider (``onnxruntime-gpu``), else the
    CPU. Inputs may be on any device; ONNX Runtime copies them where it runs."""

    def __init__(self, data: bytes, device: torch.device) -> None:
        super().__init__()
        if device.type == "cuda" and "CUDAExecutionProvider" not in _runtime().get_available_providers():
            log.warning("ONNX Runtime has no CUDA provider here (it comes with onnxruntime-gpu); running on the CPU")
            device = torch.device("cpu")
        providers = (
            ["CUDAExecutionProvider", "CPUExecutionProvider"] if device.type == "cuda" else ["CPUExecutionProvider"]
        )
        self._session = _session(data, providers)
        graph_input, _ = _signature(self._session)
        self.input_name = graph_input.name
        self._dtype = DTYPES[_TYPES[graph_input.type]]
        self.device = device

    def forward(self, images: Tensor) -> Tensor:
        batch = images.detach().to("cpu", self._dtype).contiguous().numpy()
        return torch.from_numpy(self._session.run(None, {self.input_name: batch})[0])
