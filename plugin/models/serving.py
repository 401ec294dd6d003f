"""Turning a hash-checked artifact into the module that serves it: pruned layer shapes,
int8 lowering and the GPU floating-point variant.

Why lower at load instead of shipping an exported program: a ``.pt2`` file only runs on
the torch version that wrote it, and its loader reads tensors through ``torch.load``.
An optimized artifact therefore stores what does not depend on the torch version, all
in safetensors/JSON: the (pruned) fp32 weights, the per-layer channel counts, and the
statistics of every quantization observer after calibration. Loading rebuilds the
registered architecture, resizes its layers, exports it, re-runs torchao's
``prepare_pt2e`` with the quantizer named in the manifest, restores the recorded observer
statistics (instead of calibrating again) and converts; inductor then lowers the result
once per batch bucket. Nothing is unpickled, and the lowered program is always the one
this torch version would build.

An imported program (``torch-export``) is already an exported graph: its int8 artifact
keeps the checked ``model.pt2`` as it was imported and adds the observer statistics, and
loading re-runs ``prepare_pt2e`` on that program's graph instead of exporting a module.
"""

import logging
from collections.abc import Callable, Sequence
from importlib import metadata
from typing import Any

import torch
from torch import Tensor, nn
from torch.export import ExportedProgram

from plugin.models.artifact import ArtifactError
from plugin.models.compile_cache import CompileCache
from plugin.models.inputspec import InputSpec
from plugin.models.pt2 import program_module

log = logging.getLogger(__name__)

OBSERVER_PREFIX = "observer."  # weights-file keys of quantization observer statistics
# convolutions (1-3D, transposed too), batch/instance norms and linear layers: what structured pruning resizes
_LAYER_TYPES = (nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.Linear)


def layer_shapes(module: nn.Module) -> dict[str, dict[str, int]]:
    """Channel counts of every conv, norm and linear layer: the manifest's record of
    what pruning left, enough to rebuild the pruned model from the registered one."""
    shapes: dict[str, dict[str, int]] = {}
    for name, layer in module.named_modules():
        if isinstance(layer, nn.modules.conv._ConvNd):
            shapes[name] = {"in": layer.in_channels, "out": layer.out_channels, "groups": layer.groups}
        elif isinstance(layer, nn.modules.batchnorm._NormBase):
            shapes[name] = {"features": layer.num_features}
        elif isinstance(layer, nn.Linear):
            shapes[name] = {"in": layer.in_features, "out": layer.out_features}
    return shapes


def _resized(layer: nn.Module, shape: dict[str, int]) -> nn.Module:
    """A fresh layer of ``layer``'s type and settings with the recorded channel counts."""
    if isinstance(layer, nn.modules.conv._ConvNd):
        settings = {"output_padding": layer.output_padding} if layer.transposed else {}
        conv: Callable[..., nn.Module] = type(layer)  # Conv1d .. ConvTranspose3d: each takes these keywords
        return conv(
            shape["in"],
            shape["out"],
            layer.kernel_size,
            stride=layer.stride,
            padding=layer.padding,
            dilation=layer.dilation,
            groups=shape["groups"],
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            **settings,
        )
    if isinstance(layer, nn.modules.batchnorm._NormBase):
        return type(layer)(shape["features"], layer.eps, layer.momentum, layer.affine, layer.track_running_stats)
    if isinstance(layer, nn.Linear):
        return nn.Linear(shape["in"], shape["out"], bias=layer.bias is not None)
    raise ValueError(f"cannot resize a {type(layer).__name__}")


def apply_layer_shapes(module: nn.Module, shapes: dict[str, dict[str, int]]) -> nn.Module:
    """Replace each recorded layer whose channel counts differ by a fresh one of the
    recorded size. Only conv/norm/linear layers of a registered architecture are touched,
    so this builds nothing the registry could not."""
    layers = dict(module.named_modules())
    for name, shape in shapes.items():
        layer = layers.get(name)
        if not isinstance(layer, _LAYER_TYPES):
            raise ValueError(f"layer {name!r} of the manifest is not a conv/norm/linear layer of the architecture")
        if layer_shapes(layer)[""] == shape:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(layers[parent_name], child, _resized(layer, shape))
    return module


# --- int8 (x86, torchao PT2E) -------------------------------------------------------------


