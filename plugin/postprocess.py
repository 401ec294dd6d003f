"""Postprocessing: model output for every slice -> one probability and verdict per finding.

Contract (the extension point): given the pipeline's ``postprocess`` block, the model's
class names and logits ``[N, K]`` for the N images of a series (in anatomical order),
return one :class:`Finding` per configured finding. Raises ValueError when a finding
names a class the model does not have (the loader checks this too).
"""

from dataclasses import dataclass

import torch

from plugin.pipeline import FindingSpec, Postprocess


@dataclass(frozen=True)
class Finding:
    spec: FindingSpec
    probability: float
    present: bool
    key_slice: int  # index (in anatomical order) of the image with the highest probability


def _aggregate(postprocess: Postprocess, per_slice: torch.Tensor) -> float:
    if postprocess.aggregate == "mean":
        return float(per_slice.mean())
    if postprocess.aggregate == "top_k_mean":
        return float(per_slice.topk(min(postprocess.top_k, len(per_slice))).values.mean())
    return float(per_slice.max())


def findings(postprocess: Postprocess, classes: list[str], logits: torch.Tensor) -> list[Finding]:
    logits = logits.float()
    probabilities = torch.softmax(logits, dim=1) if postprocess.activation == "softmax" else torch.sigmoid(logits)
    result = []
    for spec in postprocess.findings:
        if spec.label not in classes:
            raise ValueError(f"finding {spec.label!r} is not a class of the model {classes}")
        per_slice = probabilities[:, classes.index(spec.label)]
        probability = _aggregate(postprocess, per_slice)
        result.append(Finding(spec, probability, probability >= spec.threshold, int(torch.argmax(per_slice))))
    return result
