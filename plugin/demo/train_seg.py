"""Train the demo lung-nodule segmentation model on phantom volumes, reproducibly, with one command.

    python -m plugin.demo.train_seg --out pipelines/models/lung-nodule-seg-demo

A change to the pipeline's ``postprocess`` (thresholds, lesion filters) needs no training:
``--evaluate`` scores the artifact's weights again with the pipeline as it now is, on the
held-out volumes of ``--seed`` (written into the manifest when that is its training seed;
another seed gives volumes to tune the filters on without looking at the held-out ones).

The phantom knows where it drew each nodule (``PhantomVolume.mask``), so every voxel has a
true label. Training and evaluation read the pipeline file (``--pipeline``): volumes go
through what the node does to a series (:class:`plugin.volume.Resampling` from the written
series' geometry, then the pipeline's ``preprocess``), and the held-out volumes are scored
on what the node would report (its sliding window and :func:`plugin.segment.segment` on
the series' own voxels). Everything random derives from ``--seed`` (training and held-out
volumes from separate child streams) and torch runs deterministic kernels: the same seed,
threads and torch version give the same weights.
"""

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from monai.losses import DiceCELoss
from monai.networks.nets import UNet
from scipy import ndimage
from torch import Tensor

from plugin.demo.phantom import PhantomVolume, render_volume
from plugin.demo.series import SLICE_THICKNESS_MM, series_geometry
from plugin.demo.train import deterministic
from plugin.models.artifact import load_artifact, read_manifest, save_artifact
from plugin.pipeline import Pipeline
from plugin.postprocess import ModelOutput
from plugin.preprocess import preprocess_volume
from plugin.segment import segment
from plugin.volume import Grid, Placement, Resampling, segment_volume

PIPELINE = Path("pipelines/lung-nodule-seg-demo.yaml")
CLASSES = ["background", "nodule"]
UNET: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": len(CLASSES),
    "channels": [8, 8, 16, 32, 64, 128],
    # the first level keeps the window's full resolution: a 5 mm nodule is 2 slices and 5
    # voxels across, and a network that halved them at once missed more of the small ones
    # (benchmarks/README.md, fifteenth and sixteenth passes). The last level halves the
    # slices' plane only (a 16-slice window is 2 deep there): it sees about 100 mm across,
    # enough to tell a vessel's branch from a round nodule
    "strides": [1, 2, 2, 2, [1, 2, 2]],
    "num_res_units": 1,
}
_N_SLICES = 40  # per phantom volume: 100 mm, several windows deep
_BODY = 0.28  # windowed value above which a voxel is not air (-930 HU)
_DENSE_HU, _LUNG_HU = -450.0, -700.0  # vessels and nodules -100..100 HU, lung -850
_LUNG_AROUND_MM, _LUNG_NEAR_MM, _ALONG_MM = 15.0, 4.0, 5.0
# Where training windows are centred, and how often: on a nodule (each nodule as likely, so
# that small ones are not outnumbered by large ones' voxels) or on a hard negative (see
# Case); the rest anywhere in the body.
_ON_NODULE = 0.4
_ON_NEGATIVE = {"end": 0.2, "tube": 0.15, "vessel": 0.1, "edge": 0.05}


def read_pipeline(path: Path) -> Pipeline:
    """The pipeline's keys, checked by its schema; unlike loading it for the node, its
    artifact need not exist yet."""
    return Pipeline.model_validate(yaml.safe_load(path.read_text()))


def model_input(pipeline: Pipeline, volume: PhantomVolume) -> tuple[Tensor, Resampling, Grid]:
    """What the node feeds the model for ``volume`` written as a series: ``[1, 1, D, H, W]``,
    the resampling that put it on the model's grid, and that grid after preprocessing."""
    hu, resampling = _on_grid(pipeline, volume)
    image, grid = preprocess_volume(pipeline.preprocess, hu[None, None], resampling.target)
    return image, resampling, grid


def _on_grid(pipeline: Pipeline, volume: PhantomVolume) -> tuple[Tensor, Resampling]:
    """``volume``'s HU written as a series and resampled onto the model's grid, and that resampling."""
    resampling = Resampling(series_geometry(*volume.hu.shape), pipeline.input.orientation, pipeline.input.spacing)
    return resampling(torch.from_numpy(volume.hu).float()), resampling


