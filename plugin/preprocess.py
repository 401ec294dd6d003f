"""Preprocessing steps: what a pipeline does to pixels before the model sees them.

Contract of a step (the extension point): a pydantic model whose fields are the YAML
options and whose ``__call__`` takes a float32 tensor ``[N, C, H, W]`` in modality
units (Hounsfield units for CT, after RescaleSlope/Intercept) and returns a float32
tensor ``[N, C', H', W']``. A step must not keep state between calls, so the same
pipeline gives the same input to the model in training, optimization and serving.
Bad options raise ``pydantic.ValidationError`` when the pipeline is loaded, never later.
"""

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def __call__(self, images: Tensor) -> Tensor:  # pragma: no cover - contract only
        raise NotImplementedError


# Common CT windows (center, width) in HU.
WINDOW_PRESETS: dict[str, tuple[float, float]] = {
    "lung": (-600, 1500),
    "mediastinum": (50, 350),
    "abdomen": (40, 400),
    "liver": (60, 160),
    "bone": (400, 1800),
    "brain": (40, 80),
}


class Window(_Step):
    """Clip to [center - width/2, center + width/2] and scale that range to [0, 1].
    Give ``center`` and ``width``, or a ``preset`` (lung, mediastinum, abdomen, liver, bone, brain)."""

    center: float
    width: float = Field(gt=0)

    @model_validator(mode="before")
    @classmethod
    def _from_preset(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"preset": value}
        if isinstance(value, dict) and "preset" in value:
            rest = {k: v for k, v in value.items() if k != "preset"}
            if rest:
                raise ValueError("give either a preset or center/width, not both")
            if value["preset"] not in WINDOW_PRESETS:
                raise ValueError(f"unknown window preset {value['preset']!r}; known: {sorted(WINDOW_PRESETS)}")
            center, width = WINDOW_PRESETS[value["preset"]]
            return {"center": center, "width": width}
        return value

    def __call__(self, images: Tensor) -> Tensor:
        low = self.center - self.width / 2
        return ((images - low) / self.width).clamp(0.0, 1.0)


class Stack(_Step):
    """Several windows of the same single-channel image as channels, e.g. lung +
    mediastinum for a 2-channel model."""

    windows: list[Window] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        return {"windows": value} if isinstance(value, list) else value

    def __call__(self, images: Tensor) -> Tensor:
        return torch.cat([window(images) for window in self.windows], dim=1)


class Rescale(_Step):
    """``x * slope + intercept``. The loader already applies the file's own
    RescaleSlope/Intercept (values arrive in HU for CT); this is for further scaling."""

    slope: float = 1.0
    intercept: float = 0.0

    def __call__(self, images: Tensor) -> Tensor:
        return images * self.slope + self.intercept


class _Size(_Step):
    """A target ``[height, width]``, given as a pair or as a mapping."""

    height: int = Field(gt=0, le=8192)
    width: int = Field(gt=0, le=8192)

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return {"height": value[0], "width": value[1]}
        return value


class CropOrPad(_Size):
    """Centre-crop or pad (with ``value``) to ``[height, width]`` without resampling."""

    value: float = 0.0

    def __call__(self, images: Tensor) -> Tensor:
        height, width = images.shape[-2:]
        top, left = (height - self.height) // 2, (width - self.width) // 2
        # Negative padding crops: one call handles both directions on each axis.
        pad = (-left, -(width - self.width - left), -top, -(height - self.height - top))
        return F.pad(images, pad, value=self.value)


class Resize(_Size):
    """Bilinear resize (antialiased when shrinking) to ``[height, width]``."""

    def __call__(self, images: Tensor) -> Tensor:
        if images.shape[-2:] == (self.height, self.width):
            return images
        return F.interpolate(
            images, size=(self.height, self.width), mode="bilinear", antialias=True, align_corners=False
        )


class Normalize(_Step):
    """``(x - mean) / std``."""

    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)

    def __call__(self, images: Tensor) -> Tensor:
        return (images - self.mean) / self.std


class PreprocessStep(BaseModel):
    """One list item of ``preprocess:``; exactly one of its keys is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: Window | None = None
    stack: Stack | None = None
    rescale: Rescale | None = None
    resize: Resize | None = None
    crop_or_pad: CropOrPad | None = None
    normalize: Normalize | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "PreprocessStep":
        chosen = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(f"each preprocess item must name exactly one step, got {chosen or 'none'}")
        return self

    @property
    def step(self) -> _Step:
        return next(getattr(self, n) for n in type(self).model_fields if getattr(self, n) is not None)


def preprocess(steps: list[PreprocessStep], images: Tensor) -> Tensor:
    """Run ``steps`` in order on a ``[N, C, H, W]`` float32 batch."""
    with torch.inference_mode():
        for item in steps:
            images = item.step(images)
    return images.contiguous()
