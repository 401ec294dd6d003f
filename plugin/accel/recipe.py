"""The optimization recipe: what ``radpipe optimize`` does to a pipeline's model.

It sits in the pipeline YAML under ``model.optimize`` (or in a file of its own, passed
with ``--recipe``), so the model, the preprocessing its data goes through and the way to
make it small travel together. Every key, with its default:

```yaml
optimize:
  prune:                        # structured: whole channels go (torch-pruning's dependency graph)
    ratio: 0.5                  # fraction of each prunable layer's channels to remove, 0 .. 0.95
    importance: l1              # l1 | l2 (weight magnitude), taylor (|weight x gradient|),
                                # slimming (BN scale, with L1 sparsity on it while fine-tuning)
    round_to: 8                 # keep channel counts multiples of this (SIMD-friendly)
    iterative_steps: 4          # prune in this many steps, fine-tuning after each
    finetune_epochs: 1          # epochs of fine-tuning after each step (0: none)
    sparsity: 0.0001            # slimming only: weight of the L1 penalty on BN scales
  quantize:
    cpu: int8_static            # int8_static (PTQ) | int8_qat (fake-quant fine-tuning) | int8_dynamic | none
    gpu: bf16                   # bf16 | fp16 | fp32: precision + channels_last + torch.compile on CUDA
    buckets: [1, 8, 32]         # batch sizes lowered/compiled at load; other sizes are padded up
    qat_epochs: 1               # int8_qat only
  calibration:
    source: training            # training (a slice of the training data) or a folder of DICOM files
    samples: 256                # images the activation observers see
  data:                         # fine-tuning and held-out evaluation data
    source: phantom             # phantom (the demo generator) or a folder of DICOM files ...
    labels: null                # ... with a labels CSV: file,label[,split] (split: train | heldout)
    train_samples: 2000         # classification: phantom slices
    heldout_samples: 1000
    train_volumes: 8            # segmentation: phantom volumes to cut training windows from ...
    train_windows: 256          # ... this many windows of the pipeline's sliding_window.roi_size
    heldout_volumes: 4          # ... and volumes scored as the node scores a series
    seed: 1                     # phantom: the demo models were trained on seed 0's streams
  finetune: {batch_size: 64, lr: 0.001}
  accept:                       # the accuracy gate, against the original on the same held-out set
    max_auc_drop: 0.01          # classification: AUC, mean over findings ...
    max_per_class_auc_drop: 0.02  # ... and per finding
    max_dice_drop: 0.02         # segmentation: voxel Dice of the reported lesions
```

Keys that belong to one task (:data:`TASK_KEYS`) are refused on a recipe for the other
(:func:`task_problem`): a limit the gate would silently not apply is worse than an error.
"""

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

IMPORTANCES = ("l1", "l2", "taylor", "slimming")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Prune(_Strict):
    """Structured channel pruning, iterative, fine-tuned between steps."""

    ratio: float = Field(default=0.5, ge=0.0, le=0.95)
    importance: Literal["l1", "l2", "taylor", "slimming"] = "l1"
    round_to: int = Field(default=8, ge=1, le=256)
    iterative_steps: int = Field(default=4, ge=1, le=100)
    finetune_epochs: float = Field(default=1.0, ge=0.0, le=100.0)
    sparsity: float = Field(default=1e-4, ge=0.0, le=1.0)


