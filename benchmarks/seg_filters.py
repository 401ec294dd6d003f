"""What each lesion filter of the segmentation demo does: its artifact scored, as
`python -m plugin.demo.train_seg --evaluate` scores it, with the pipeline as it is and with
one filter or another left out (or the model alone), on the same phantom volumes.

The model runs once per volume: its stitched output is kept, and each variant of
`postprocess.segments` is applied to it. Seed 1 gives the tuning volumes that the filters
are chosen on; the artifact's training seed (0), its held-out volumes, only to report.

Seed 3 gives a second set drawn the same way, to check a choice made on seed 1 with volumes
it was not made on. `--alone 0.65 0.5` adds the pipeline with the `alone` band's lower bound
at each of those scores, `--apart 0.75 1.5` with `apart`'s `max_attached` at each of those.
`--demo 40` scores the studies `radpipe demo` sends for seeds 0-39 instead (24 slices, a
series with nodules and one without each), as the node sees them.

Run: .venv/bin/python -m benchmarks.seg_filters [--artifact DIR] [--seed 1] [--n-val 60] [--demo N]
     [--alone P ...] [--apart A ...] [--json out.json]
"""

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import REPO, report
from plugin.demo import train_seg
from plugin.demo.series import synthetic_study_volumes
from plugin.models.artifact import load_artifact, read_manifest
from plugin.pipeline import Pipeline, SegmentSpec

PIPELINE = REPO / "pipelines" / "lung-nodule-seg-demo.yaml"


def variants(spec: SegmentSpec, alone_bounds: list[float], apart_bounds: list[float]) -> dict[str, dict[str, Any]]:
    """Updates of the pipeline's segment, by what they leave out, then with the ``alone``
    band's lower bound at each of ``alone_bounds``, and ``apart``'s ``max_attached`` at each
    of ``apart_bounds``."""
    outline = spec.outline
    alone_off = None if outline is None else outline.model_copy(update={"alone": None})
    apart_off = None if outline is None else outline.model_copy(update={"apart": None})
    alone_from = {}
    if outline is not None and outline.alone is not None:
        for bound in alone_bounds:
            alone = outline.alone.model_copy(update={"min_mean_probability": bound})
            alone_from[f"alone from {bound}"] = {"outline": outline.model_copy(update={"alone": alone})}
    apart_at = {}
    if outline is not None and outline.apart is not None:
        for bound in apart_bounds:
            apart = outline.apart.model_copy(update={"max_attached": bound})
            apart_at[f"apart at {bound}"] = {"outline": outline.model_copy(update={"apart": apart})}
    return {
        "the pipeline": {},
        "the model alone (threshold, min_volume_mm3)": {
            "min_mean_probability": 0.0,
            "min_compactness": 0.0,
            "grow_threshold": None,
            "outline": None,
        },
        "without min_compactness": {"min_compactness": 0.0},
        "min_compactness 0.45": {"min_compactness": 0.45},
        "without min_mean_probability (nor alone)": {"min_mean_probability": 0.0, "outline": alone_off},
        "without alone": {"outline": alone_off},
        "without apart": {"outline": apart_off},
        "without outline (nor alone)": {"outline": None},
        "without outline (nor alone) or grow_threshold": {"outline": None, "grow_threshold": None},
        **alone_from,
        **apart_at,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, default=REPO / "pipelines" / "models" / "lung-nodule-seg-demo")
    parser.add_argument(
        "--seed", type=int, default=1, help="1: the tuning volumes; 3: a second set; 0: the shipped model's held-out"
    )
    parser.add_argument("--n-val", type=int, default=60)
    parser.add_argument(
        "--demo", type=int, help="score `radpipe demo`'s studies of seeds 0 to DEMO - 1 (both series) instead"
    )
    parser.add_argument("--alone", type=float, nargs="*", default=[], help="lower bounds of the alone band to score")
    parser.add_argument("--apart", type=float, nargs="*", default=[], help="apart's max_attached values to score")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model = load_artifact(args.artifact, torch.device("cpu"), read_manifest(args.artifact)).module
    if args.demo is None:
        volumes = train_seg.phantom_volumes(np.random.SeedSequence(args.seed).spawn(2)[1], args.n_val)
    else:
        volumes = [volume for seed in range(args.demo) for volume in synthetic_study_volumes(seed).values()]
    pipeline = train_seg.read_pipeline(PIPELINE)

    # evaluate() runs the model through train_seg.segment_volume: keep each volume's output
    outputs: dict[int, torch.Tensor] = {}
    infer = train_seg.segment_volume

    def once(model: torch.nn.Module, image: torch.Tensor, *window: Any) -> torch.Tensor:
        key = hash(image.numpy().tobytes())
        if key not in outputs:
            outputs[key] = infer(model, image, *window)
        return outputs[key]

    train_seg.segment_volume = once  # type: ignore[assignment]
    spec = pipeline.postprocess.segments[0]
    figures: dict[str, Any] = {
        "artifact": str(args.artifact),
        "seed": args.seed if args.demo is None else f"radpipe demo's studies 0-{args.demo - 1}",
        "volumes": len(volumes),
        "volumes_without_nodules": sum(not len(volume.nodules) for volume in volumes),
    }
    for name, update in variants(spec, args.alone, args.apart).items():
        postprocess = pipeline.postprocess.model_copy(update={"segments": [spec.model_copy(update=update)]})
        variant: Pipeline = pipeline.model_copy(update={"postprocess": postprocess})
        scored = train_seg.evaluate(model, variant, volumes)
        n = scored["n_nodules_5mm"]
        figures[name] = {
            "found_5mm": round(scored["sensitivity_5mm"] * n),
            "within_15pct_5mm": round(scored["volume_within_15pct_5mm"] * n),
            "nodules_5mm": n,
            "false_lesions": round(scored["false_positives_per_volume"] * len(volumes)),
            "volumes_without_nodules_with_a_lesion": scored["volumes_without_nodules_with_a_lesion"],
            "dice": scored["dice"],
            "median_volume_error_5mm": scored["median_volume_error_5mm"],
        }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
