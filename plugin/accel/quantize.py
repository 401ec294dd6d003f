"""int8 quantization: torchao's PT2E flow (X86InductorQuantizer) for torch models and
imported programs, ONNX Runtime's static quantization for ONNX graphs.

- ``int8_static``: post-training; observers see ``calibration.samples`` preprocessed
  images and fix every activation's scale and zero point ahead of time.
- ``int8_qat``: quantization-aware training, for when static PTQ misses the accuracy
  gate: the exported model is fine-tuned with fake quantization in the graph, so the
  weights learn to live with int8 rounding.
- ``int8_dynamic``: only Linear layers, activations quantized per batch at run time; no
  calibration. Pays off for Linear-heavy heads, not for conv trunks.

What comes out is what the artifact stores: fp32 weights (fine-tuned, for QAT) and the
observer statistics. The node rebuilds the int8 program from them (plugin/models/serving.py).
An imported program keeps its own weights: only the statistics are stored beside it, and
QAT, which would change the weights, does not apply.

An ONNX graph is quantized by ONNX Runtime itself (``quantize_static``): the artifact
stores the quantized graph, which ONNX Runtime runs as it is.
"""

import copy
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from plugin.accel.data import Split
from plugin.accel.finetune import finetune
from plugin.accel.progress import progress
from plugin.accel.recipe import Finetune, Quantize
from plugin.models.serving import exported_graph, observer_state, prepare_int8


@dataclass(frozen=True)
class Quantized:
    weights: dict[str, Tensor]  # fp32 state dict of the model to rebuild the program from
    observers: dict[str, Tensor]  # observer statistics, weights-file keys
    calibration: dict[str, object]  # what the manifest says about how they were obtained


def batches(images: Tensor, size: int | None) -> list[Tensor]:
    """Batches of 32 images, or of exactly ``size`` for a model exported for that batch
    size only (the last one topped up with the first images: observers see only real images)."""
    if size is None:
        return list(images.split(32))
    count = -(-len(images) // size) * size
    return list(images[torch.arange(count) % len(images)].split(size))


def _calibrate(prepared: nn.Module, scheme: str, calibration: Split, size: int | None) -> dict[str, object]:
    chunks = batches(calibration.images, size)
    if scheme == "int8_dynamic":
        chunks = chunks[:1]  # one pass records the weight ranges; activations are dynamic
    for batch in progress(chunks, len(chunks), "calibrating"):
        prepared(batch)
    return {
        "method": "dynamic (activations at run time)" if scheme == "int8_dynamic" else "static post-training",
        "data": calibration.description,
        "samples": len(calibration) if scheme != "int8_dynamic" else 0,
    }


def _quantized(prepared: nn.Module, weights: dict[str, Tensor], described: dict[str, object]) -> Quantized:
    observers = observer_state(prepared)
    return Quantized(weights, observers, {**described, "observers": sorted({_kind(prepared, k) for k in observers})})


def quantize(
    model: nn.Module, scheme: str, calibration: Split, train: Split, recipe: Quantize, tuning: Finetune, seed: int = 0
) -> Quantized:
    """int8 of a torch model: exported, observed, calibrated (or fine-tuned, for QAT)."""
    model = copy.deepcopy(model)
    names = list(model.state_dict())
    prepared = prepare_int8(exported_graph(model, scheme, calibration.images[:2]), scheme)
    if scheme == "int8_qat":
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        allow_exported_model_train_eval(prepared)  # fine-tuning switches it between train and eval
        finetune(prepared, train, recipe.qat_epochs, tuning.batch_size, tuning.lr / 10, seed, what="QAT fine-tuning")
        state = prepared.state_dict()
        missing = [n for n in names if n not in state]
        if missing:
            raise RuntimeError(f"QAT graph lost parameters {missing[:3]}: cannot store its weights")
        weights = {n: state[n].detach().clone() for n in names}
        described: dict[str, object] = {
            "method": "quantization-aware training",
            "data": train.description,
            "epochs": recipe.qat_epochs,
        }
    else:
        described = _calibrate(prepared, scheme, calibration, None)
        weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
    return _quantized(prepared, weights, described)


def quantize_program(graph: nn.Module, scheme: str, calibration: Split, batch: int | None) -> Quantized:
    """int8 of an imported program's graph (``int8_static`` or ``int8_dynamic``): observed
    and calibrated as it is; its weights stay in the program."""
    prepared = prepare_int8(graph, scheme)
    return _quantized(prepared, {}, _calibrate(prepared, scheme, calibration, batch))


def quantize_onnx(
    graph: bytes, input_name: str, calibration: Split, batch: int | None
) -> tuple[bytes, dict[str, object]]:
    """ONNX Runtime's static int8 recipe: the graph optimized (batch norms folded into
    convolutions), then QDQ with per-channel int8 weights and uint8 activations whose
    ranges the calibration images set (MinMax). Weights use 7 bits (``reduce_range``): on
    x86 CPUs without VNNI, ONNX Runtime's uint8 x int8 kernels saturate on full-range
    weights (the demo model's AUC fell from 0.978 to 0.750), and the artifact may serve on
    any x86 CPU. Returns the quantized graph's bytes and what the manifest says about its
    calibration."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    chunks = batches(calibration.images, batch)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(progress(chunks, len(chunks), "calibrating"))

        def get_next(self) -> dict[str, np.ndarray] | None:
            chunk = next(self._batches, None)
            return None if chunk is None else {input_name: chunk.numpy()}

    with tempfile.TemporaryDirectory(prefix="radpipe-ort-") as scratch:
        work = Path(scratch)
        (work / "model.onnx").write_bytes(graph)
        quant_pre_process(str(work / "model.onnx"), str(work / "prepared.onnx"))
        quantize_static(
            str(work / "prepared.onnx"),
            str(work / "int8.onnx"),
            Reader(),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            reduce_range=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
        )
        quantized = (work / "int8.onnx").read_bytes()
    described = {"method": "static post-training", "data": calibration.description, "samples": len(calibration)}
    return quantized, described


def _kind(prepared: nn.Module, key: str) -> str:
    module = prepared.get_submodule(key.removeprefix("observer.").split(".")[0])
    return type(module).__name__