def x86_quantizer(scheme: str) -> Any:
    """The torchao X86InductorQuantizer for a recipe scheme (``int8_static``, ``int8_qat``,
    ``int8_dynamic``): static and QAT quantize every conv/linear input per tensor and
    weights per channel; dynamic quantizes only Linear layers, activations at run time."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq

    quantizer = xiq.X86InductorQuantizer()
    if scheme == "int8_static":
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    elif scheme == "int8_qat":
        quantizer.set_global(xiq.get_default_x86_inductor_quantization_config(is_qat=True))
    elif scheme == "int8_dynamic":
        quantizer.set_module_type_qconfig(nn.Linear, xiq.get_default_x86_inductor_quantization_config(is_dynamic=True))
    else:
        raise ValueError(f"unknown int8 scheme {scheme!r}")
    return quantizer


def exported_graph(module: nn.Module, scheme: str, example: Tensor) -> nn.Module:
    """``module`` as the graph torchao's PT2E flow quantizes: ``torch.export``'s, with a
    dynamic batch (in training mode for QAT, whose fine-tuning runs on it). ``module`` is
    left in the mode it came in: the node serves it beside the graph."""
    batch = torch.export.Dim("batch", min=1, max=4096)  # one program for every batch size
    was_training = module.training
    module.train(scheme == "int8_qat")
    try:
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},)).module()
    finally:
        module.train(was_training)


def prepare_int8(graph: nn.Module, scheme: str) -> nn.Module:
    """Insert the quantizer's observers (fake-quant modules for QAT) into an exported graph.

    The same call runs when calibrating and when loading, on the same graph, so the
    observers get the same names and the recorded statistics fit them.
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e, prepare_qat_pt2e

    if scheme == "int8_qat":
        return prepare_qat_pt2e(graph, x86_quantizer(scheme))
    return prepare_pt2e(graph, x86_quantizer(scheme))


def observer_state(prepared: nn.Module) -> dict[str, Tensor]:
    """The observers' statistics after calibration, keyed for the weights file."""
    return {
        OBSERVER_PREFIX + name: tensor.detach().clone()
        for name, tensor in prepared.state_dict().items()
        if name.startswith("activation_post_process_")
    }


def convert_int8(prepared: nn.Module, scheme: str) -> nn.Module:
    from torchao.quantization.pt2e import move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    if scheme == "int8_qat":
        move_exported_model_to_eval(prepared)
    return convert_pt2e(prepared)


def restore_int8(graph: nn.Module, scheme: str, observers: dict[str, Tensor]) -> nn.Module:
    """Rebuild the converted int8 program from an exported fp32 graph and recorded observer statistics."""
    prepared = prepare_int8(graph, scheme)
    state = prepared.state_dict()
    missing = sorted(k for k in state if k.startswith("activation_post_process_") and k not in observers)
    unknown = sorted(k for k in observers if k not in state)
    if missing or unknown:
        raise ValueError(
            f"recorded observer statistics do not fit this torch/torchao version's quantized graph "
            f"(missing {missing[:3]}, unknown {unknown[:3]}); run radpipe optimize again"
        )
    state.update(observers)
    prepared.load_state_dict(state)
    return convert_int8(prepared, scheme)


def int8_max_pools(graph: nn.Module) -> nn.Module:
    """The converted graph with each max-pool run on the uint8 tensor itself.

    torchao's x86 quantizer gives a max-pool's output its input's scale and zero point, so
    ``quantize(max_pool2d(dequantize(x)))`` is ``max_pool2d(x)`` exactly (dequantizing is
    increasing, and quantizing a dequantized value gives it back). Inductor lowers the
    uint8 max-pool to its own vectorized loop; the pattern as converted becomes ATen's
    quantized max_pool2d instead, whose channels-last kernel vectorizes over channels and
    falls back to a scalar loop below 32 of them: 115 µs for the 8-channel 128x128 map of
    the pruned demo model at batch 1 against a few µs, its first two pools about a third
    of its batch-1 time. The outputs are unchanged, bit for bit. For compiled programs
    only: eager ATen takes no uint8 max-pool."""
    import torch.fx

    if not isinstance(graph, torch.fx.GraphModule):
        return graph
    quantize = torch.ops.quantized_decomposed.quantize_per_tensor.default
    dequantize = torch.ops.quantized_decomposed.dequantize_per_tensor.default
    nodes = graph.graph
    for node in list(nodes.nodes):
        pool = node.args[0] if node.target is quantize and node.args else None
        if not isinstance(pool, torch.fx.Node) or pool.target is not torch.ops.aten.max_pool2d.default:
            continue
        source = pool.args[0]
        if not isinstance(source, torch.fx.Node) or source.target is not dequantize:
            continue
        if len(pool.users) != 1 or source.args[1:] != node.args[1:] or source.kwargs or node.kwargs:
            continue  # another scale, or the float values used elsewhere: not the same values
        with nodes.inserting_before(node):
            pooled = nodes.call_function(pool.target, (source.args[0], *pool.args[1:]), dict(pool.kwargs))
        node.replace_all_uses_with(pooled)
        for gone in (node, pool, source):
            if not gone.users:
                nodes.erase_node(gone)
    graph.recompile()
    return graph


