"""The accuracy gate: every variant is scored on the same held-out images as the
original, and a variant that loses more AUC than the recipe allows is not written."""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from plugin.accel.data import Split
from plugin.accel.progress import progress
from plugin.accel.recipe import Accept
from plugin.demo.train import auc


@dataclass(frozen=True)
class Scores:
    """AUC per finding (one-vs-rest on that class's probability) and their mean."""

    per_class: dict[str, float]

    @property
    def overall(self) -> float:
        return float(np.mean(list(self.per_class.values())))

    def as_dict(self) -> dict[str, object]:
        return {"auc": round(self.overall, 4), "per_class_auc": {k: round(v, 4) for k, v in self.per_class.items()}}


def probabilities(
    model: Callable[[Tensor], Tensor], images: Tensor, batch: int, activation: str, what: str = "evaluating"
) -> np.ndarray:
    """Class probabilities ``[N, K]`` for every image, in batches."""
    chunks = list(images.split(batch))
    outputs = []
    with torch.inference_mode():
        for chunk in progress(chunks, len(chunks), what):
            logits = model(chunk).float()
            outputs.append(torch.softmax(logits, 1) if activation == "softmax" else torch.sigmoid(logits))
    return torch.cat(outputs).numpy()


def score(probs: np.ndarray, labels: Tensor, classes: list[str], findings: list[str]) -> Scores:
    truth = labels.numpy()
    return Scores({name: auc(probs[:, classes.index(name)], truth == classes.index(name)) for name in findings})


def evaluate(
    model: Callable[[Tensor], Tensor],
    heldout: Split,
    classes: list[str],
    findings: list[str],
    activation: str = "softmax",
    batch: int = 32,
    what: str = "evaluating",
) -> Scores:
    return score(probabilities(model, heldout.images, batch, activation, what), heldout.labels, classes, findings)


@dataclass(frozen=True)
class Verdict:
    variant: str
    scores: Scores
    auc_drop: float
    per_class_drop: dict[str, float]
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, object]:
        return {
            **self.scores.as_dict(),
            "auc_drop": round(self.auc_drop, 4),
            "per_class_auc_drop": {k: round(v, 4) for k, v in self.per_class_drop.items()},
            "passed": self.passed,
        }


def gate(variant: str, baseline: Scores, scores: Scores, accept: Accept) -> Verdict:
    """Compare a variant with the original; ``failures`` says which limit it broke, with figures."""
    drop = baseline.overall - scores.overall
    per_class = {k: baseline.per_class[k] - scores.per_class[k] for k in baseline.per_class}
    failures = []
    if drop > accept.max_auc_drop:
        failures.append(
            f"{variant}: AUC {scores.overall:.4f} vs original {baseline.overall:.4f}: "
            f"drop {drop:.4f} > max_auc_drop {accept.max_auc_drop}"
        )
    for name, value in per_class.items():
        if value > accept.max_per_class_auc_drop:
            failures.append(
                f"{variant}: {name} AUC {scores.per_class[name]:.4f} vs original {baseline.per_class[name]:.4f}: "
                f"drop {value:.4f} > max_per_class_auc_drop {accept.max_per_class_auc_drop}"
            )
    return Verdict(variant, scores, drop, per_class, failures)