@dataclass(frozen=True)
class Case:
    """A training volume on the model's grid: ``image`` ``[1, D, H, W]`` as the node feeds
    it; ``label`` ``[D, H, W]`` the voxels at least half nodule (the training target); and
    where windows are centred (``[N, 3]`` voxels each): ``nodules`` one list per nodule, and
    the hard negatives: ``negatives["vessel"]`` dense voxels amid lung, ``["tube"]`` those
    also dense 5 mm above and below (a vessel along the slices: round in every one of them),
    ``["end"]`` those dense on one side only (where such a vessel ends: a round cap, like
    half a nodule), ``["edge"]`` dense voxels next to lung but not amid it (vessels leaving
    the hilum, the chest wall)."""

    image: Tensor
    label: Tensor
    nodules: list[Tensor]
    negatives: dict[str, Tensor]


def phantom_volumes(seed: np.random.SeedSequence, n: int) -> list[PhantomVolume]:
    """``n`` volumes with 0-3 nodules each, every one with extra vessels seen end-on (the
    hard negatives), one child seed per volume."""
    volumes = []
    for child in seed.spawn(n):
        rng = np.random.default_rng(child)
        count = int(rng.integers(0, 4))
        volumes.append(render_volume(rng, _N_SLICES, count, SLICE_THICKNESS_MM, end_on_vessels=True))
    return volumes


def training_case(pipeline: Pipeline, volume: PhantomVolume) -> Case:
    """``volume`` on the model's grid, each nodule's mask resampled as the image is."""
    hu, resampling = _on_grid(pipeline, volume)
    image, _ = preprocess_volume(pipeline.preprocess, hu[None, None], resampling.target)
    label = torch.zeros(resampling.target.shape, dtype=torch.bool)
    nodules = []
    for index in range(len(volume.nodules)):
        share = resampling(torch.from_numpy(volume.mask == index + 1).float())
        label |= share >= 0.5
        nodules.append((share >= 0.5).nonzero() if bool((share >= 0.5).any()) else (share == share.max()).nonzero())

    def in_slice(mm: float) -> list[int]:
        return [1, *(max(1, round(mm / s)) for s in resampling.target.spacing[1:])]

    array = hu.numpy()
    dense = (hu > _DENSE_HU) & ~label
    amid_lung = torch.from_numpy(ndimage.uniform_filter(array, size=in_slice(_LUNG_AROUND_MM), mode="nearest") < -500)
    near_lung = torch.from_numpy(ndimage.minimum_filter(array, size=in_slice(_LUNG_NEAR_MM), mode="nearest") < _LUNG_HU)
    vessels = dense & amid_lung
    along = max(1, round(_ALONG_MM / resampling.target.spacing[0]))
    above, below = torch.zeros_like(vessels), torch.zeros_like(vessels)
    above[along:], below[:-along] = dense[:-along], dense[along:]
    negatives = {
        "vessel": vessels,
        "tube": vessels & above & below,
        "end": vessels & (above ^ below),
        "edge": dense & near_lung & ~amid_lung,
    }
    return Case(image[0].clone(), label, nodules, {kind: voxels.nonzero() for kind, voxels in negatives.items()})


def _inside_body(image: Tensor, generator: torch.Generator, tries: int = 20) -> Tensor:
    """A random voxel denser than air (the lungs included), where the model has to tell nodules
    from vessels; a random voxel after ``tries`` misses."""
    shape = torch.tensor(image.shape)
    for _ in range(tries):
        voxel = (torch.rand(3, generator=generator) * shape).long()
        if image[tuple(voxel)] > _BODY:
            break
    return voxel


def _pick(items: Tensor | list[Any], generator: torch.Generator) -> Any:
    return items[int(torch.randint(len(items), (1,), generator=generator))]