# --- bucketed, compiled serving -----------------------------------------------------------


def compile_program(module: nn.Module) -> Callable[[Tensor], Tensor]:
    """``torch.compile`` for inference, with inductor's freezing on, so that int8 weights
    are folded into oneDNN's packed layout, and one compile thread, so that the node does
    not start a compile worker pool it would have to stop.

    Both settings are process-wide on purpose: patching them around each call costs tens
    of milliseconds, and a program called under other settings than it was compiled with
    is compiled again. Every program radpipe compiles is an inference program, for which
    freezing is right.
    """
    import torch._inductor.config as inductor

    inductor.freezing = True
    inductor.compile_threads = 1
    return torch.compile(module, dynamic=False)


class BucketedModule(nn.Module):
    """Serves a compiled program at a fixed set of batch sizes: a batch is split into
    chunks of the largest bucket and each chunk is padded up to the smallest bucket that
    holds it, so the program is only ever called with shapes it was compiled for.

    ``source`` is the fp32 module it was built from; it stays a submodule so that the
    device and parameter count of the served model can be read as for any module.
    """

    def __init__(
        self,
        source: nn.Module,
        program: Callable[[Tensor], Tensor],
        buckets: Sequence[int],
        dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        self.source = source
        self._program = program
        self.buckets = tuple(sorted(buckets))
        self._dtype = dtype
        self._channels_last = channels_last

    def _run(self, chunk: Tensor) -> Tensor:
        n = len(chunk)
        bucket = next(b for b in self.buckets if b >= n)
        if bucket > n:
            chunk = torch.cat([chunk, chunk.new_zeros((bucket - n, *chunk.shape[1:]))])
        elif not chunk.is_inference():
            # the programs were compiled for inference tensors (what preprocessing makes);
            # any other tensor fails their guards and is compiled again, into a slow path
            chunk = chunk.clone()
        chunk = chunk.to(self._dtype)
        if self._channels_last:
            chunk = chunk.contiguous(memory_format=torch.channels_last)
        return self._program(chunk)[:n].float()

    def forward(self, x: Tensor) -> Tensor:
        with torch.inference_mode():
            return torch.cat([self._run(chunk) for chunk in x.split(self.buckets[-1])])

    def warm_up(self, input_shape: Sequence[int], device: torch.device) -> None:
        """Compile every bucket now, so the first job does not pay for it."""
        with torch.inference_mode():
            for bucket in self.buckets:
                self._run(torch.zeros((bucket, *input_shape), device=device))


def input_shape(manifest: dict[str, Any]) -> tuple[int, ...]:
    """``(C, *spatial)`` that an optimized model is compiled for: the manifest's input, a
    size it leaves open taken from the images the model was calibrated and scored on
    (``preprocessing.shape``, recorded by ``radpipe optimize``)."""
    spec = InputSpec.from_manifest(manifest["input"])
    if spec is None:
        raise ArtifactError(f"{manifest.get('name', 'this artifact')}: the manifest's input records no shape")
    seen = manifest.get("preprocessing", {}).get("shape", [None] * (1 + len(spec.spatial)))
    shape = [given if given is not None else fed for given, fed in zip(spec.spatial, seen[1:], strict=True)]
    if None in shape:
        raise ArtifactError(f"{manifest.get('name', 'this artifact')}: input {spec.text()} leaves a size open")
    return (spec.channels, *shape)


def check_quantization_versions(manifest: dict[str, Any]) -> None:
    """Observer statistics are restored by the names torchao gives the quantized graph's
    nodes, and those may change with any torch or torchao release: an int8 artifact serves
    only under the releases that wrote it (recorded in its manifest's ``versions``)."""
    recorded = manifest.get("versions", {})
    wrote = {package: str(recorded.get(package, "unknown")).split("+")[0] for package in ("torch", "torchao")}
    runs = {"torch": torch.__version__.split("+")[0], "torchao": metadata.version("torchao")}
    if wrote != runs:
        raise ArtifactError(
            f"{manifest.get('name', 'this int8 artifact')} was quantized with torch {wrote['torch']} and torchao "
            f"{wrote['torchao']}; this node runs torch {runs['torch']} and torchao {runs['torchao']}. "
            "Run `radpipe optimize` again here to rebuild it."
        )


def int8_precision(scheme: str) -> str:
    """The precision a torchao int8 scheme serves in, as the manifest, the SR and the
    metrics say it: dynamic quantization leaves the conv trunk in fp32."""
    return "int8-dynamic" if scheme == "int8_dynamic" else "int8"


def serve_int8(
    graph: Callable[[], nn.Module],
    source: nn.Module,
    tensors: dict[str, Tensor],
    manifest: dict[str, Any],
    cache: CompileCache | None = None,
) -> nn.Module:
    """The int8 program of an optimized artifact, rebuilt from the exported fp32 graph that
    ``graph`` makes and lowered by inductor for each bucket (CPU). ``source`` is the fp32
    model it serves for. With a node's ``cache`` the program is AOT-compiled once and
    reloaded on later starts, without exporting and converting again (seconds a restart
    would wait for): hence a graph maker, called only when a program is compiled."""
    check_quantization_versions(manifest)
    quantization = manifest["quantization"]
    buckets = quantization.get("buckets", [1, 8, 32])
    observers = {k.removeprefix(OBSERVER_PREFIX): v for k, v in tensors.items() if k.startswith(OBSERVER_PREFIX)}

    def converted() -> nn.Module:
        return int8_max_pools(restore_int8(graph(), quantization["scheme"], observers))

    shape = input_shape(manifest)
    program = compile_program(converted()) if cache is None else cache.program(converted, manifest, buckets, shape)
    served = BucketedModule(source, program, buckets)
    served.warm_up(shape, torch.device("cpu"))
    return served


def load_quantized_program(
    program: ExportedProgram,
    tensors: dict[str, Tensor],
    manifest: dict[str, Any],
    device: torch.device,
    cache: CompileCache | None = None,
) -> nn.Module:
    """The int8 module of an imported program quantized by ``radpipe optimize``:
    ``prepare_pt2e`` runs again on the checked program's own graph, the recorded observer
    statistics are restored by name, and the result is converted and compiled. int8
    programs are x86-only: on CUDA it runs on the CPU (logged)."""
    if device.type == "cuda":
        log.warning("int8 artifacts run on x86 CPUs only; serving %s on the CPU", manifest.get("name", "model"))
    cpu = torch.device("cpu")
    # two graphs of the one program: prepare_pt2e rewrites the one it is given
    return serve_int8(lambda: program_module(program, cpu), program_module(program, cpu), tensors, manifest, cache)


def serve_gpu(module: nn.Module, manifest: dict[str, Any], device: torch.device) -> nn.Module:
    """The GPU variant: bf16/fp16 weights, channels_last, compiled and warmed up per bucket."""
    gpu = manifest.get("gpu", {})
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[gpu.get("precision", "fp32")]
    buckets = gpu.get("buckets", [1, 8, 32])
    source = module.eval().to(device)
    fast = _copy_as(source, dtype)
    served = BucketedModule(source, compile_program(fast), buckets, dtype=dtype, channels_last=True)
    served.warm_up(input_shape(manifest), device)
    return served


def _copy_as(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    import copy

    # Module.to takes memory_format at run time; torch's type stubs leave it out.
    return copy.deepcopy(module).to(dtype=dtype, memory_format=torch.channels_last)  # type: ignore[call-overload]


def load_optimized(
    module: nn.Module,
    tensors: dict[str, Tensor],
    manifest: dict[str, Any],
    device: torch.device,
    cache: CompileCache | None = None,
) -> tuple[nn.Module, str]:
    """The module to serve on ``device``, and its precision, for an artifact written by
    ``radpipe optimize``. ``module`` is the registered architecture as built from the
    manifest's parameters; the recorded layer shapes are applied to it first.

    On CUDA an artifact with a ``gpu`` section serves in that precision; on the CPU an
    int8 one serves int8. int8 programs are x86-only, so an int8 artifact asked to run on
    CUDA without a ``gpu`` section runs on the CPU (logged)."""
    apply_layer_shapes(module, manifest.get("layers", {}))
    weights = {k: v for k, v in tensors.items() if not k.startswith(OBSERVER_PREFIX)}
    module.load_state_dict(weights)
    module.eval()
    quantization = manifest.get("quantization")
    if device.type == "cuda":
        if "gpu" in manifest:
            return serve_gpu(module, manifest, device), manifest["gpu"].get("precision", "fp32")
        if quantization is None:
            return module.to(device), "fp32"
        log.warning("int8 artifacts run on x86 CPUs only; serving %s on the CPU", manifest.get("name", "model"))
    if quantization is not None:
        example = torch.zeros((2, *input_shape(manifest)))
        served = serve_int8(
            lambda: exported_graph(module, quantization["scheme"], example), module, tensors, manifest, cache
        )
        return served, int8_precision(quantization["scheme"])
    if "gpu" in manifest:
        log.info("no CUDA device: serving the %s GPU variant as fp32 on the CPU", manifest["gpu"].get("precision"))
    return module.to(device), "fp32"
