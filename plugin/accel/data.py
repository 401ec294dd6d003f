"""Images for fine-tuning, calibration and the accuracy gate, preprocessed exactly as the
pipeline preprocesses what the node receives.

Two sources: the demo phantom generator (``phantom``), or a folder of DICOM files with a
labels CSV (``file,label[,split]``: ``file`` relative to the folder, ``label`` a class
name of the model, ``split`` optionally ``train`` or ``heldout``). Without a split
column, whole series go to one side (by a hash of the SeriesInstanceUID), so no slice of a
held-out series is ever trained on.
"""

import csv
import hashlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
import torch
from torch import Tensor

from plugin.accel.recipe import Calibration, Data
from plugin.demo.phantom import make_slices
from plugin.loader import modality_frames
from plugin.preprocess import PreprocessStep, preprocess

_CHUNK = 50  # phantom slices per task: a 512x512 HU slice is 0.5 MB


@dataclass(frozen=True)
class Split:
    """Preprocessed images ``[N, C, H, W]`` and class indices ``[N]``."""

    images: Tensor
    labels: Tensor
    description: str

    def __len__(self) -> int:
        return len(self.labels)


@dataclass(frozen=True)
class DataSets:
    train: Split
    heldout: Split
    calibration: Split


def _phantom_chunk(
    steps: list[PreprocessStep], seed: np.random.SeedSequence, n: int, classes: list[str]
) -> tuple[Tensor, Tensor]:
    torch.set_num_threads(1)
    hu, labels = make_slices(np.random.default_rng(seed), n)
    images = preprocess(steps, torch.from_numpy(hu.astype(np.float32))[:, None])
    # the phantom's label 1 is "nodule": map it onto the model's class order
    positive = classes.index("nodule") if "nodule" in classes else 1
    return images, torch.from_numpy(np.where(labels == 1, positive, 1 - positive).astype(np.int64))


def phantom_split(
    steps: list[PreprocessStep],
    seed: np.random.SeedSequence,
    n: int,
    classes: list[str],
    workers: int,
    chunk: int = _CHUNK,
) -> Split:
    """``n`` phantom slices, half positive; the same for any number of ``workers``. Each
    ``chunk`` of slices has its own child seed, so the chunk size is part of what a seed means."""
    sizes = [min(chunk, n - start) for start in range(0, n, chunk)]
    seeds = seed.spawn(len(sizes))
    if workers <= 1 or len(sizes) == 1:
        parts = [_phantom_chunk(steps, s, k, classes) for s, k in zip(seeds, sizes, strict=True)]
    else:
        # spawn, not fork: a forked child of a process that already ran torch's OpenMP can hang
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            parts = list(pool.map(_phantom_chunk, [steps] * len(sizes), seeds, sizes, [classes] * len(sizes)))
    return Split(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), f"{n} phantom slices")


def _read_labels(folder: Path, labels_csv: Path, classes: list[str]) -> list[tuple[Path, int, str | None]]:
    rows = []
    with labels_csv.open(newline="") as f:
        for line, row in enumerate(csv.DictReader(f), start=2):
            if row.get("label") not in classes:
                raise ValueError(
                    f"{labels_csv}:{line}: label {row.get('label')!r} is not a class of the model {classes}"
                )
            split = row.get("split") or None
            if split not in (None, "train", "heldout"):
                raise ValueError(f"{labels_csv}:{line}: split must be train or heldout, got {split!r}")
            rows.append((folder / row["file"], classes.index(row["label"]), split))
    return rows


def _held_out(path: Path) -> bool:
    """One in five series is held out, chosen by a hash of its SeriesInstanceUID."""
    uid = str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)
    return hashlib.sha256(uid.encode()).digest()[0] % 5 == 0


def folder_splits(
    steps: list[PreprocessStep], folder: Path, labels_csv: Path, classes: list[str]
) -> tuple[Split, Split]:
    """Train and held-out images of a labelled DICOM folder (first frame of each file)."""
    sides: dict[str, tuple[list[Tensor], list[int]]] = {"train": ([], []), "heldout": ([], [])}
    for path, label, split in _read_labels(folder, labels_csv, classes):
        side = split or ("heldout" if _held_out(path) else "train")
        frames = torch.from_numpy(modality_frames(pydicom.dcmread(path)))[:1, None]
        sides[side][0].append(preprocess(steps, frames))
        sides[side][1].append(label)
    result = []
    for side, (images, labels) in sides.items():
        if not images:
            raise ValueError(f"{labels_csv}: no {side} images (give a split column or more series)")
        result.append(Split(torch.cat(images), torch.tensor(labels), f"{len(labels)} {side} images of {folder}"))
    return result[0], result[1]


