"""int8 quantization for x86 CPUs through torchao's PT2E flow (X86InductorQuantizer).

- ``int8_static``: post-training; observers see ``calibration.samples`` preprocessed
  images and fix every activation's scale and zero point ahead of time.
- ``int8_qat``: quantization-aware training, for when static PTQ misses the accuracy
  gate: the exported model is fine-tuned with fake quantization in the graph, so the
  weights learn to live with int8 rounding.
- ``int8_dynamic``: only Linear layers, activations quantized per batch at run time; no
  calibration. Pays off for Linear-heavy heads, not for conv trunks.

What comes out is what the artifact stores: fp32 weights (fine-tuned, for QAT) and the
observer statistics. The node rebuilds the int8 program from them (plugin/models/serving.py).
"""

import copy
from dataclasses import dataclass

from torch import Tensor, nn

from plugin.accel.data import Split
from plugin.accel.finetune import finetune
from plugin.accel.progress import progress
from plugin.accel.recipe import Finetune, Quantize
from plugin.models.serving import observer_state, prepare_int8


@dataclass(frozen=True)
class Quantized:
    weights: dict[str, Tensor]  # fp32 state dict of the model to rebuild the program from
    observers: dict[str, Tensor]  # observer statistics, weights-file keys
    calibration: dict[str, object]  # what the manifest says about how they were obtained


def quantize(
    model: nn.Module, scheme: str, calibration: Split, train: Split, recipe: Quantize, tuning: Finetune, seed: int = 0
) -> Quantized:
    model = copy.deepcopy(model)
    names = list(model.state_dict())
    prepared = prepare_int8(model, scheme, calibration.images[:2])
    if scheme == "int8_qat":
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        allow_exported_model_train_eval(prepared)  # fine-tuning switches it between train and eval
        finetune(prepared, train, recipe.qat_epochs, tuning.batch_size, tuning.lr / 10, seed, what="QAT fine-tuning")
        state = prepared.state_dict()
        missing = [n for n in names if n not in state]
        if missing:
            raise RuntimeError(f"QAT graph lost parameters {missing[:3]}: cannot store its weights")
        weights = {n: state[n].detach().clone() for n in names}
        described = {"method": "quantization-aware training", "data": train.description, "epochs": recipe.qat_epochs}
    else:
        batches = list(calibration.images.split(32))
        if scheme == "int8_dynamic":
            batches = batches[:1]  # one pass records the weight ranges; activations are dynamic
        for batch in progress(batches, len(batches), "calibrating"):
            prepared(batch)
        weights = {n: t.detach().clone() for n, t in model.state_dict().items()}
        described = {
            "method": "dynamic (activations at run time)" if scheme == "int8_dynamic" else "static post-training",
            "data": calibration.description,
            "samples": len(calibration) if scheme != "int8_dynamic" else 0,
        }
    observers = observer_state(prepared)
    return Quantized(weights, observers, {**described, "observers": sorted({_kind(prepared, k) for k in observers})})


def _kind(prepared: nn.Module, key: str) -> str:
    module = prepared.get_submodule(key.removeprefix("observer.").split(".")[0])
    return type(module).__name__
