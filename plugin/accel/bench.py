"""``radpipe bench``: every way to run the model, side by side, on one machine.

Rows, where they apply to the original's format: fp32 eager (what the node runs without
optimization: the module, or an imported program's graph), fp32 compiled (inductor),
pruned fp32, int8 (torchao static PTQ of the unpruned model), the optimized artifact
(e.g. pruned+int8), and what a user would otherwise pick: ONNX Runtime fp32 and ONNX
Runtime static int8 of the original (for an ONNX original, its own graph and its int8).
Every int8 row is made by ``radpipe optimize``'s own code and loaded as the node loads
it (torchao's through a compile cache, as ``radpipe serve`` compiles them: AOTInductor
packages, no Python guards per call). For batch sizes 1, 8 and 32: latency p50/p95, images/s (batch / median latency),
size on disk, and AUC on the same held-out images. Every int8 variant made here is
calibrated on the images ``radpipe optimize`` calibrates the recipe's int8 on (the
recipe's data through the pipeline's preprocessing), and the speed ratios are given per
batch size only against baselines within the recipe's AUC gate: beating one that lost
its accuracy proves nothing, so it gets its AUC and the reason instead. Prints a table,
writes ``bench.json`` and draws ``bench.png``.

A segmentation model (a pipeline with ``task: segmentation``) gets its own rows: fp32
eager and compiled, the optimized (pruned) model eager and compiled, int8 only where
torchao quantizes its layers (else the reason is printed); latency per batch of windows
(1 and the pipeline's ``sw_batch_size``, windows of its ``roi_size``) and the Dice of the
lesions the pipeline reports on the recipe's held-out phantom volumes.
"""

import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from plugin.accel.data import DataSets, Split, calibration_data, phantom_split
from plugin.accel.evaluate import HeldoutVolumes, Scores, evaluate, gate
from plugin.accel.export import export_onnx
from plugin.accel.optimize import fixed_batch, int8_refusal, optimize, optimize_artifact, report, torch_model
from plugin.accel.recipe import Accept, Recipe, accept_record
from plugin.accel.volumes import heldout_volumes, training_windows
from plugin.models.artifact import (
    MODEL_FILES,
    ONNX,
    WEIGHTS,
    Artifact,
    ArtifactError,
    load_artifact,
    read_manifest,
    versions,
    write_artifact,
)
from plugin.models.compile_cache import CompileCache
from plugin.models.registry import build
from plugin.models.serving import OBSERVER_PREFIX, BucketedModule, apply_layer_shapes, compile_program
from plugin.pipeline import Pipeline, load_pipeline
from plugin.preprocess import PreprocessStep

Runner = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class Row:
    """One variant at one batch size: ``per_s`` images (windows, for a segmentation model)
    a second, ``score`` its held-out AUC (Dice)."""

    variant: str
    batch: int
    p50_ms: float
    p95_ms: float
    per_s: float
    size_mb: float
    score: float


def _dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


ROUNDS = 3  # turns each variant gets at each batch size, the variants in turn within a round


def measure(
    runs: dict[str, Runner], images: Tensor, batch_sizes: list[int], seconds: float, rounds: int = ROUNDS
) -> dict[tuple[str, int], tuple[float, float, float]]:
    """(p50 ms, p95 ms, images/s) of every run at every batch size, after a warm-up. Each
    gets ``seconds`` in ``rounds`` turns, the runs taking turns within each round, so that
    other work on the machine falls on all of them alike rather than on whichever was
    being measured then; the percentiles are over the calls of all its turns. The batch
    is an inference tensor, as the node's preprocessing makes: a served int8 program
    copies any other tensor before calling its compiled program (plugin/models/serving.py)."""
    times: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        batches = {batch: images[torch.arange(batch) % len(images)] for batch in batch_sizes}
        for turn in range(rounds):
            for name, run in runs.items():
                for batch, x in batches.items():
                    for _ in range(3 if turn == 0 else 0):
                        run(x)
                    calls = times.setdefault((name, batch), [])
                    made, deadline = len(calls), time.perf_counter() + seconds / rounds
                    while len(calls) - made < 2 or (time.perf_counter() < deadline and len(calls) < 2000):
                        start = time.perf_counter()
                        run(x)
                        calls.append(time.perf_counter() - start)
    measured = {}
    for (name, batch), calls in times.items():
        p50, p95 = np.percentile(calls, [50, 95])
        measured[name, batch] = (1000 * float(p50), 1000 * float(p95), batch / float(p50))
    return measured


