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


class Window(_Step):
    """Clip to [center - width/2, center + width/2] and scale that range to [0, 1]."""

    center: float
    width: float = Field(gt=0)

    def __call__(self, images: Tensor) -> Tensor:
        low = self.center - self.width / 2
        return ((images - low) / self.width).clamp_(0.0, 1.0)


class Resize(_Step):
    """Bilinear resize (antialiased when shrinking) to ``[height, width]``."""

    height: int = Field(gt=0, le=4096)
    width: int = Field(gt=0, le=4096)

    @model_validator(mode="before")
    @classmethod
    def _from_pair(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return {"height": value[0], "width": value[1]}
        return value

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
    resize: Resize | None = None
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
