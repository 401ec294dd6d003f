"""Phantom volumes for a segmentation model's recipe: windows to fine-tune (and calibrate)
on, and held-out volumes for the Dice gate.

Both come from the demo generator as plugin/demo/train_seg.py makes them, so what the
optimized model is tuned on is what the original was trained on: volumes written as a
series, resampled and preprocessed as the pipeline says, windows of its sliding window's
size, centred where train_seg centres them (nodules, vessels, anywhere in the body). The
held-out volumes stay whole: the gate scores them as the node scores a series.
"""

from dataclasses import dataclass

import numpy as np
import torch

from plugin.accel.data import Split
from plugin.accel.recipe import Calibration, Data
from plugin.demo.phantom import PhantomVolume
from plugin.demo.train_seg import patch, phantom_volumes, training_case
from plugin.pipeline import Pipeline


@dataclass(frozen=True)
class VolumeSets:
    """``train``: windows ``[N, C, D, H, W]`` with per-voxel class indices ``[N, D, H, W]``;
    ``calibration``: the first of them; ``heldout``: whole volumes with their truth."""

    train: Split
    calibration: Split
    heldout: list[PhantomVolume]
    description: str  # of the held-out volumes


def training_windows(pipeline: Pipeline, volumes: list[PhantomVolume], n: int, seed: int) -> Split:
    """``n`` windows of the pipeline's ``sliding_window.roi_size`` cut from ``volumes``."""
    window = pipeline.input.sliding_window
    if window is None:
        raise ValueError("input.sliding_window: fine-tuning a segmentation model takes windows of its roi_size; set it")
    cases = [training_case(pipeline, volume) for volume in volumes]
    generator = torch.Generator().manual_seed(seed)
    # each window copied into its place at once: 4,096 windows are 2.4 GB of images, and a
    # list of them stacked afterwards held them twice (labels as int64 would be 4.8 GB more)
    images = torch.empty((n, cases[0].image.shape[0], *window.roi_size), dtype=cases[0].image.dtype)
    labels = torch.empty((n, *window.roi_size), dtype=torch.uint8)
    for index in range(n):
        image, label = patch(cases, window.roi_size, generator)
        images[index], labels[index] = image, label[0]
    described = f"{n} windows {'x'.join(map(str, window.roi_size))} of {len(volumes)} phantom volumes"
    return Split(images, labels, described)


def _streams(data: Data) -> tuple[np.random.SeedSequence, np.random.SeedSequence]:
    """The seed's training and held-out streams."""
    train, heldout = np.random.SeedSequence(data.seed).spawn(2)
    return train, heldout


def heldout_volumes(data: Data) -> tuple[list[PhantomVolume], str]:
    """The held-out volumes and their description: the same for ``optimize`` and ``bench``."""
    volumes = phantom_volumes(_streams(data)[1], data.heldout_volumes)
    return volumes, f"{len(volumes)} phantom volumes (seed {data.seed}, stream 1)"


def load_volumes(pipeline: Pipeline, data: Data, calibration: Calibration) -> VolumeSets:
    """Every data set a segmentation recipe needs."""
    volumes = phantom_volumes(_streams(data)[0], data.train_volumes)
    train = training_windows(pipeline, volumes, data.train_windows, data.seed)
    train = Split(train.images, train.labels, f"{train.description} (seed {data.seed}, stream 0)")
    n = min(calibration.samples, len(train))
    first = Split(train.images[:n], train.labels[:n], f"first {n} training windows ({train.description})")
    return VolumeSets(train, first, *heldout_volumes(data))
