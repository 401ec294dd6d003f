"""Postprocessing: the model's output for a series -> one probability and verdict per finding.

Contract (the extension point): given the pipeline's ``postprocess`` block, the model's
class names and the job's :class:`ModelOutput`, return one :class:`Finding` per configured
finding. Raises ValueError when a finding names a class the model does not have (the
loader checks this too).
"""

from dataclasses import dataclass

import torch

from plugin.pipeline import FindingSpec, Postprocess
from plugin.volume import Placement


@dataclass(eq=False)
class ModelOutput:
    """What the runner hands postprocessing for one job.

    ``logits``: the model's output. For slices, class logits ``[N, K]``, one row per image
    in anatomical order. For a volume, class logits with one row per sliding window, or a
    single row for the whole volume; a per-voxel model's output is ``[1, K, D, H, W]`` on
    ``volume.grid``, which ``volume.source`` maps back onto the series' slices.
    ``volume``: where a volume's output lies in the patient; None for slices.
    """

    logits: torch.Tensor
    volume: Placement | None = None

    def take_logits(self) -> torch.Tensor:
        """The logits, no longer held here (an empty tensor takes their place): a per-voxel
        model's are 0.5 GB for a 500-slice series, and :func:`plugin.segment.segment` frees
        them once it has their probabilities, while its caller still holds this object."""
        logits, self.logits = self.logits, torch.empty(0)
        return logits


@dataclass(frozen=True)
class Finding:
    spec: FindingSpec
    probability: float
    present: bool
    # index (in anatomical order) of the image with the highest probability; for a volume,
    # of the slice nearest to the centre of the window with the highest probability
    key_slice: int


def _aggregate(postprocess: Postprocess, per_row: torch.Tensor) -> float:
    if postprocess.aggregate == "mean":
        return float(per_row.mean())
    if postprocess.aggregate == "top_k_mean":
        return float(per_row.topk(min(postprocess.top_k, len(per_row))).values.mean())
    return float(per_row.max())


def findings(postprocess: Postprocess, classes: list[str], output: ModelOutput) -> list[Finding]:
    logits = output.logits.float()
    if logits.ndim != 2:
        raise ValueError(f"the model gave output of shape {list(logits.shape)}; classification needs [N, classes]")
    probabilities = torch.softmax(logits, dim=1) if postprocess.activation == "softmax" else torch.sigmoid(logits)
    result = []
    for spec in postprocess.findings:
        if spec.label not in classes:
            raise ValueError(f"finding {spec.label!r} is not a class of the model {classes}")
        per_row = probabilities[:, classes.index(spec.label)]
        probability = _aggregate(postprocess, per_row)
        best = int(torch.argmax(per_row))
        key = best if output.volume is None else output.volume.source_slice(best)
        result.append(Finding(spec, probability, probability >= spec.threshold, key))
    return result
