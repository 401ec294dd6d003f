"""Preprocessing steps: what a pipeline does to pixels before the model sees them.

Contract of a step (the extension point): a pydantic model whose fields are the YAML
options and whose ``__call__`` takes a float32 tensor ``[N, C, H, W]`` (slices) or
``[N, C, D, H, W]`` (volumes) in modality units (Hounsfield units for CT, after
RescaleSlope/Intercept) and returns a float32 tensor of the same rank (channels and sizes
may change). ``spatial_dims`` says which of the two a step takes (None: either); a step that
moves voxels says where they go in ``regrid``, so that a volume's outputs can be placed in
the patient. A step must not keep state between calls, so the same pipeline gives the same
input to the model in training, optimization and serving. Bad options raise
``pydantic.ValidationError`` when the pipeline is loaded, never later.
"""

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from plugin.volume import Grid


class _Step(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @property
    def spatial_dims(self) -> int | None:
        """2 for a step on slices only, 3 for volumes only, None for either."""
        return None

    def __call__(self, images: Tensor) -> Tensor:  # pragma: no cover - contract only
        raise NotImplementedError

    def regrid(self, grid: Grid) -> Grid:
        """Where the voxels of a volume on ``grid`` lie after this step (most steps leave
        them where they are)."""
        return grid


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
        return images.sub(low).div_(self.width).clamp_(0.0, 1.0)  # one new tensor: volumes are large


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
        return images.mul(self.slope).add_(self.intercept)


class _Size(_Step):
    """A target ``[height, width]`` for slices or ``[depth, height, width]`` for volumes,
    given as a list or as a mapping."""

    depth: int | None = Field(default=None, gt=0, le=8192)
    height: int = Field(gt=0, le=8192)
    width: int = Field(gt=0, le=8192)

    @model_validator(mode="before")
    @classmethod
    def _from_list(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)) and len(value) == 2:
            return {"height": value[0], "width": value[1]}
        if isinstance(value, (list, tuple)) and len(value) == 3:
            return {"depth": value[0], "height": value[1], "width": value[2]}
        return value

    @property
    def size(self) -> tuple[int, ...]:
        return (self.height, self.width) if self.depth is None else (self.depth, self.height, self.width)

    @property
    def spatial_dims(self) -> int:
        return len(self.size)


class CropOrPad(_Size):
    """Centre-crop or pad (with ``value``) to the size without resampling."""

    value: float = 0.0

    def _before(self, shape: Sequence[int]) -> list[int]:
        """Per axis, where the output starts in the input (negative: padding). Where the
        difference is odd, the extra voxel goes where MONAI's ``ResizeWithPadOrCrop`` puts
        it (cropped at the start, padded at the end), so a model trained behind MONAI's
        CenterSpatialCrop or SpatialPad sees the same pixels."""
        pairs = zip(shape[-len(self.size) :], self.size, strict=True)
        return [n // 2 - target // 2 if n >= target else -((target - n) // 2) for n, target in pairs]

    def __call__(self, images: Tensor) -> Tensor:
        shape = images.shape[-len(self.size) :]
        pad: list[int] = []
        # Negative padding crops: one call handles both directions on each axis (last axis first).
        for n, target, before in reversed(list(zip(shape, self.size, self._before(images.shape), strict=True))):
            pad += [-before, -(n - target - before)]
        return F.pad(images, pad, value=self.value)

    def regrid(self, grid: Grid) -> Grid:
        return grid.mapped(self.size, (1.0, 1.0, 1.0), self._before(grid.shape))


class Resize(_Size):
    """Resize to the size: bilinear, antialiased when shrinking, for slices; trilinear for
    volumes (torch has no antialiased trilinear, as MONAI's ``Resize`` by default)."""

    def __call__(self, images: Tensor) -> Tensor:
        if tuple(images.shape[-len(self.size) :]) == self.size:
            return images
        if self.depth is None:
            return F.interpolate(images, size=self.size, mode="bilinear", antialias=True, align_corners=False)
        return F.interpolate(images, size=self.size, mode="trilinear", align_corners=False)

    def regrid(self, grid: Grid) -> Grid:
        # align_corners=False: output voxel j is at input (j + 0.5) * n / target - 0.5
        scale = [n / target for n, target in zip(grid.shape, self.size, strict=True)]
        return grid.mapped(self.size, scale, [s / 2 - 0.5 for s in scale])


class Normalize(_Step):
    """``(x - mean) / std``."""

    mean: float = 0.0
    std: float = Field(default=1.0, gt=0)

    def __call__(self, images: Tensor) -> Tensor:
        return images.sub(self.mean).div_(self.std)


class Standardize(_Step):
    """``(x - mean) / std`` with each image's own mean and standard deviation, over all its
    channels or, with ``channel_wise``, each channel's: MONAI's ``NormalizeIntensity``
    without ``subtrahend`` and ``divisor``. An image of one value is only shifted."""

    channel_wise: bool = False

    def __call__(self, images: Tensor) -> Tensor:
        std, mean = torch.std_mean(
            images, dim=tuple(range(2 if self.channel_wise else 1, images.dim())), keepdim=True, correction=0
        )
        return images.sub(mean).div_(std.masked_fill_(std == 0, 1.0))


class PreprocessStep(BaseModel):
    """One list item of ``preprocess:``; exactly one of its keys is set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: Window | None = None
    stack: Stack | None = None
    rescale: Rescale | None = None
    resize: Resize | None = None
    crop_or_pad: CropOrPad | None = None
    normalize: Normalize | None = None
    standardize: Standardize | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> "PreprocessStep":
        chosen = [name for name in type(self).model_fields if getattr(self, name) is not None]
        if len(chosen) != 1:
            raise ValueError(f"each preprocess item must name exactly one step, got {chosen or 'none'}")
        return self

    @property
    def name(self) -> str:
        return next(n for n in type(self).model_fields if getattr(self, n) is not None)

    @property
    def step(self) -> _Step:
        return getattr(self, self.name)


def preprocess(steps: list[PreprocessStep], images: Tensor) -> Tensor:
    """Run ``steps`` in order on a ``[N, C, H, W]`` float32 batch."""
    with torch.inference_mode():
        for item in steps:
            images = item.step(images)
    return images.contiguous()


def preprocess_volume(steps: list[PreprocessStep], volume: Tensor, grid: Grid) -> tuple[Tensor, Grid]:
    """Run ``steps`` in order on a ``[1, C, D, H, W]`` volume on ``grid``; returns the
    result and the grid its voxels lie on."""
    with torch.inference_mode():
        for item in steps:
            volume, grid = item.step(volume), item.step.regrid(grid)
    return volume.contiguous(), grid