def patch(cases: list[Case], roi: tuple[int, int, int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """A window of ``roi`` voxels centred near a nodule, on a hard negative or anywhere in
    the body (see ``_ON_NODULE``), randomly flipped along the slices and the columns."""
    size = torch.tensor(roi)
    draw = float(torch.rand(1, generator=generator)) - _ON_NODULE
    nodules = [(case, voxels) for case in cases for voxels in case.nodules]
    if draw < 0 and nodules:
        case, voxels = _pick(nodules, generator)
        centre = _pick(voxels, generator) + (torch.rand(3, generator=generator) * size / 2 - size / 4).long()
    else:
        case, centre = _pick(cases, generator), None
        for kind, share in _ON_NEGATIVE.items():
            draw -= share
            if draw < 0:
                having = [case for case in cases if len(case.negatives[kind])]
                if having:
                    case = _pick(having, generator)
                    centre = _pick(case.negatives[kind], generator)
                break
        if centre is None:
            centre = _inside_body(case.image[0], generator)
    shape = torch.tensor(case.image.shape[1:])
    start = torch.clamp(centre - size // 2, torch.zeros(3, dtype=torch.long), shape - size)
    d, h, w = (int(v) for v in start)
    window = (slice(d, d + roi[0]), slice(h, h + roi[1]), slice(w, w + roi[2]))
    image, label = case.image[(slice(None), *window)], case.label[window][None].long()
    flips = [axis for axis in (1, 3) if float(torch.rand(1, generator=generator)) < 0.5]
    return (image.flip(flips), label.flip(flips)) if flips else (image, label)


def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Dice + cross-entropy of ``logits`` ``[N, K, D, H, W]`` against class indices
    ``[N, 1, D, H, W]``. Dice per window, not over the batch: a 5 mm nodule weighs as much
    as a 20 mm one in the next window, and an outline in a window without a nodule costs
    that window's whole Dice."""
    return DiceCELoss(to_onehot_y=True, softmax=True)(logits, labels)


@torch.inference_mode()
def lesions(model: torch.nn.Module, pipeline: Pipeline, volume: PhantomVolume) -> tuple[np.ndarray, np.ndarray]:
    """The lesions the node would report on ``volume`` written as a series, on its voxels:
    0 outside, 1..K inside the K lesions of its first segment; and that segment's
    probabilities there (uint8, ``round(p * 255)``)."""
    model.eval()
    image, _, grid = model_input(pipeline, volume)
    window = pipeline.input.sliding_window
    windows = () if window is None else (window.roi_size, window.overlap, window.sw_batch_size)
    logits = segment_volume(model, image, *windows)
    centre = np.array([[(n - 1) / 2 for n in image.shape[2:]]])
    placement = Placement(series_geometry(*volume.hu.shape), grid, centre)
    found = segment(pipeline.postprocess, CLASSES, ModelOutput(logits, placement), lambda slices: volume.hu[slices])
    return ndimage.label(found.masks[0], structure=np.ones((3, 3, 3)))[0], found.probabilities[0]


def evaluate(
    model: torch.nn.Module, pipeline: Pipeline, volumes: list[PhantomVolume], per_nodule: bool = False
) -> dict[str, Any]:
    """Voxel Dice over all ``volumes`` on the series' own voxels; per nodule whether a
    reported lesion overlaps it (sensitivity) and the volume of the lesions that do against
    its drawn mask (volume accuracy, for nodules of at least 5 mm); false lesions per volume,
    and how many of the volumes without nodules got any lesion (their SR would say "present").
    ``per_nodule`` also prints each nodule's drawn and measured voxels, by diameter (is an
    error a bias of one size, or noise?), and what the model gave it before the lesion
    filters: its highest probability, and the mean probability of the parts at or above the
    threshold that overlap it (is a miss the model's, or a filter's?)."""
    overlap = predicted = true = 0
    nodules: list[tuple[float, bool, float]] = []  # diameter, found, measured / drawn volume - 1
    false_lesions = 0
    negatives = flagged_negatives = 0  # volumes without nodules, and those of them with a reported lesion
    table: list[tuple[float, int, int, int, float, float]] = []  # and each nodule's probabilities, as above
    threshold = round(pipeline.postprocess.segments[0].threshold * 255)
    for number, volume in enumerate(volumes):
        reported, probabilities = lesions(model, pipeline, volume)
        parts = ndimage.label(probabilities >= threshold, structure=np.ones((3, 3, 3)))[0] if per_nodule else None
        overlap += int(((volume.mask > 0) & (reported > 0)).sum())
        predicted, true = predicted + int((reported > 0).sum()), true + int((volume.mask > 0).sum())
        sizes = np.bincount(reported.ravel())
        touched: set[int] = set()
        for index, radius in enumerate(volume.nodules[:, 3]):
            drawn = volume.mask == index + 1
            hit = set(np.unique(reported[drawn]).tolist()) - {0}
            measured = sum(int(sizes[lesion]) for lesion in hit)
            nodules.append((2 * float(radius), bool(hit), measured / max(int(drawn.sum()), 1) - 1))
            if parts is not None:
                above = np.isin(parts, np.unique(parts[drawn])) & (parts > 0)
                mean = float(probabilities[above].mean()) / 255 if above.any() else 0.0
                # a nodule may have no voxel of its own (outside the lungs or the slices)
                most = float(probabilities[drawn].max()) / 255 if drawn.any() else 0.0
                table.append((2 * float(radius), number, int(drawn.sum()), measured, most, mean))
            touched |= hit
        false_lesions += int(reported.max()) - len(touched)
        if not len(volume.nodules):
            negatives += 1
            flagged_negatives += int(reported.max() > 0)

    def sensitivity(smallest: float) -> float:
        found = [hit for diameter, hit, _ in nodules if diameter >= smallest]
        return round(sum(found) / max(len(found), 1), 4)

    if per_nodule:
        print("diameter mm  volume  drawn voxels  measured  error      max p  mean p above threshold", flush=True)
        for diameter, number, drawn_voxels, measured, most, mean in sorted(table):
            error = f"{measured / max(drawn_voxels, 1) - 1:+.1%}" if measured else "not found"
            print(
                f"{diameter:11.1f}  {number:6d}  {drawn_voxels:12d}  {measured:8d}  {error:9s} {most:5.2f}  {mean:.2f}",
                flush=True,
            )
    errors = np.array([error for diameter, _, error in nodules if diameter >= 5])
    return {
        "dice": round(2 * overlap / max(predicted + true, 1), 4),
        "sensitivity": sensitivity(0),
        "sensitivity_5mm": sensitivity(5),
        "sensitivity_10mm": sensitivity(10),
        "false_positives_per_volume": round(false_lesions / len(volumes), 3),
        "volumes_without_nodules": negatives,
        "volumes_without_nodules_with_a_lesion": flagged_negatives,
        # a missed nodule counts as measured 0: 100 % too small
        "volume_within_15pct_5mm": round(float((np.abs(errors) <= 0.15).mean()), 4) if len(errors) else None,
        "median_volume_error_5mm": round(float(np.median(errors)), 4) if len(errors) else None,
        "n_heldout": len(volumes),
        "n_nodules": len(nodules),
        "n_nodules_5mm": len(errors),
        "n_nodules_10mm": sum(diameter >= 10 for diameter, _, _ in nodules),
        "heldout": f"phantom volumes of {_N_SLICES} slices with 0-3 nodules 4-24 mm and 6-12 vessels seen end-on, "
        "scored on the series' own voxels against the phantom's masks, lesions as the pipeline reports them; "
        "a nodule's volume is that of the lesions overlapping it, the error relative to its drawn mask's",
    }


def train(
    out_dir: Path,
    pipeline_path: Path = PIPELINE,
    seed: int = 0,
    n_train: int = 60,
    n_val: int = 20,
    steps: int = 8000,
    batch_size: int = 2,
) -> dict[str, Any]:
    """Train, evaluate on held-out volumes, save the artifact; returns its manifest."""
    with deterministic():
        return _train(out_dir, pipeline_path, seed, n_train, n_val, steps, batch_size)


def _train(
    out_dir: Path, pipeline_path: Path, seed: int, n_train: int, n_val: int, steps: int, batch_size: int
) -> dict[str, Any]:
    started = time.monotonic()
    pipeline = read_pipeline(pipeline_path)
    if pipeline.input.sliding_window is None:
        raise ValueError(f"{pipeline_path}: training takes windows of input.sliding_window.roi_size; set it")
    roi = pipeline.input.sliding_window.roi_size
    torch.manual_seed(seed)
    train_seed, val_seed = np.random.SeedSequence(seed).spawn(2)
    training = [training_case(pipeline, volume) for volume in phantom_volumes(train_seed, n_train)]
    heldout = phantom_volumes(val_seed, n_val)
    print(f"data: {n_train} train + {n_val} held-out volumes in {time.monotonic() - started:.0f}s", flush=True)

    model = UNet(**UNET)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    total = 0.0
    for step in range(1, steps + 1):
        images, labels = zip(*(patch(training, roi, generator) for _ in range(batch_size)), strict=True)
        loss = segmentation_loss(model(torch.stack(images)), torch.stack(labels))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        total += loss.item()
        if step % 50 == 0:
            print(f"step {step}/{steps}  loss {total / 50:.4f}  {time.monotonic() - started:.0f}s", flush=True)
            total = 0.0

    evaluation = evaluate(model, pipeline, heldout)
    depth, height, width = roi
    manifest = {
        "name": "lung-nodule-seg-demo",
        "task": "segmentation",
        "architecture": {"id": "monai.networks.nets.UNet", "params": UNET},
        "input": {"kind": "volume", "channels": 1, "depth": depth, "height": height, "width": width},
        "classes": CLASSES,
        "precision": "fp32",
        "training": {
            "seed": seed,
            "n_train": n_train,
            "steps": steps,
            "batch_size": batch_size,
            "command": f"python -m plugin.demo.train_seg --out {out_dir} --pipeline {pipeline_path} "
            f"--seed {seed} --n-train {n_train} --n-val {n_val} --steps {steps} --batch-size {batch_size} "
            f"--threads {torch.get_num_threads()}",
        },
        "evaluation": evaluation,
    }
    save_artifact(out_dir, model, manifest)
    print(f"held-out {evaluation} in {time.monotonic() - started:.0f}s; saved {out_dir}", flush=True)
    return manifest


def rescore(directory: Path, pipeline_path: Path, seed: int, n_val: int, per_nodule: bool = False) -> dict[str, Any]:
    """The evaluation of the artifact in ``directory`` on ``seed``'s ``n_val`` held-out
    volumes with the pipeline as it now is; recorded in the manifest when ``seed`` is the one
    the artifact was trained with (its own held-out volumes)."""
    manifest = read_manifest(directory)
    model = load_artifact(directory, torch.device("cpu"), manifest).module
    heldout = phantom_volumes(np.random.SeedSequence(seed).spawn(2)[1], n_val)
    evaluation = evaluate(model, read_pipeline(pipeline_path), heldout, per_nodule)
    trained = manifest.get("training", {})  # none in an artifact that radpipe optimize wrote
    if "seed" in trained and (seed, n_val) == (trained["seed"], manifest["evaluation"]["n_heldout"]):
        kept = {key: value for key, value in manifest.items() if key not in ("format", "versions", "files")}
        save_artifact(directory, model, {**kept, "evaluation": evaluation})
        print(f"recorded in {directory / 'manifest.json'}", flush=True)
    return evaluation


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugin.demo.train_seg", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write (or to --evaluate)")
    parser.add_argument("--evaluate", action="store_true", help="score the artifact in --out; do not train")
    parser.add_argument("--pipeline", type=Path, default=PIPELINE, help="the pipeline the model is for")
    parser.add_argument(
        "--per-nodule",
        action="store_true",
        help="with --evaluate: each nodule's drawn and measured volume, and its probabilities",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=60, help="training volumes")
    parser.add_argument("--n-val", type=int, default=20, help="held-out volumes")
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the weights depend on it; 1 is as fast on 2 cores)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.evaluate:
        print(json.dumps(rescore(args.out, args.pipeline, args.seed, args.n_val, args.per_nodule), indent=2))
        return 0
    train(args.out, args.pipeline, args.seed, args.n_train, args.n_val, args.steps, args.batch_size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