def calibration_split(steps: list[PreprocessStep], calibration: Calibration, train: Split) -> Split:
    """The images static quantization calibrates on: the first ``samples`` training images,
    or the first frames of the DICOM files in a folder (unlabelled)."""
    if calibration.source != "training":
        return _folder_calibration(steps, calibration)
    n = min(calibration.samples, len(train))
    return Split(train.images[:n], train.labels[:n], f"first {n} training images ({train.description})")


def _folder_calibration(steps: list[PreprocessStep], calibration: Calibration) -> Split:
    folder = Path(calibration.source)
    files = sorted(p for p in folder.rglob("*") if p.is_file())[: calibration.samples]
    images = [preprocess(steps, torch.from_numpy(modality_frames(pydicom.dcmread(p)))[:1, None]) for p in files]
    if not images:
        raise ValueError(f"calibration.source: no DICOM files in {folder}")
    return Split(torch.cat(images), torch.zeros(len(images), dtype=torch.int64), f"{len(images)} files of {folder}")


def load_data(
    steps: list[PreprocessStep],
    data: Data,
    calibration: Calibration,
    classes: list[str],
    base: Path,
    workers: int | None = None,
) -> DataSets:
    """Every data set a recipe needs. Relative folders are taken from ``base`` (the
    pipeline file's folder)."""
    workers = workers if workers is not None else (os.cpu_count() or 1)
    if data.source == "phantom":
        train = phantom_stream(steps, data, 0, data.train_samples, classes, workers)
        heldout = phantom_stream(steps, data, 1, data.heldout_samples, classes, workers)
    else:
        train, heldout = _folder(steps, data, classes, base)
    return DataSets(train, heldout, calibration_split(steps, _resolved(calibration, base), train))


def phantom_stream(
    steps: list[PreprocessStep], data: Data, stream: int, count: int, classes: list[str], workers: int
) -> Split:
    """The first ``count`` slices of a recipe's phantom stream (0: training, 1: held-out),
    described as the whole stream. Only the chunks they lie in are made: each chunk has its
    own child seed, so a prefix is the same images however long the stream."""
    total = data.train_samples if stream == 0 else data.heldout_samples
    made = min(total, -(-count // _CHUNK) * _CHUNK)
    seed = np.random.SeedSequence(data.seed).spawn(2)[stream]
    split = phantom_split(steps, seed, made, classes, workers)
    described = f"{total} phantom slices (seed {data.seed}, stream {stream})"
    return Split(split.images[:count], split.labels[:count], described)


def _folder(steps: list[PreprocessStep], data: Data, classes: list[str], base: Path) -> tuple[Split, Split]:
    if data.labels is None:
        raise ValueError("data.labels: a DICOM folder needs a labels CSV")
    return folder_splits(steps, base / data.source, base / data.labels, classes)


def _resolved(calibration: Calibration, base: Path) -> Calibration:
    """A calibration folder taken from ``base``."""
    if calibration.source == "training":
        return calibration
    return Calibration(source=str(base / calibration.source), samples=calibration.samples)


def calibration_data(
    steps: list[PreprocessStep],
    data: Data,
    calibration: Calibration,
    classes: list[str],
    base: Path,
    workers: int | None = None,
) -> Split:
    """The images ``radpipe optimize`` calibrates a recipe's int8 on (:func:`load_data`'s
    ``calibration``), made without the rest: what ``radpipe bench`` calibrates every int8
    baseline on, so that each is judged on what the pipeline feeds the model."""
    calibration = _resolved(calibration, base)
    if calibration.source != "training":
        return _folder_calibration(steps, calibration)
    if data.source == "phantom":
        workers = workers if workers is not None else (os.cpu_count() or 1)
        n = min(calibration.samples, data.train_samples)
        return calibration_split(steps, calibration, phantom_stream(steps, data, 0, n, classes, workers))
    return calibration_split(steps, calibration, _folder(steps, data, classes, base)[0])
