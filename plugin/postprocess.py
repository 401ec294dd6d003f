"""Postprocessing: model output for every slice -> one probability and verdict per finding.

Contract (the extension point): given the pipeline's ``postprocess`` block, the model's
class names and logits ``[N, K]`` for the N slices of a series (in anatomical order),
return one :class:`Finding` per configured finding. Raises ValueError when a finding
names a class the model does not have.
"""

from dataclasses import dataclass

import torch

from plugin.pipeline import FindingSpec, Postprocess


@dataclass(frozen=True)
class Finding:
    spec: FindingSpec
    probability: float
    present: bool
    key_slice: int  # index (in anatomical order) of the slice with the highest probability


def findings(postprocess: Postprocess, classes: list[str], logits: torch.Tensor) -> list[Finding]:
    probabilities = torch.softmax(logits.float(), dim=1)
    result = []
    for spec in postprocess.findings:
        if spec.label not in classes:
            raise ValueError(f"finding {spec.label!r} is not a class of the model {classes}")
        per_slice = probabilities[:, classes.index(spec.label)]
        key_slice = int(torch.argmax(per_slice))
        probability = float(per_slice[key_slice])  # aggregate: max
        result.append(Finding(spec, probability, probability >= spec.threshold, key_slice))
    return result
