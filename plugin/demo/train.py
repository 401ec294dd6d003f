"""Train the demo lung-nodule model on phantom slices, reproducibly, with one command.

    python -m plugin.demo.train --out pipelines/models/lung-nodule-demo

Everything random derives from ``--seed``: training and held-out slices come from
separate child streams of one ``numpy.random.SeedSequence``, torch is seeded and runs
deterministic kernels, so the same seed on the same torch version gives the same weights.
The model sees exactly what the served pipeline gives it, because the slices go through
the pipeline's own preprocessing steps.
"""

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from plugin.accel.data import phantom_split
from plugin.models.architectures import DemoCNN
from plugin.models.artifact import save_artifact
from plugin.preprocess import PreprocessStep, Resize, Window

# The demo pipeline's preprocessing (lung window, 128x128). It must stay identical to the
# ``preprocess:`` list of pipelines/lung-nodule-demo.yaml; the single place to change it.
PREPROCESS = [
    PreprocessStep(window=Window(center=-600, width=1500)),
    PreprocessStep(resize=Resize(height=128, width=128)),
]
CLASSES = ["normal", "nodule"]
CHANNELS = (16, 32, 64, 128)
INPUT = {"channels": 1, "height": 128, "width": 128, "dtype": "float32"}
# Phantom slices per child seed (and per task). The committed model was trained with 100:
# another value gives other slices for the same --seed.
_CHUNK = 100


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic, ties counted as half."""
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    ranks[order] = np.repeat(first + (counts + 1) / 2, counts)
    positive = labels.astype(bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both classes")
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random left-right flips and small shifts: the label does not depend on either."""
    flip = torch.rand(len(images), generator=generator) < 0.5
    images = torch.where(flip[:, None, None, None], images.flip(-1), images)
    dy, dx = (int(v) for v in torch.randint(-6, 7, (2,), generator=generator))
    return images.roll((dy, dx), dims=(-2, -1))


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, batch: int = 256) -> np.ndarray:
    """Nodule probability (softmax) for every image."""
    model.eval()
    probs = [F.softmax(model(images[i : i + batch]), dim=1)[:, 1] for i in range(0, len(images), batch)]
    return torch.cat(probs).numpy()


@contextmanager
def deterministic() -> Iterator[None]:
    """Deterministic torch kernels while training (the same seed gives the same weights),
    the caller's setting restored after."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


def train(
    out_dir: Path,
    seed: int = 0,
    n_train: int = 3000,
    n_val: int = 1000,
    epochs: int = 10,
    batch_size: int = 64,
    workers: int | None = None,
) -> dict[str, Any]:
    """Train, evaluate on held-out slices, save the artifact; returns its manifest."""
    with deterministic():
        return _train(out_dir, seed, n_train, n_val, epochs, batch_size, workers or os.cpu_count() or 1)


def _train(
    out_dir: Path, seed: int, n_train: int, n_val: int, epochs: int, batch_size: int, workers: int
) -> dict[str, Any]:
    started = time.monotonic()
    torch.manual_seed(seed)
    train_seed, val_seed = np.random.SeedSequence(seed).spawn(2)
    training = phantom_split(PREPROCESS, train_seed, n_train, CLASSES, workers, chunk=_CHUNK)
    validation = phantom_split(PREPROCESS, val_seed, n_val, CLASSES, workers, chunk=_CHUNK)
    x_train, y_train = training.images, training.labels
    x_val, y_val = validation.images, validation.labels
    print(f"data: {n_train} train + {n_val} held-out slices in {time.monotonic() - started:.0f}s", flush=True)

    model = DemoCNN(in_channels=1, num_classes=len(CLASSES), channels=CHANNELS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    steps_per_epoch = (n_train + batch_size - 1) // batch_size
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=epochs * steps_per_epoch)
    generator = torch.Generator().manual_seed(seed)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(n_train, generator=generator)
        total = 0.0
        for start in range(0, n_train, batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(_augment(x_train[index], generator)), y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(index)
        val_auc = auc(predict(model, x_val), y_val.numpy())
        elapsed = time.monotonic() - started
        print(f"epoch {epoch}/{epochs}  loss {total / n_train:.4f}  AUC {val_auc:.4f}  {elapsed:.0f}s", flush=True)

    manifest = {
        "name": "lung-nodule-demo",
        "architecture": {
            "id": "demo-cnn",
            "params": {"in_channels": 1, "num_classes": len(CLASSES), "channels": list(CHANNELS)},
        },
        "input": INPUT,
        "classes": CLASSES,
        "precision": "fp32",
        "training": {
            "seed": seed,
            "n_train": n_train,
            "epochs": epochs,
            "command": f"python -m plugin.demo.train --out {out_dir} --seed {seed} --n-train {n_train} "
            f"--n-val {n_val} --epochs {epochs}",
        },
        "evaluation": {"auc": round(val_auc, 4), "n_heldout": n_val, "heldout": "phantom slices, 50% positive"},
    }
    save_artifact(out_dir, model, manifest)
    print(f"held-out AUC {val_auc:.4f} in {time.monotonic() - started:.0f}s; saved {out_dir}", flush=True)
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugin.demo.train", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-train", type=int, default=3000)
    parser.add_argument("--n-val", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--workers", type=int, default=None, help="processes generating slices (default: all CPUs)")
    args = parser.parse_args(argv)
    train(args.out, args.seed, args.n_train, args.n_val, args.epochs, workers=args.workers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
