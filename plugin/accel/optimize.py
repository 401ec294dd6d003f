"""``radpipe optimize``: run a pipeline's recipe and write the optimized artifact, or
write nothing and say why.

original -> (prune + fine-tune, iteratively) -> (quantize) -> candidate artifact ->
loaded exactly as the node loads it -> scored on the held-out set -> gate -> written.
The figures the gate judged are the served program's, not a stand-in's.

What applies depends on the source's format (:func:`refusal` says why the rest does not):

- ``module`` (radpipe's architectures, installed packages' entry points, MONAI networks):
  pruning, and int8 through torchao's PT2E flow (static, QAT or dynamic) where the model
  has layers torchao's x86 quantizer quantizes (2D/1D convolutions, linear layers);
- ``torch-export`` (an imported program): PT2E int8, static or dynamic, on the program's
  own graph;
- ``onnx``: ONNX Runtime's static int8.

A classifier is gated on AUC over held-out images; a segmentation model (a ``module``
only) on voxel Dice over held-out phantom volumes, fine-tuned on windows of them
(plugin/accel/volumes.py).
"""

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from plugin.accel.data import DataSets, Split, load_data
from plugin.accel.evaluate import HeldoutImages, HeldoutVolumes, Scorer, Scores, Verdict, gate
from plugin.accel.export import preprocessing_record
from plugin.accel.prune import complexity, describe, prune
from plugin.accel.quantize import quantize, quantize_onnx, quantize_program
from plugin.accel.recipe import Recipe, accept_record, task_problem
from plugin.accel.volumes import VolumeSets, load_volumes
from plugin.models.artifact import (
    MODEL_FILES,
    MODULE,
    ONNX,
    TORCH_EXPORT,
    WEIGHTS,
    Artifact,
    FileContent,
    checked_bytes,
    load_artifact,
    write_artifact,
)
from plugin.models.onnx_model import OnnxModule
from plugin.models.pt2 import load_program, program_module
from plugin.models.serving import int8_precision, layer_shapes
from plugin.pipeline import Pipeline
from plugin.preprocess import PreprocessStep

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What ``optimize`` did: ``target`` is None when the gate refused the result."""

    target: Path | None
    baseline: Scores
    verdicts: list[Verdict]
    manifest: dict[str, Any]

    @property
    def failures(self) -> list[str]:
        return [f for v in self.verdicts for f in v.failures]


def default_target(pipeline: Pipeline, recipe: Recipe) -> Path:
    parts = (["pruned"] if recipe.prune else []) + (
        [recipe.quantize.cpu.removesuffix("_static")] if recipe.quantize.cpu != "none" else []
    )
    return pipeline.artifact_dir.with_name(f"{pipeline.artifact_dir.name}-{'-'.join(parts) or 'optimized'}")


def _variant_name(recipe: Recipe) -> str:
    parts = (["pruned"] if recipe.prune else []) + ([recipe.quantize.cpu] if recipe.quantize.cpu != "none" else [])
    return "+".join(parts) or "fp32"


# the int8 schemes each format takes (module: every scheme of the recipe)
SCHEMES = {TORCH_EXPORT: ("int8_static", "int8_dynamic"), ONNX: ("int8_static",)}

# The layers torchao's X86InductorQuantizer quantizes, per scheme: its annotators match
# aten conv1d/conv2d and linear (dynamic: linear only); a Conv3d or ConvTranspose gets no
# observer and would stay fp32 in an "int8" program.
INT8_LAYERS: dict[str, tuple[type[nn.Module], ...]] = {
    "int8_static": (nn.Conv1d, nn.Conv2d, nn.Linear),
    "int8_qat": (nn.Conv1d, nn.Conv2d, nn.Linear),
    "int8_dynamic": (nn.Linear,),
}


def int8_refusal(original: Artifact, scheme: str) -> str | None:
    """Why ``scheme`` cannot make anything of a module model int8; None if it can."""
    layers = [m for m in original.module.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    if scheme == "none" or any(isinstance(m, INT8_LAYERS[scheme]) for m in layers):
        return None
    wanted = "/".join(t.__name__ for t in INT8_LAYERS[scheme])
    found = "/".join(sorted({type(m).__name__ for m in layers}))
    return (
        f"{original.path}: quantize.cpu {scheme}: torchao's x86 int8 quantizer takes {wanted} layers and this model "
        f"has only {found}, so nothing would run in int8; set quantize.cpu: none"
    )


def refusal(original: Artifact, recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot run on ``original``, in one line; None if it can."""
    kind, spec = original.format, original.input
    task = original.manifest.get("task", "classification")
    if "quantization" in original.manifest:
        return f"{original.path} is already quantized: optimize its fp32 original instead"
    problem = task_problem(recipe, task)
    if problem is not None:
        return f"{original.path}: {problem}"
    if task == "classification" and spec is not None and spec.kind == "volume":
        return (
            f"{original.path}: a volume classifier: the accuracy gate scores 2D images (classification) "
            "or volumes (segmentation) only, so it cannot judge one"
        )
    if kind == MODULE:
        return int8_refusal(original, recipe.quantize.cpu)
    if task == "segmentation":
        return (
            f"{original.path}: a segmentation model is optimized as a module (an architecture with its weights) only; "
            f"import the architecture with its weights (radpipe import ID --weights FILE) instead of a {kind} file"
        )
    if recipe.prune:
        return (
            f"{original.path}: cannot prune it: pruning removes channels from an nn.Module's layers, which the node "
            f"rebuilds from a registered architecture, but this {kind} artifact holds a fixed graph; prune before "
            "exporting, or import the architecture with its weights (radpipe import ID --weights FILE)"
        )
    if recipe.quantize.cpu not in SCHEMES[kind]:
        why = "; QAT would fine-tune the weights, which the program holds as imported" if kind == TORCH_EXPORT else ""
        return (
            f"{original.path}: quantize.cpu {recipe.quantize.cpu} does not apply to this {kind} model, which radpipe "
            f"optimizes by int8 quantization ({' or '.join(SCHEMES[kind])}) only{why}"
        )
    if spec is not None and spec.dtype != "float32":
        return f"{original.path}: int8 quantization starts from a float32 model; this one takes {spec.dtype}"
    return None