def fp32_module(optimized: Path) -> nn.Module:
    """An artifact's (possibly pruned) fp32 weights in a plain eager module: no int8, no compile."""
    manifest = read_manifest(optimized)
    module = apply_layer_shapes(build(manifest["architecture"]), manifest.get("layers", {}))
    tensors = load_file(str(optimized / WEIGHTS))
    module.load_state_dict({k: v for k, v in tensors.items() if not k.startswith(OBSERVER_PREFIX)})
    return module.eval()


def _compiled(module: nn.Module, buckets: list[int], shape: tuple[int, ...]) -> nn.Module:
    served = BucketedModule(module, compile_program(module), buckets)
    served.warm_up(shape, torch.device("cpu"))
    return served


def _as_onnx(original: Artifact, example: Tensor, target: Path) -> Artifact:
    """The original exported to ONNX (fp32) and written as an ``onnx`` artifact with its
    input and classes, loaded as the node loads one (ONNX Runtime)."""
    exported = export_onnx(torch_model(original), example, target.with_suffix(".onnx"))
    manifest = {"format": ONNX, "name": f"{original.path.name}-onnx", "input": original.manifest["input"]}
    files = {MODEL_FILES[ONNX]: exported.read_bytes()}
    return load_artifact(write_artifact(target, files, {**manifest, "classes": original.classes}), torch.device("cpu"))


def _row_name(optimized: Artifact) -> str:
    """An optimized artifact's row: the name a variant made here of the original would have."""
    base = "ORT int8 static" if optimized.format == ONNX else optimized.precision
    return f"pruned+{base}" if optimized.manifest.get("recipe", {}).get("prune") else base


def _resolve(target: Path, optimized: Path | None) -> tuple[Path, Path | None, Pipeline | None]:
    """(original artifact, optimized artifact or None, pipeline or None) for a target."""
    if target.is_dir():
        manifest = read_manifest(target)
        if "source" not in manifest:
            raise ValueError(f"{target} is not an optimized artifact: give a pipeline YAML instead")
        return (target.resolve().parent / manifest["source"]["path"]).resolve(), target, None
    pipeline = load_pipeline(target)
    manifest = read_manifest(pipeline.artifact_dir)
    if "source" in manifest:
        return (pipeline.artifact_dir.parent / manifest["source"]["path"]).resolve(), pipeline.artifact_dir, pipeline
    return pipeline.artifact_dir, optimized, pipeline


