"""The accuracy gate: every variant is scored on the same held-out data as the original,
and a variant that loses more than the recipe allows is not written.

A classifier is scored by AUC on held-out images; a segmentation model by voxel Dice on
held-out phantom volumes, each taken through what the node does to a series (resampling,
preprocessing, sliding windows, :func:`plugin.segment.segment`) and compared with the
phantom's truth on the series' own voxels: the figure a user of the node would see.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
import torch
from torch import Tensor, nn

from plugin.accel.data import Split
from plugin.accel.progress import progress
from plugin.accel.recipe import Accept
from plugin.demo.phantom import PhantomVolume
from plugin.demo.train import auc
from plugin.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scores:
    """The metric per finding (AUC one-vs-rest on that class's probability) or segment
    (Dice), their mean, and figures reported beside them (``details``)."""

    per_class: dict[str, float]
    metric: str = "AUC"
    details: dict[str, float] = field(default_factory=dict)

    @property
    def overall(self) -> float:
        return float(np.mean(list(self.per_class.values())))

    @property
    def key(self) -> str:
        return self.metric.lower()

    def as_dict(self) -> dict[str, object]:
        per_class = {k: round(v, 4) for k, v in self.per_class.items()}
        return {self.key: round(self.overall, 4), f"per_class_{self.key}": per_class, **self.details}


class Scorer(Protocol):
    """Scores a model on a fixed held-out set (``description`` says which)."""

    @property
    def description(self) -> str: ...

    def __call__(self, model: nn.Module, what: str) -> Scores: ...


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
class HeldoutImages:
    """A classifier's held-out images, scored by AUC per finding."""

    images: Split
    classes: list[str]
    findings: list[str]
    activation: str
    batch: int

    @property
    def description(self) -> str:
        return self.images.description

    def __call__(self, model: nn.Module, what: str) -> Scores:
        return evaluate(model, self.images, self.classes, self.findings, self.activation, self.batch, what)


@dataclass(frozen=True)
class HeldoutVolumes:
    """A segmentation model's held-out phantom volumes, scored by the voxel Dice of the
    lesions the pipeline reports (its first segment) against the phantom's masks."""

    pipeline: Pipeline
    volumes: list[PhantomVolume]
    description: str

    def __call__(self, model: nn.Module, what: str) -> Scores:
        from plugin.demo.train_seg import evaluate as evaluate_volumes

        log.info("%s on %d volumes", what, len(self.volumes))
        result = evaluate_volumes(model, self.pipeline, self.volumes)
        details = {k: v for k, v in result.items() if k != "dice" and isinstance(v, float)}
        return Scores({self.pipeline.postprocess.segments[0].label: result["dice"]}, "Dice", details)


@dataclass(frozen=True)
class Verdict:
    variant: str
    scores: Scores
    drop: float
    per_class_drop: dict[str, float]
    failures: list[str]

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, object]:
        key = self.scores.key
        return {
            **self.scores.as_dict(),
            f"{key}_drop": round(self.drop, 4),
            f"per_class_{key}_drop": {k: round(v, 4) for k, v in self.per_class_drop.items()},
            "passed": self.passed,
        }


def gate(variant: str, baseline: Scores, scores: Scores, accept: Accept) -> Verdict:
    """Compare a variant with the original; ``failures`` says which limit it broke, with figures."""
    drop = baseline.overall - scores.overall
    per_class = {k: baseline.per_class[k] - scores.per_class[k] for k in baseline.per_class}
    metric = baseline.metric
    limit, name = (accept.max_dice_drop, "max_dice_drop") if metric == "Dice" else (accept.max_auc_drop, "max_auc_drop")
    failures = []
    if drop > limit:
        failures.append(
            f"{variant}: {metric} {scores.overall:.4f} vs original {baseline.overall:.4f}: "
            f"drop {drop:.4f} > {name} {limit}"
        )
    for finding, value in per_class.items():
        if metric == "AUC" and value > accept.max_per_class_auc_drop:
            failures.append(
                f"{variant}: {finding} AUC {scores.per_class[finding]:.4f} vs original "
                f"{baseline.per_class[finding]:.4f}: drop {value:.4f} > max_per_class_auc_drop "
                f"{accept.max_per_class_auc_drop}"
            )
    return Verdict(variant, scores, drop, per_class, failures)
