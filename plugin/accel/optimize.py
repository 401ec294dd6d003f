"""``radpipe optimize``: run a pipeline's recipe and write the optimized artifact, or
write nothing and say why.

original -> (prune + fine-tune, iteratively) -> (quantize) -> candidate artifact ->
loaded exactly as the node loads it -> scored on the held-out set -> gate -> written.
The figures the gate judged are the served program's, not a stand-in's.

What applies depends on the source's format (:func:`refusal` says why the rest does not):

- ``module`` (radpipe's architectures, installed packages' entry points, MONAI networks):
  pruning, and int8 through torchao's PT2E flow (static, QAT or dynamic);
- ``torch-export`` (an imported program): PT2E int8, static or dynamic, on the program's
  own graph;
- ``onnx``: ONNX Runtime's static int8.
"""

import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from plugin.accel.data import DataSets, load_data
from plugin.accel.evaluate import Scores, Verdict, evaluate, gate
from plugin.accel.export import preprocessing_record
from plugin.accel.prune import complexity, describe, prune
from plugin.accel.quantize import quantize, quantize_onnx, quantize_program
from plugin.accel.recipe import Recipe
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


def refusal(original: Artifact, recipe: Recipe) -> str | None:
    """Why ``recipe`` cannot run on ``original``, in one line; None if it can."""
    kind, spec = original.format, original.input
    if "quantization" in original.manifest:
        return f"{original.path} is already quantized: optimize its fp32 original instead"
    if spec is not None and spec.kind == "volume":
        return f"{original.path}: a volume model: the accuracy gate scores 2D images only, so it cannot judge one"
    if kind == MODULE:
        return None
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
    data: DataSets | None = None,
) -> Outcome:
    """Run ``recipe`` on ``pipeline``'s model; write the artifact only if the gate passes."""
    original = load_artifact(pipeline.artifact_dir, torch.device("cpu"))
    problem = refusal(original, recipe)
    if problem is not None:  # before the data is made
        raise ValueError(problem)
    base = pipeline.source.parent if pipeline.source else Path.cwd()
    data = data or load_data(pipeline.preprocess, recipe.data, recipe.calibration, original.classes, base, workers)
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


def _module_variant(original: Artifact, model: nn.Module, recipe: Recipe, data: DataSets) -> Variant:
    """The (pruned) module's weights, int8 observer statistics and what rebuilds it."""
    example = data.heldout.images[:1]
    before, after = complexity(original.module, example), complexity(model, example)
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    keys: dict[str, Any] = {
        "architecture": describe(original.manifest["architecture"], model),
        "layers": layer_shapes(model),
        "sparsity": round(1 - after.params / before.params, 4),
        "complexity": {"before": before.as_dict(), "after": after.as_dict()},
        "gpu": {"precision": recipe.quantize.gpu, "buckets": list(recipe.quantize.buckets), "channels_last": True},
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


def _program_variant(original: Artifact, recipe: Recipe, data: DataSets) -> Variant:
    """The imported program as it is, and the observer statistics of its int8 graph."""
    program = checked_bytes(original.path, original.manifest)
    fixed, scheme = fixed_batch(original), recipe.quantize.cpu
    quantized = quantize_program(torch_model(original), scheme, data.calibration, fixed)
    buckets = [fixed] if fixed else list(recipe.quantize.buckets)  # a program exported for one batch size takes only it
    files: dict[str, FileContent] = {MODEL_FILES[TORCH_EXPORT]: program, WEIGHTS: quantized.observers}
    return files, {"precision": int8_precision(scheme), "quantization": _pt2e(scheme, buckets, quantized.calibration)}


def _onnx_variant(original: Artifact, data: DataSets) -> Variant:
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
    """The recipe on a loaded fp32 artifact, with its data already preprocessed."""
    problem = refusal(original, recipe)
    if problem is not None:
        raise ValueError(problem)
    cpu = torch.device("cpu")
    classes = original.classes
    batch = max(recipe.quantize.buckets)
    baseline = evaluate(original.module, data.heldout, classes, findings, activation, batch, "evaluating the original")
    verdicts: list[Verdict] = []

    if original.format == MODULE:
        model = original.module
        if recipe.prune:
            model = prune(model, data.train, recipe.prune, recipe.finetune, seed=recipe.data.seed)
            scores = evaluate(model, data.heldout, classes, findings, activation, batch, "evaluating the pruned model")
            verdicts.append(gate("pruned fp32", baseline, scores, recipe.accept))
        files, keys = _module_variant(original, model, recipe, data)
    elif original.format == TORCH_EXPORT:
        files, keys = _program_variant(original, recipe, data)
    else:
        files, keys = _onnx_variant(original, data)

    manifest: dict[str, Any] = {
        "format": original.format,
        "name": f"{original.manifest.get('name', original.path.name)}-{_variant_name(recipe)}",
        "input": original.manifest["input"],
        "classes": classes,
        "precision": "fp32",
        "source": {"name": original.manifest.get("name"), "path": str(original.path), "sha256": original.sha256},
        "preprocessing": preprocessing_record(steps, data.heldout.images.shape[1:]),
        "recipe": recipe.model_dump(mode="json"),
        **keys,
    }

    with tempfile.TemporaryDirectory(prefix="radpipe-optimize-") as staging:
        candidate = write_artifact(Path(staging) / "candidate", files, manifest)
        served = load_artifact(candidate, cpu)  # exactly what the node will run
        name = f"served {_variant_name(recipe)} ({served.precision}, cpu)"
        scores = evaluate(served.module, data.heldout, classes, findings, activation, batch, f"evaluating {name}")
        verdicts.append(gate(name, baseline, scores, recipe.accept))
        if torch.cuda.is_available() and "gpu" in manifest:
            gpu = load_artifact(candidate, torch.device("cuda"))
            name = f"served {gpu.precision} (cuda)"
            scores = evaluate(
                lambda x: gpu.module(x.cuda()).cpu(), data.heldout, classes, findings, activation, batch, name
            )
            verdicts.append(gate(name, baseline, scores, recipe.accept))

    manifest["evaluation"] = {
        "heldout": data.heldout.description,
        "training_data": data.train.description,
        "original": baseline.as_dict(),
        "variants": {v.variant: v.as_dict() for v in verdicts},
        "accept": recipe.accept.model_dump(),
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
    lines = [f"{'variant':<38} {'AUC':>7} {'drop':>7}  per finding"]
    lines.append(f"{'original fp32':<38} {outcome.baseline.overall:>7.4f} {'':>7}  {outcome.baseline.per_class}")
    for v in outcome.verdicts:
        per_class = {k: round(s, 4) for k, s in v.scores.per_class.items()}
        lines.append(f"{v.variant:<38} {v.scores.overall:>7.4f} {v.auc_drop:>+7.4f}  {per_class}")
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