def _chart(rows: list[Row], batch: int, path: Path, metric: str, unit: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    for i, row in enumerate(r for r in rows if r.batch == batch):
        axes.scatter(row.per_s, row.score, s=40)
        offset = (5, 4 - 11 * (i % 3))  # neighbours at equal AUC get labels on different lines
        axes.annotate(row.variant, (row.per_s, row.score), textcoords="offset points", xytext=offset, fontsize=8)
    axes.set_xscale("log")
    axes.set_xlabel(f"{unit}/s at batch {batch} (log scale)")
    axes.set_ylabel(f"held-out {metric}")
    axes.set_title(f"radpipe bench: speed vs accuracy ({platform.processor() or platform.machine()})")
    axes.grid(True, which="both", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def table(rows: list[Row], metric: str = "AUC", unit: str = "images") -> str:
    header = f"{'variant':<22} {'batch':>5} {'p50 ms':>9} {'p95 ms':>9} {unit + '/s':>10} {'size MB':>8} {metric:>7}"
    lines = [header]
    for r in rows:
        lines.append(
            f"{r.variant:<22} {r.batch:>5} {r.p50_ms:>9.2f} {r.p95_ms:>9.2f} {r.per_s:>10.1f} "
            f"{r.size_mb:>8.3f} {r.score:>7.4f}"
        )
    return "\n".join(lines)


def bench(
    original_dir: Path,
    optimized_dir: Path | None,
    steps: list[PreprocessStep],
    findings: list[str],
    data: DataSets,
    batch_sizes: list[int],
    seconds: float,
    work: Path,
    accept: Accept | None = None,
) -> tuple[list[Row], dict[str, Any]]:
    """Measure every variant that applies to the original's format; returns the rows and
    the summary ratios. ``optimized_dir``: an optimized artifact to show beside them. Every
    int8 variant made here is calibrated on ``data.calibration``. ``accept``: the recipe's
    gate; a baseline that fails it against the original gets no speed ratio, since beating
    a broken baseline says nothing."""
    cpu = torch.device("cpu")
    # int8 programs compiled as `radpipe serve` compiles them: AOTInductor packages in a
    # compile cache (plugin/models/compile_cache.py), here one in the scratch folder
    cache = CompileCache(work / "compiled")
    original = load_artifact(original_dir, cpu)
    optimized = load_artifact(optimized_dir, cpu, compile_cache=cache) if optimized_dir is not None else None
    best = _row_name(optimized) if optimized is not None else ""
    buckets = sorted(set(batch_sizes))
    recipe = Recipe.model_validate(
        {
            "quantize": {"cpu": "int8_static", "buckets": buckets},
            "accept": {"max_auc_drop": 1, "max_per_class_auc_drop": 1},
        }
    )

    def served(artifact: Artifact) -> tuple[Runner, int]:
        return artifact.module, _dir_size(artifact.path)

    def int8(name: str, source: Artifact) -> tuple[Runner, int]:
        """The optimized artifact where it is this variant, else the variant made here."""
        if optimized is not None and name == best:
            return served(optimized)
        made = optimize_artifact(source, recipe, data, steps, findings, "softmax", work / name.replace(" ", "-"))
        assert made.target is not None  # nothing to refuse with these limits
        return served(load_artifact(made.target, cpu, compile_cache=cache))

    variants: dict[str, tuple[Runner, int]] = {}
    onnx = original
    if original.format != ONNX:
        variants["fp32 eager"] = served(original)
        shape = tuple(data.heldout.images.shape[1:])
        variants["fp32 compiled"] = (_compiled(original.module, buckets, shape), _dir_size(original_dir))
        if optimized is not None and best.startswith("pruned+") and best != "pruned+fp32":
            pruned = fp32_module(optimized.path)
            save_file({k: v.contiguous() for k, v in pruned.state_dict().items()}, str(work / "pruned.safetensors"))
            variants["pruned fp32"] = (pruned, _dir_size(work / "pruned.safetensors"))
        variants["int8"] = int8("int8", original)
        onnx = _as_onnx(original, data.heldout.images[: fixed_batch(original) or 2], work / "onnx")
    if optimized is not None and best not in ("int8", "ORT int8 static"):
        variants[best] = served(optimized)
    variants["ORT fp32"] = served(onnx)
    variants["ORT int8 static"] = int8("ORT int8 static", onnx)

    rows: list[Row] = []
    scores: dict[str, Scores] = {}
    classes = original.classes
    for name, (run, _) in variants.items():
        scores[name] = evaluate(run, data.heldout, classes, findings, batch=max(buckets), what=f"AUC of {name}")
    print(f"measuring {len(variants)} variants in turn, {ROUNDS} rounds ...", flush=True)
    measured = measure({name: run for name, (run, _) in variants.items()}, data.heldout.images, batch_sizes, seconds)
    for name, (_, size) in variants.items():
        for batch in batch_sizes:
            p50, p95, rate = measured[name, batch]
            rows.append(Row(name, batch, p50, p95, rate, size / 1e6, scores[name].overall))
    shown = best or ("ORT int8 static" if original.format == ONNX else "int8")
    summary = {"original format": original.format, **summarize(rows, scores, shown, accept or Accept())}
    summary["calibration"] = data.calibration.description
    summary["optimized"] = optimized.manifest.get("name") if optimized is not None else None
    return rows, summary


def summarize(rows: list[Row], scores: dict[str, Scores], shown: str, accept: Accept) -> dict[str, Any]:
    """``shown``'s speed over each baseline's per batch size and its AUC drop. The first
    variant is the original as the node serves it unoptimized, the reference of every
    drop; a baseline whose drop fails ``accept`` gets its AUC and the reason instead of a
    ratio."""
    original = next(iter(scores))
    summary: dict[str, Any] = {"gate": accept_record(accept, "classification")}

    def speed(variant: str, batch: int) -> float:
        return next(r.per_s for r in rows if r.variant == variant and r.batch == batch)

    for other in dict.fromkeys((original, "ORT fp32", "ORT int8 static")):
        if other == shown or other not in scores:
            continue
        summary[f"AUC of {other}"] = round(scores[other].overall, 4)
        failures = gate(other, scores[original], scores[other], accept).failures
        key = f"{shown} / {other} (images/s)"
        if failures:
            summary[key] = "no ratio: a baseline that lost accuracy: " + "; ".join(failures)
        else:
            summary[key] = {
                f"batch {b}": round(speed(shown, b) / speed(other, b), 2) for b in sorted({r.batch for r in rows})
            }
    summary[f"AUC drop of {shown}"] = round(scores[original].overall - scores[shown].overall, 4)
    return summary


def bench_volumes(
    original_dir: Path,
    optimized_dir: Path | None,
    scorer: HeldoutVolumes,
    windows: Tensor,
    batch_sizes: list[int],
    seconds: float,
) -> tuple[list[Row], dict[str, Any]]:
    """The segmentation rows (see the module's docstring) and the summary ratios."""
    cpu = torch.device("cpu")
    original = load_artifact(original_dir, cpu)
    buckets, shape = sorted(set(batch_sizes)), tuple(windows.shape[1:])
    variants: dict[str, tuple[nn.Module, int]] = {
        "fp32 eager": (original.module, _dir_size(original_dir)),
        "fp32 compiled": (_compiled(original.module, buckets, shape), _dir_size(original_dir)),
    }
    best = ""
    if optimized_dir is not None:
        optimized = load_artifact(optimized_dir, cpu)
        best = _row_name(optimized)
        variants[best] = (optimized.module, _dir_size(optimized_dir))
        if optimized.precision == "fp32":
            variants[f"{best} compiled"] = (_compiled(optimized.module, buckets, shape), _dir_size(optimized_dir))
    int8 = int8_refusal(original, "int8_static")
    if int8 is not None:
        print(f"int8: none: {int8}", flush=True)

    rows: list[Row] = []
    dice = {name: scorer(module, f"Dice of {name}").overall for name, (module, _) in variants.items()}
    measured = measure({name: module for name, (module, _) in variants.items()}, windows, batch_sizes, seconds)
    for name, (_, size) in variants.items():
        for batch in batch_sizes:
            p50, p95, rate = measured[name, batch]
            rows.append(Row(name, batch, p50, p95, rate, size / 1e6, dice[name]))

    def row(variant: str, batch: int) -> Row:
        return next(r for r in rows if r.variant == variant and r.batch == batch)

    top = max(batch_sizes)
    summary: dict[str, Any] = {"batch": top, "original format": original.format, "int8": int8 or "applies"}
    for variant in [v for v in variants if v != "fp32 eager"]:
        summary[f"{variant} / fp32 eager (windows/s)"] = round(
            row(variant, top).per_s / row("fp32 eager", top).per_s, 2
        )
    if best:
        summary[f"Dice drop of {best}"] = round(row("fp32 eager", top).score - row(best, top).score, 4)
    summary["optimized"] = best or None
    return rows, summary


@dataclass(frozen=True)
class Inputs:
    """What a classifier is benched on (:func:`bench_inputs`)."""

    steps: list[PreprocessStep]
    findings: list[str]
    data: DataSets
    accept: Accept


def bench_inputs(
    original_dir: Path, optimized_dir: Path | None, pipeline: Pipeline | None, heldout: int, workers: int
) -> Inputs:
    """The pipeline's preprocessing and findings (an artifact's record of them when no
    pipeline is given), ``heldout`` slices of the recipe's held-out phantom stream, and the
    recipe's gate. The recipe is the optimized artifact's, else the pipeline's: every int8
    baseline is calibrated on the images ``radpipe optimize`` calibrated with it, its data
    through the preprocessing the node applies."""
    manifest = read_manifest(optimized_dir) if optimized_dir is not None else {}
    if pipeline is not None:
        steps = list(pipeline.preprocess)
        findings = [f.label for f in pipeline.postprocess.findings]
        base = pipeline.source.parent if pipeline.source else Path.cwd()
    else:  # the target is an optimized artifact
        steps = [PreprocessStep.model_validate(s) for s in manifest["preprocessing"]["steps"]]
        findings = list(manifest["evaluation"]["original"]["per_class_auc"])
        base = Path.cwd()  # the pipeline file's folder is not recorded
    given = pipeline.model.optimize if pipeline is not None else None
    recipe = Recipe.model_validate(manifest["recipe"]) if "recipe" in manifest else given or Recipe()
    classes = read_manifest(original_dir)["classes"]
    calibration = calibration_data(steps, recipe.data, recipe.calibration, classes, base, workers)
    seed = recipe.data.seed
    held = phantom_split(steps, np.random.SeedSequence(seed).spawn(2)[1], heldout, classes, workers)
    held = Split(held.images, held.labels, f"{held.description} (seed {seed}, stream 1)")
    return Inputs(steps, findings, DataSets(train=calibration, heldout=held, calibration=calibration), recipe.accept)


def _segmentation(
    original_dir: Path, optimized_dir: Path | None, pipeline: Pipeline, seconds: float
) -> tuple[list[Row], dict[str, Any], str, list[int]]:
    """A segmentation model's rows, summary, held-out volumes' description and batch sizes
    (1 and the pipeline's ``sw_batch_size``)."""
    recipe = pipeline.model.optimize or Recipe()
    volumes, described = heldout_volumes(recipe.data)
    window = pipeline.input.sliding_window
    batch_sizes = sorted({1, window.sw_batch_size if window else 1})
    windows = training_windows(pipeline, volumes[:1], max(batch_sizes), recipe.data.seed).images
    scorer = HeldoutVolumes(pipeline, volumes, described)
    rows, summary = bench_volumes(original_dir, optimized_dir, scorer, windows, batch_sizes, seconds)
    return rows, summary, described, batch_sizes


def run(
    target: Path,
    optimized: Path | None,
    out: Path,
    heldout: int,
    batch_sizes: list[int],
    seconds: float,
    threads: int | None = None,
) -> int:
    """The ``radpipe bench`` command. ``threads``: intra-op threads for torch (set before
    anything is compiled: inductor bakes the count into its kernels) and ONNX Runtime alike;
    on a shared machine one thread per run is the figure that other load disturbs least.
    ``heldout`` and ``batch_sizes`` are a classifier's; a segmentation model is scored on its
    recipe's held-out volumes, per window batch of its pipeline."""
    if threads:
        torch.set_num_threads(threads)
    try:
        import matplotlib  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        print(f"radpipe bench needs the bench extras ({e.name} is missing): pip install 'radpipe[bench]'")
        return 2
    try:
        original_dir, optimized_dir, pipeline = _resolve(target, optimized)
    except (ValueError, ArtifactError) as e:
        print(e)
        return 2
    segmentation = read_manifest(original_dir).get("task") == "segmentation"
    if segmentation and pipeline is None:
        print(f"{target}: a segmentation model is benched from its pipeline YAML (its sliding window and segments)")
        return 2
    metric, unit = ("Dice", "windows") if segmentation else ("AUC", "images")
    with tempfile.TemporaryDirectory(prefix="radpipe-bench-") as scratch:
        work = Path(scratch)
        try:
            if optimized_dir is None and pipeline is not None and pipeline.model.optimize is not None:
                print("running the pipeline's recipe first (radpipe optimize) ...", flush=True)
                outcome = optimize(pipeline, pipeline.model.optimize, work / "optimized")
                if outcome.target is None:
                    print(report(outcome))
                    print("the pipeline's recipe fails its accuracy gate: " + "; ".join(outcome.failures))
                    return 1
                optimized_dir = outcome.target
            if segmentation and pipeline is not None:
                rows, summary, described, batch_sizes = _segmentation(original_dir, optimized_dir, pipeline, seconds)
            else:
                given = bench_inputs(original_dir, optimized_dir, pipeline, heldout, os.cpu_count() or 1)
                rows, summary = bench(
                    original_dir,
                    optimized_dir,
                    given.steps,
                    given.findings,
                    given.data,
                    batch_sizes,
                    seconds,
                    work,
                    given.accept,
                )
                described = given.data.heldout.description
        except (ValueError, ArtifactError) as e:  # a recipe that does not apply to the model's format
            print(e)
            return 2
    out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_1_5_15": [round(v, 2) for v in os.getloadavg()],  # other work skews every figure
        },
        "torch_threads": torch.get_num_threads(),
        "versions": versions(),
        "heldout": described,
        "metric": metric,
        "unit": unit,
        "rows": [asdict(r) for r in rows],
        "summary": summary,
    }
    (out / "bench.json").write_text(json.dumps(result, indent=2) + "\n")
    _chart(rows, max(batch_sizes), out / "bench.png", metric, unit)
    print(table(rows, metric, unit))
    for key, value in summary.items():
        print(f"{key}: {', '.join(f'{k} {v}' for k, v in value.items()) if isinstance(value, dict) else value}")
    print(f"load average during the run: {result['machine']['load_average_1_5_15']} on {os.cpu_count()} cores")
    print(f"wrote {out / 'bench.json'} and {out / 'bench.png'}")
    return 0