class Quantize(_Strict):
    """Precision per device kind. The CPU scheme is x86 int8 through torchao's PT2E flow;
    the GPU one is a floating-point precision with channels_last and ``torch.compile``."""

    cpu: Literal["int8_static", "int8_qat", "int8_dynamic", "none"] = "int8_static"
    gpu: Literal["bf16", "fp16", "fp32"] = "bf16"
    buckets: tuple[int, ...] = Field(default=(1, 8, 32), min_length=1, max_length=8)
    qat_epochs: float = Field(default=1.0, gt=0.0, le=100.0)

    @field_validator("buckets")
    @classmethod
    def _sorted_positive(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if any(b < 1 or b > 4096 for b in value):
            raise ValueError("buckets are batch sizes from 1 to 4096")
        return tuple(sorted(set(value)))


class Calibration(_Strict):
    """Images the static quantizer's observers see: preprocessed by the pipeline itself."""

    source: str = "training"
    samples: int = Field(default=256, ge=1, le=100_000)


class Data(_Strict):
    """Where fine-tuning and held-out evaluation images come from."""

    source: str = "phantom"
    labels: Path | None = None
    train_samples: int = Field(default=2000, ge=1, le=1_000_000)
    heldout_samples: int = Field(default=1000, ge=2, le=1_000_000)
    train_volumes: int = Field(default=8, ge=1, le=10_000)
    train_windows: int = Field(default=256, ge=1, le=1_000_000)
    heldout_volumes: int = Field(default=4, ge=1, le=10_000)
    seed: int = Field(default=1, ge=0)


class Finetune(_Strict):
    batch_size: int = Field(default=64, ge=1, le=4096)
    lr: float = Field(default=1e-3, gt=0.0, le=1.0)


class Accept(_Strict):
    """The accuracy gate: largest loss tolerated: of AUC, overall (mean over findings) and per
    finding, for a classifier; of held-out voxel Dice for a segmentation model."""

    max_auc_drop: float = Field(default=0.01, ge=0.0, le=1.0)
    max_per_class_auc_drop: float = Field(default=0.02, ge=0.0, le=1.0)
    max_dice_drop: float = Field(default=0.02, ge=0.0, le=1.0)


class Recipe(_Strict):
    """``model.optimize`` of a pipeline: leave out ``prune`` to skip pruning, and set
    ``quantize.cpu: none`` to keep fp32 on the CPU."""

    prune: Prune | None = None
    quantize: Quantize = Quantize()
    calibration: Calibration = Calibration()
    data: Data = Data()
    finetune: Finetune = Finetune()
    accept: Accept = Accept()


# the keys only one task's data and gate read, by section
TASK_KEYS: dict[str, dict[str, set[str]]] = {
    "classification": {
        "data": {"labels", "train_samples", "heldout_samples"},
        "accept": {"max_auc_drop", "max_per_class_auc_drop"},
    },
    "segmentation": {"data": {"train_volumes", "train_windows", "heldout_volumes"}, "accept": {"max_dice_drop"}},
}


def task_problem(recipe: Recipe, task: str) -> str | None:
    """Why ``recipe`` does not fit a ``task`` model, in one line; None if it does."""
    for other, sections in TASK_KEYS.items():
        for section, keys in sections.items():
            given = sorted(keys & getattr(recipe, section).model_fields_set) if other != task else []
            if given:
                own = ", ".join(f"{section}.{k}" for k in sorted(TASK_KEYS[task][section]))
                return f"{section}.{given[0]} is a {other} key; a {task} model's recipe takes {own} instead"
    if task == "segmentation" and recipe.data.source != "phantom":
        return f"data.source {recipe.data.source}: a segmentation model is tuned and scored on phantom volumes only"
    if task == "segmentation" and recipe.calibration.source != "training":
        return (
            f"calibration.source {recipe.calibration.source}: a segmentation model calibrates on its training windows"
        )
    return None


def accept_record(accept: Accept, task: str) -> dict[str, float]:
    """The limits the gate applied to a ``task`` model, as its manifest records them."""
    return accept.model_dump(include=TASK_KEYS[task]["accept"])


class RecipeError(Exception):
    """A recipe file is unreadable or invalid; ``str()`` names every bad key."""


def load_recipe(path: Path) -> Recipe:
    """Read a standalone recipe file: either the ``optimize:`` block alone or a mapping
    with one top-level ``optimize`` key."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RecipeError(f"{path}: cannot read recipe: {e}") from e
    if isinstance(raw, dict) and set(raw) == {"optimize"}:
        raw = raw["optimize"]
    try:
        return Recipe.model_validate(raw or {})
    except ValidationError as e:
        lines = [f"{path}: {'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()]
        raise RecipeError("\n".join(lines)) from e