def fixed_batch(artifact: Artifact) -> int | None:
    """The one batch size an imported model was exported for; None if it takes any."""
    return artifact.input.batch if artifact.input else None


def optimize(
    pipeline: Pipeline,
    recipe: Recipe,
    target: Path | None = None,
    replace: bool = False,
    workers: int | None = None,
    data: DataSets | VolumeSets | None = None,
) -> Outcome:
    """Run ``recipe`` on ``pipeline``'s model; write the artifact only if the gate passes.
    ``data``: the recipe's data sets, made already (images for a classifier, volumes for a
    segmentation model)."""
    original = load_artifact(pipeline.artifact_dir, torch.device("cpu"))
    problem = refusal(original, recipe)
    if problem is not None:  # before the data is made
        raise ValueError(problem)
    if pipeline.task == "segmentation":
        volumes = data if isinstance(data, VolumeSets) else load_volumes(pipeline, recipe.data, recipe.calibration)
        return optimize_volumes(
            original, recipe, volumes, pipeline, target or default_target(pipeline, recipe), replace
        )
    base = pipeline.source.parent if pipeline.source else Path.cwd()
    if not isinstance(data, DataSets):
        data = load_data(pipeline.preprocess, recipe.data, recipe.calibration, original.classes, base, workers)
    return optimize_artifact(
        original,
        recipe,
        data,
        pipeline.preprocess,
        [f.label for f in pipeline.postprocess.findings],
        pipeline.postprocess.activation,
        target or default_target(pipeline, recipe),
        replace,
    )


def _pt2e(scheme: str, buckets: list[int], calibration: dict[str, object]) -> dict[str, Any]:
    """The manifest's ``quantization`` for a torchao int8 variant."""
    return {
        "scheme": scheme,
        "quantizer": "torchao X86InductorQuantizer (PT2E)",
        "buckets": buckets,
        "calibration": calibration,
    }


Variant = tuple[dict[str, FileContent], dict[str, Any]]  # the artifact's files, its format's manifest keys


class Training(Protocol):
    """What fine-tuning and calibration read: :class:`DataSets` or :class:`VolumeSets`."""

    @property
    def train(self) -> Split: ...

    @property
    def calibration(self) -> Split: ...


