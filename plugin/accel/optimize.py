"""``radpipe optimize``: run a pipeline's recipe and write the optimized artifact, or
write nothing and say why.

original -> (prune + fine-tune, iteratively) -> (quantize) -> candidate artifact ->
loaded exactly as the node loads it -> scored on the held-out set -> gate -> written.
The figures the gate judged are the served program's, not a stand-in's.
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
from plugin.accel.quantize import quantize
from plugin.accel.recipe import Recipe
from plugin.models.artifact import MODULE, WEIGHTS, Artifact, load_artifact, write_artifact
from plugin.models.serving import layer_shapes
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


def _source_model(artifact: Artifact) -> nn.Module:
    if "quantization" in artifact.manifest:
        raise ValueError(f"{artifact.path} is already quantized: optimize its fp32 original instead")
    return artifact.module


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
    cpu = torch.device("cpu")
    model = _source_model(original)
    classes = original.classes
    batch = max(recipe.quantize.buckets)
    baseline = evaluate(model, data.heldout, classes, findings, activation, batch, "evaluating the original")
    example = data.heldout.images[:1]
    before = complexity(model, example)
    verdicts: list[Verdict] = []

    if recipe.prune:
        model = prune(model, data.train, recipe.prune, recipe.finetune, seed=recipe.data.seed)
        scores = evaluate(model, data.heldout, classes, findings, activation, batch, "evaluating the pruned model")
        verdicts.append(gate("pruned fp32", baseline, scores, recipe.accept))
    after = complexity(model, example)

    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    manifest: dict[str, Any] = {
        "format": MODULE,
        "name": f"{original.manifest.get('name', original.path.name)}-{_variant_name(recipe)}",
        "architecture": describe(original.manifest["architecture"], model),
        "layers": layer_shapes(model),
        "input": original.manifest["input"],
        "classes": classes,
        "precision": "fp32",
        "sparsity": round(1 - after.params / before.params, 4),
        "complexity": {"before": before.as_dict(), "after": after.as_dict()},
        "source": {"name": original.manifest.get("name"), "path": str(original.path), "sha256": original.sha256},
        "preprocessing": preprocessing_record(steps),
        "recipe": recipe.model_dump(mode="json"),
        "gpu": {"precision": recipe.quantize.gpu, "buckets": list(recipe.quantize.buckets), "channels_last": True},
    }
    if recipe.quantize.cpu != "none":
        quantized = quantize(
            model, recipe.quantize.cpu, data.calibration, data.train, recipe.quantize, recipe.finetune, recipe.data.seed
        )
        tensors = {**quantized.weights, **quantized.observers}
        manifest["precision"] = "int8-dynamic" if recipe.quantize.cpu == "int8_dynamic" else "int8"
        manifest["quantization"] = {
            "scheme": recipe.quantize.cpu,
            "quantizer": "torchao X86InductorQuantizer (PT2E)",
            "buckets": list(recipe.quantize.buckets),
            "calibration": quantized.calibration,
        }

    with tempfile.TemporaryDirectory(prefix="radpipe-optimize-") as staging:
        candidate = write_artifact(Path(staging) / "candidate", {WEIGHTS: tensors}, manifest)
        served = load_artifact(candidate, cpu)  # exactly what the node will run
        name = f"served {_variant_name(recipe)} ({served.precision}, cpu)"
        scores = evaluate(served.module, data.heldout, classes, findings, activation, batch, f"evaluating {name}")
        verdicts.append(gate(name, baseline, scores, recipe.accept))
        if torch.cuda.is_available():
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
    write_artifact(target, {WEIGHTS: tensors}, manifest, replace=replace)
    return Outcome(target, baseline, verdicts, manifest)


def report(outcome: Outcome) -> str:
    """The figures, one line per variant, for the terminal."""
    manifest = outcome.manifest
    lines = [f"{'variant':<38} {'AUC':>7} {'drop':>7}  per finding"]
    lines.append(f"{'original fp32':<38} {outcome.baseline.overall:>7.4f} {'':>7}  {outcome.baseline.per_class}")
    for v in outcome.verdicts:
        per_class = {k: round(s, 4) for k, s in v.scores.per_class.items()}
        lines.append(f"{v.variant:<38} {v.scores.overall:>7.4f} {v.auc_drop:>+7.4f}  {per_class}")
    before, after = manifest["complexity"]["before"], manifest["complexity"]["after"]
    lines.append(
        f"params {before['params']:,} -> {after['params']:,}, MACs {before['macs']:,} -> {after['macs']:,} "
        f"(sparsity {manifest['sparsity']:.1%}); held-out: {manifest['evaluation']['heldout']}"
    )
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
