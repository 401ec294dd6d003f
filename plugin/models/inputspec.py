"""What a model takes as input, and whether a pipeline's preprocessing yields it.

A manifest's ``input`` records its ``kind`` (``slice``: 2D images, ``volume``: 3D, as a
pipeline's ``input.kind``), ``channels``, the sizes (``height`` and ``width``, and
``depth`` for a volume; ``null`` where the model takes any size), ``dtype`` and ``batch``
(``null``: any batch size; a number: the only one the model was exported for).
Checking it against the pipeline when the pipeline loads turns a model that could never
run behind that preprocessing into one clear error, instead of a shape error from inside
the model on every job.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from plugin.pipeline import Pipeline
from plugin.preprocess import PreprocessStep, preprocess

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
SPATIAL_KEYS = ("depth", "height", "width")
KINDS = {"slice": 2, "volume": 3}  # input kind -> spatial dimensions
# Two input sizes no preprocessing step is tuned to: a size that differs between the two
# results follows the image; one that does not is fixed by the pipeline (resize, crop_or_pad).
_PROBES = ((61, 67, 71), (83, 89, 97))


@dataclass(frozen=True)
class InputSpec:
    """``spatial`` is ``(height, width)`` or ``(depth, height, width)``; None: any size."""

    channels: int
    spatial: tuple[int | None, ...]
    dtype: str = "float32"
    batch: int | None = None

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"input channels must be at least 1, not {self.channels}")
        if len(self.spatial) not in (2, 3):
            raise ValueError(f"input must be 2D (height, width) or 3D (depth, height, width), not {self.spatial}")
        if any(size is not None and size < 1 for size in self.spatial):
            raise ValueError(f"input sizes must be at least 1: {self.spatial}")
        if self.dtype not in DTYPES:
            raise ValueError(f"input dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.batch is not None and self.batch < 1:
            raise ValueError(f"input batch must be at least 1 (or null: any), not {self.batch}")

    @classmethod
    def parse(cls, text: str) -> "InputSpec":
        """``CxHxW`` or ``CxDxHxW`` as given on the command line (``1x128x128``); ``?`` for
        a size the model does not fix."""
        if not re.fullmatch(r"\d+(x(\d+|\?)){2,3}", text):
            raise ValueError(f"input {text!r}: expected CxHxW or CxDxHxW, e.g. 1x128x128 (? for any size)")
        channels, *spatial = text.split("x")
        return cls(int(channels), tuple(None if s == "?" else int(s) for s in spatial))

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "InputSpec | None":
        """The spec a manifest records; None for an ``input`` without ``channels``, as some
        artifacts written before the manifest contract have (nothing to check against)."""
        if "channels" not in data:
            return None
        kind = data.get("kind", "volume" if "depth" in data else "slice")
        if kind not in KINDS:
            raise ValueError(f"input kind {kind!r} is not one of {', '.join(KINDS)}")
        return cls(
            int(data["channels"]),
            tuple(None if data.get(key) is None else int(data[key]) for key in SPATIAL_KEYS[-KINDS[kind] :]),
            str(data.get("dtype", "float32")),
            None if data.get("batch") is None else int(data["batch"]),
        )

    @property
    def kind(self) -> str:
        return "volume" if len(self.spatial) == 3 else "slice"

    def to_manifest(self) -> dict[str, Any]:
        keys = SPATIAL_KEYS[-len(self.spatial) :]
        return {
            "kind": self.kind,
            "channels": self.channels,
            **dict(zip(keys, self.spatial, strict=True)),
            "dtype": self.dtype,
            "batch": self.batch,
        }

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def text(self) -> str:
        """``CxHxW`` (or ``CxDxHxW``), ``?`` for any size."""
        return "x".join("?" if size is None else str(size) for size in (self.channels, *self.spatial))

    def mismatch(self, fed: tuple[int | None, ...]) -> str | None:
        """Why images of shape ``fed`` (``(C, *spatial)``, None where the size follows the
        image) cannot go into this model; None if they can."""
        shown = "x".join("?" if size is None else str(size) for size in fed)
        if len(fed) != 1 + len(self.spatial):
            kinds = {3: "slices (CxHxW)", 4: "volumes (CxDxHxW)"}
            return f"the model takes {kinds[1 + len(self.spatial)]}; the pipeline feeds it {kinds.get(len(fed), shown)}"
        pairs = zip((self.channels, *self.spatial), fed, strict=True)
        wrong = [got for want, got in pairs if want is not None and got != want]
        if not wrong:
            return None
        hint = " (add a resize or crop_or_pad step)" if None in wrong else ""
        return f"the model takes {self.text()} input but the pipeline's preprocessing yields {shown}{hint}"


def preprocessed_shape(steps: Sequence[PreprocessStep], spatial_dims: int = 2) -> tuple[int | None, ...]:
    """``(C, *spatial)`` of what ``steps`` make of a one-channel image (``spatial_dims=2``)
    or volume (3); None for a size that follows the input's. Runs the steps on two small
    blank inputs, so any step the pipeline may hold is covered (on the CPU: torch's meta
    device, which needs no memory, imports torch._dynamo, seconds of a node's start)."""
    shapes = [preprocess(list(steps), torch.zeros((1, 1, *probe[:spatial_dims]))).shape[1:] for probe in _PROBES]
    first, second = shapes
    return (int(first[0]), *(int(a) if a == b else None for a, b in zip(first[1:], second[1:], strict=True)))


def fed_shape(pipeline: Pipeline) -> tuple[int | None, ...]:
    """``(C, *spatial)`` of what ``pipeline`` gives its model: the preprocessing's output
    for a slice or a volume, or, with a sliding window, the window's size."""
    selection = pipeline.input
    volume = selection.kind == "volume"
    shape = preprocessed_shape(pipeline.preprocess, 3 if volume else 2)
    if volume and selection.sliding_window is not None:
        return (shape[0], *selection.sliding_window.roi_size)
    return shape


def input_mismatch(spec: InputSpec | None, pipeline: Pipeline) -> str | None:
    """Why ``pipeline`` cannot feed a model that takes ``spec``; None if it can (or if
    the manifest records no spec)."""
    return None if spec is None else spec.mismatch(fed_shape(pipeline))