def _module_variant(original: Artifact, model: nn.Module, recipe: Recipe, data: Training) -> Variant:
    """The (pruned) module's weights, int8 observer statistics and what rebuilds it. A
    volume model gets no ``gpu`` section: that variant is compiled in 2D channels_last."""
    example = data.train.images[:1]
    before, after = complexity(original.module, example), complexity(model, example)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys: dict[str, Any] = {
        "architecture": describe(original.manifest["architecture"], model),
        "layers": layer_shapes(model),
        "sparsity": round(1 - after.params / before.params, 4),
        "complexity": {"before": before.as_dict(), "after": after.as_dict()},
    }
    if original.input is None or original.input.kind != "volume":
        keys["gpu"] = {
            "precision": recipe.quantize.gpu,
            "buckets": list(recipe.quantize.buckets),
            "channels_last": True,
        }
    scheme = recipe.quantize.cpu
    if scheme != "none":
        quantized = quantize(
            model, scheme, data.calibration, data.train, recipe.quantize, recipe.finetune, recipe.data.seed
        )
        tensors = {**quantized.weights, **quantized.observers}
        keys["precision"] = int8_precision(scheme)
        keys["quantization"] = _pt2e(scheme, list(recipe.quantize.buckets), quantized.calibration)
    return {WEIGHTS: tensors}, keys


def torch_model(artifact: Artifact) -> nn.Module:
    """The torch model of a ``module`` artifact, or a fresh graph of a ``torch-export``
    one's program, read again (hash-checked) from the artifact: what quantizers and
    exporters take, where the served module wraps the program to serve any batch."""
    if artifact.format != TORCH_EXPORT:
        return artifact.module
    return program_module(load_program(checked_bytes(artifact.path, artifact.manifest)), torch.device("cpu"))


def _program_variant(original: Artifact, recipe: Recipe, data: Training) -> Variant:
    """The imported program as it is, and the observer statistics of its int8 graph."""
    program = checked_bytes(original.path, original.manifest)
    fixed, scheme = fixed_batch(original), recipe.quantize.cpu
    quantized = quantize_program(torch_model(original), scheme, data.calibration, fixed)
    buckets = [fixed] if fixed else list(recipe.quantize.buckets)  # a program exported for one batch size takes only it
    files: dict[str, FileContent] = {MODEL_FILES[TORCH_EXPORT]: program, WEIGHTS: quantized.observers}
    return files, {"precision": int8_precision(scheme), "quantization": _pt2e(scheme, buckets, quantized.calibration)}


def _onnx_variant(original: Artifact, data: Training) -> Variant:
    """The graph as ONNX Runtime's static quantization rewrites it."""
    graph = checked_bytes(original.path, original.manifest)
    name = OnnxModule(graph, torch.device("cpu")).input_name
    quantized, calibration = quantize_onnx(graph, name, data.calibration, fixed_batch(original))
    quantization = {
        "scheme": "int8_static",
        "quantizer": "ONNX Runtime quantize_static (QDQ, per-channel 7-bit int8 weights, uint8 activations)",
        "calibration": calibration,
    }
    return {MODEL_FILES[ONNX]: quantized}, {"precision": "int8", "quantization": quantization}


class _OnCuda(nn.Module):
    """A CUDA-served module scored on CPU tensors."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.cuda()).cpu()


def optimize_artifact(
    original: Artifact,
    recipe: Recipe,
    data: DataSets,
    steps: list[PreprocessStep],
    findings: list[str],
    activation: str,
    target: Path,
    replace: bool = False,
) -> Outcome:
    """The recipe on a loaded fp32 classifier, with its data already preprocessed."""
    batch = max(recipe.quantize.buckets)
    scorer = HeldoutImages(data.heldout, original.classes, findings, activation, batch)
    return _optimize(original, recipe, data, scorer, steps, target, replace)


def optimize_volumes(
    original: Artifact, recipe: Recipe, data: VolumeSets, pipeline: Pipeline, target: Path, replace: bool = False
) -> Outcome:
    """The recipe on a loaded fp32 segmentation model, gated on the Dice of ``pipeline``'s
    lesions over ``data``'s held-out volumes."""
    scorer = HeldoutVolumes(pipeline, data.heldout, data.description)
    return _optimize(original, recipe, data, scorer, pipeline.preprocess, target, replace)


def _optimize(
    original: Artifact,
    recipe: Recipe,
    data: Training,
    scorer: Scorer,
    steps: list[PreprocessStep],
    target: Path,
    replace: bool,
) -> Outcome:
    problem = refusal(original, recipe)
    if problem is not None:
        raise ValueError(problem)
    cpu = torch.device("cpu")
    baseline = scorer(original.module, "evaluating the original")
    verdicts: list[Verdict] = []

    if original.format == MODULE:
        model = original.module
        if recipe.prune:
            model = prune(model, data.train, recipe.prune, recipe.finetune, seed=recipe.data.seed)
            verdicts.append(gate("pruned fp32", baseline, scorer(model, "evaluating the pruned model"), recipe.accept))
        files, keys = _module_variant(original, model, recipe, data)
    elif original.format == TORCH_EXPORT:
        files, keys = _program_variant(original, recipe, data)
    else:
        files, keys = _onnx_variant(original, data)

    manifest: dict[str, Any] = {
        "format": original.format,
        "name": f"{original.manifest.get('name', original.path.name)}-{_variant_name(recipe)}",
        "input": original.manifest["input"],
        "classes": original.classes,
        "precision": "fp32",
        "source": {"name": original.manifest.get("name"), "path": str(original.path), "sha256": original.sha256},
        "preprocessing": preprocessing_record(steps, data.train.images.shape[1:]),
        "recipe": recipe.model_dump(mode="json"),
        **keys,
    }

    with tempfile.TemporaryDirectory(prefix="radpipe-optimize-") as staging:
        candidate = write_artifact(Path(staging) / "candidate", files, manifest)
        served = load_artifact(candidate, cpu)  # exactly what the node will run
        name = f"served {_variant_name(recipe)} ({served.precision}, cpu)"
        verdicts.append(gate(name, baseline, scorer(served.module, f"evaluating {name}"), recipe.accept))
        if torch.cuda.is_available() and "gpu" in manifest:
            gpu = load_artifact(candidate, torch.device("cuda"))
            name = f"served {gpu.precision} (cuda)"
            verdicts.append(gate(name, baseline, scorer(_OnCuda(gpu.module), name), recipe.accept))

    manifest["evaluation"] = {
        "heldout": scorer.description,
        "training_data": data.train.description,
        "original": baseline.as_dict(),
        "variants": {v.variant: v.as_dict() for v in verdicts},
        "accept": accept_record(recipe.accept, original.manifest.get("task", "classification")),
    }
    outcome = Outcome(None, baseline, verdicts, manifest)
    if outcome.failures:
        return outcome
    manifest["source"]["path"] = os.path.relpath(original.path, target.resolve().parent)
    write_artifact(target, files, manifest, replace=replace)
    return Outcome(target, baseline, verdicts, manifest)


def report(outcome: Outcome) -> str:
    """The figures, one line per variant, for the terminal."""
    manifest = outcome.manifest
    baseline = outcome.baseline
    beside = "per finding" if baseline.metric == "AUC" else "lesions reported"

    def aside(scores: Scores) -> dict[str, float]:
        return {k: round(s, 4) for k, s in scores.per_class.items()} if scores.metric == "AUC" else scores.details

    lines = [f"{'variant':<38} {baseline.metric:>7} {'drop':>7}  {beside}"]
    lines.append(f"{'original fp32':<38} {baseline.overall:>7.4f} {'':>7}  {aside(baseline)}")
    for v in outcome.verdicts:
        lines.append(f"{v.variant:<38} {v.scores.overall:>7.4f} {v.drop:>+7.4f}  {aside(v.scores)}")
    if "complexity" in manifest:
        before, after = manifest["complexity"]["before"], manifest["complexity"]["after"]
        lines.append(
            f"params {before['params']:,} -> {after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,} "
            f"(sparsity {manifest['sparsity']:.1%})"
        )
    lines.append(f"held-out: {manifest['evaluation']['heldout']}")
    return "\n".join(lines)


def run(pipeline_path: Path, recipe_path: Path | None, target: Path | None, replace: bool) -> int:
    """The ``radpipe optimize`` command: 0 written, 1 refused by the gate, 2 bad input."""
    from plugin.accel.recipe import RecipeError, load_recipe
    from plugin.models.artifact import ArtifactError
    from plugin.pipeline import PipelineError, load_pipeline

    try:
        pipeline = load_pipeline(pipeline_path)
        recipe = load_recipe(recipe_path) if recipe_path else pipeline.model.optimize
        if recipe is None:
            print(f"{pipeline_path}: no model.optimize recipe; add one or pass --recipe FILE")
            return 2
        target = target or default_target(pipeline, recipe)
        if target.exists() and not replace:
            print(f"{target} exists; pass --force to replace it")
            return 2
        outcome = optimize(pipeline, recipe, target, replace)
    except (PipelineError, RecipeError, ArtifactError, ValueError) as e:
        print(e)
        return 2
    print(report(outcome))
    if outcome.target is None:
        print("accuracy gate failed; nothing written:")
        for failure in outcome.failures:
            print(f"  {failure}")
        return 1
    print(f"wrote {outcome.target}")
    return 0
