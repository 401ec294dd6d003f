"""Volumes: a series' slices as one 3D image placed in the patient, put on the voxel grid a
3D model was trained on, and fed to it whole or window by window.

Why geometry is checked here and not trusted: stacking slices into an array assumes they
are parallel, share one pixel grid and lie evenly along their normal. A series that breaks
this (a gantry tilt, a missing slice, two orientations) would reach the model distorted
and still get a confident score, so its job fails with a :class:`VolumeError` naming the
problem instead.

Conventions, the same as MONAI's ``Orientation`` and ``Spacing`` transforms, so that a
model trained with them sees the same tensor here:

- A volume is a ``[D, H, W]`` array with a :class:`Grid`, whose affine maps a voxel index
  ``(d, h, w)`` to patient coordinates in mm (DICOM's LPS: x to the patient's left, y to
  the back, z to the head).
- An orientation code has one letter per array axis, in order, naming the direction that
  axis's index grows towards: R or L, A or P, S or I. Axial slices stacked in the loader's
  order (along their normal) are ``SPL``: slices from the feet up, rows from front to back,
  columns from the patient's right to left.
- Resampling keeps the first voxel where it is and steps ``spacing`` mm from there, over
  ``round(extent / spacing + 1)`` voxels (values beyond the last input voxel repeat it),
  interpolating linearly. Oblique series are not rotated: each axis goes to the patient
  direction nearest to it, as MONAI's ``Orientation`` does.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from pydicom import Dataset
from torch import Tensor

from plugin.loader import frame_count

# Patient axis (LPS) and sign of each orientation letter.
_LETTERS = {"L": (0, 1), "R": (0, -1), "P": (1, 1), "A": (1, -1), "S": (2, 1), "I": (2, -1)}
ORIENTATION_TOLERANCE = 1e-3  # direction cosines of two slices that count as the same orientation
SPACING_TOLERANCE = 0.1  # a slice may lie this fraction of the slice spacing off an even grid
TILT_TOLERANCE = 0.5  # slices may drift this fraction of a pixel across their plane, in all
MAX_VOXELS = 1 << 28  # 1 GiB as float32: a larger volume (stacked or resampled) fails its job
_CHUNK_VOXELS = 1 << 22  # temporaries of one interpolation step (16 MiB as float32)


class VolumeError(Exception):
    """A series cannot become the volume a pipeline asks for. ``reason`` names why in one
    word: ``no_geometry``, ``multiframe``, ``too_few_slices``, ``mixed_orientations``,
    ``mixed_pixel_grids``, ``gantry_tilt``, ``uneven_spacing`` or ``volume_too_large``."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True, eq=False)
class Grid:
    """A voxel grid in the patient: ``shape`` ``(D, H, W)`` and ``affine``, the 4x4 matrix
    from a voxel index ``(d, h, w, 1)`` to patient coordinates in mm (LPS)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Distance between neighbouring voxels along each axis, in mm."""
        d, h, w = np.linalg.norm(self.affine[:3, :3], axis=0)
        return float(d), float(h), float(w)

    @property
    def orientation(self) -> str:
        """The orientation code of the axes (the nearest patient direction of each)."""
        inverse = {v: k for k, v in _LETTERS.items()}
        return "".join(inverse[assignment] for assignment in _axis_directions(self.affine))

    def mapped(self, shape: Sequence[int], scale: Sequence[float], offset: Sequence[float]) -> "Grid":
        """The grid whose voxel ``j`` lies at this grid's index ``scale * j + offset`` on
        each axis: how resizing, cropping and padding move voxels."""
        index = np.eye(4)
        index[:3, :3] = np.diag(scale)
        index[:3, 3] = offset
        d, h, w = shape
        return Grid((int(d), int(h), int(w)), self.affine @ index)

    def to_index(self, points: np.ndarray) -> np.ndarray:
        """Voxel indices (fractional) of patient points ``[N, 3]``."""
        homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
        return (np.linalg.solve(self.affine, homogeneous.T).T)[:, :3]

    def to_patient(self, indices: np.ndarray) -> np.ndarray:
        """Patient points of voxel indices ``[N, 3]``."""
        return indices @ self.affine[:3, :3].T + self.affine[:3, 3]


@dataclass(frozen=True, eq=False)
class Placement:
    """Where a volume model's output lies in the patient: ``source`` is the series as
    stacked (index 0: the job's images in order), ``grid`` the voxels the model saw (after
    resampling and preprocessing), ``centres`` ``[R, 3]`` the voxel index on ``grid`` of the
    centre of what each row of class logits stands for (a window, or the whole volume)."""

    source: Grid
    grid: Grid
    centres: np.ndarray

    def source_slice(self, row: int) -> int:
        """The series' slice nearest to the centre of what output row ``row`` stands for."""
        index = self.source.to_index(self.grid.to_patient(self.centres[row : row + 1]))[0, 0]
        return int(np.clip(round(float(index)), 0, self.source.shape[0] - 1))


def _axis_directions(affine: np.ndarray) -> list[tuple[int, int]]:
    """For each array axis, the patient axis it runs nearest to and its sign there; each
    patient axis goes to one array axis, largest direction cosine first (as nibabel's
    ``io_orientation``, which MONAI uses)."""
    cosines = affine[:3, :3] / np.linalg.norm(affine[:3, :3], axis=0)
    free = np.abs(cosines)
    result: list[tuple[int, int]] = [(0, 1)] * 3
    for _ in range(3):
        patient, axis = np.unravel_index(int(np.argmax(free)), free.shape)
        result[axis] = (int(patient), 1 if cosines[patient, axis] > 0 else -1)
        free[patient, :] = -1
        free[:, axis] = -1
    return result


def _numbers(header: Dataset, keyword: str, count: int) -> np.ndarray:
    values = np.array([float(v) for v in header[keyword].value], dtype=np.float64)
    if values.shape != (count,):
        raise ValueError(f"{keyword} has {values.size} values, not {count}")
    return values


def _vector(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


def series_grid(headers: Sequence[Dataset]) -> Grid:
    """The grid of a series' slices in the order given (the loader sorts them along their
    normal): rows and columns from PixelSpacing and ImageOrientationPatient, slices from
    the ImagePositionPatient of the first and the even step to the last. Raises
    :class:`VolumeError` for a series that does not fill one such grid."""
    count = len(headers)
    if count < 2:
        raise VolumeError("too_few_slices", f"a volume needs at least 2 slices; the series has {count}")
    frames = [frame_count(h) for h in headers]
    if max(frames) > 1:
        raise VolumeError("multiframe", f"a volume is built from single-frame images; one has {max(frames)} frames")
    try:
        orientations = np.array([_numbers(h, "ImageOrientationPatient", 6) for h in headers])
        positions = np.array([_numbers(h, "ImagePositionPatient", 3) for h in headers])
        pixel_spacings = np.array([_numbers(h, "PixelSpacing", 2) for h in headers])
        sizes = np.array([(int(h.Rows), int(h.Columns)) for h in headers])
    except (KeyError, AttributeError, TypeError, ValueError) as e:
        raise VolumeError(
            "no_geometry",
            f"an image lacks a usable ImagePositionPatient, ImageOrientationPatient, "
            f"PixelSpacing, Rows or Columns ({e})",
        ) from e

    differs = np.abs(orientations - orientations[0]).max(axis=1) > ORIENTATION_TOLERANCE
    if differs.any():
        i = int(np.argmax(differs))
        raise VolumeError(
            "mixed_orientations",
            f"slice {i + 1} of {count} is oriented {_vector(orientations[i])}, slice 1 {_vector(orientations[0])}",
        )
    grids = np.concatenate([sizes, pixel_spacings], axis=1)
    differs = np.abs(grids - grids[0]).max(axis=1) > 1e-4
    if differs.any():
        i = int(np.argmax(differs))
        raise VolumeError(
            "mixed_pixel_grids",
            f"slice {i + 1} of {count} has {sizes[i][0]}x{sizes[i][1]} pixels of {_vector(pixel_spacings[i])} mm, "
            f"slice 1 {sizes[0][0]}x{sizes[0][1]} of {_vector(pixel_spacings[0])} mm",
        )

    row, column = orientations[0, :3], orientations[0, 3:]
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    along = (positions - positions[0]) @ normal
    across = np.linalg.norm((positions - positions[0]) - np.outer(along, normal), axis=1)
    pixel = float(pixel_spacings[0].min())
    if across.max() > TILT_TOLERANCE * pixel:
        i = int(np.argmax(across))
        degrees = math.degrees(math.atan2(across[i], abs(along[i])))
        raise VolumeError(
            "gantry_tilt",
            f"slice {i + 1} of {count} lies {across[i]:.2f} mm across the slice plane from slice 1 "
            f"({degrees:.1f} degrees off the normal); slices must be stacked straight along it",
        )
    step = along[-1] / (count - 1)
    gaps = np.diff(along)
    if abs(step) < 1e-6 or np.abs(along - step * np.arange(count)).max() > SPACING_TOLERANCE * abs(step):
        raise VolumeError(
            "uneven_spacing",
            f"gaps between slices range from {gaps.min():.3g} to {gaps.max():.3g} mm along the normal "
            f"(allowed: {SPACING_TOLERANCE:.0%} off an even spacing)",
        )

    affine = np.eye(4)
    affine[:3, 0] = normal * step
    affine[:3, 1] = column * pixel_spacings[0, 0]  # PixelSpacing: between rows, then between columns
    affine[:3, 2] = row * pixel_spacings[0, 1]
    affine[:3, 3] = positions[0]
    return Grid((count, int(sizes[0, 0]), int(sizes[0, 1])), affine)


def _check_size(shape: Sequence[int], what: str) -> None:
    if math.prod(shape) > MAX_VOXELS:
        raise VolumeError(
            "volume_too_large",
            f"{what} would be {'x'.join(map(str, shape))} voxels, more than the {MAX_VOXELS:,} a node holds",
        )


class Resampling:
    """Reorienting and resampling a volume on ``source`` to ``orientation`` (None keeps the
    axes) and ``spacing`` (None keeps the spacing): ``target`` is the grid it lands on.

    Each axis of the result comes from one axis of the source, so the work is one linear
    interpolation along each source axis that changes (a flip or a new spacing); an axis
    that keeps both is not touched. It is split so that a series is resampled in its
    slices' plane as it is stacked (:meth:`plane`, slice by slice), and across slices once
    stacked (:meth:`finish`), so the full-resolution volume is never held: the stack is
    ``stack_shape``. Raises :class:`VolumeError` (``volume_too_large``) for a stack or result
    beyond ``MAX_VOXELS``.
    """

    def __init__(self, source: Grid, orientation: str | None, spacing: Sequence[float] | None) -> None:
        directions = _axis_directions(source.affine)
        if orientation is None:
            order, signs = [0, 1, 2], [1, 1, 1]
        else:
            wanted = [_LETTERS[letter] for letter in orientation]
            order = [next(a for a in range(3) if directions[a][0] == axis) for axis, _ in wanted]
            signs = [sign * directions[a][1] for (_, sign), a in zip(wanted, order, strict=True)]
        index = np.zeros((4, 4))  # target voxel index -> source voxel index
        index[3, 3] = 1.0
        # per source axis: where each voxel of the target axis it becomes samples it (None: nowhere new)
        self._positions: list[Tensor | None] = [None, None, None]
        shape = []
        for target_axis, axis in enumerate(order):
            n = source.shape[axis]
            step = 1.0 if spacing is None else spacing[target_axis] / source.spacing[axis]
            if math.isclose(step, 1.0, rel_tol=1e-9):
                step = 1.0
            size = n if step == 1.0 else int(np.round((n - 1) / step + 1.0))  # as MONAI
            scale, offset = (step, 0.0) if signs[target_axis] > 0 else (-step, n - 1.0)
            index[axis, target_axis], index[axis, 3] = scale, offset
            shape.append(size)
            if (scale, offset) != (1.0, 0.0):
                self._positions[axis] = torch.arange(size, dtype=torch.float64) * scale + offset
        self._order = order
        self.stack_shape = (
            source.shape[0],
            *(n if p is None else len(p) for n, p in zip(source.shape[1:], self._positions[1:], strict=True)),
        )
        _check_size(self.stack_shape, "the stacked volume")
        _check_size(shape, "the resampled volume")
        d, h, w = shape
        self.target = Grid((d, h, w), source.affine @ index)

    def plane(self, images: Tensor) -> Tensor:
        """Slices ``[N, H, W]`` of the source resampled in their plane."""
        changed = {axis: p for axis, p in enumerate(self._positions) if axis and p is not None}
        for axis in sorted(changed, key=lambda a: len(changed[a]) / images.shape[a]):  # shrink first
            images = _interpolate(images, axis, changed[axis])
        return images

    def finish(self, stack: Tensor) -> Tensor:
        """The slices resampled by :meth:`plane`, stacked ``[D, H', W']``, resampled across
        slices and reoriented: the volume on ``target``."""
        positions = self._positions[0]
        if positions is not None:
            stack = _interpolate(stack, 0, positions)
        return stack.permute(self._order).contiguous()

    def __call__(self, volume: Tensor) -> Tensor:
        """A whole ``[D, H, W]`` volume on ``source``, resampled onto ``target``."""
        return self.finish(self.plane(volume))


def _interpolate(volume: Tensor, axis: int, positions: Tensor) -> Tensor:
    """Linear interpolation of ``volume`` along ``axis`` at fractional ``positions``
    (clamped to the first and last voxel), written chunk by chunk into a new tensor."""
    n = volume.shape[axis]
    positions = positions.clamp(0, n - 1)
    low = positions.floor().long().clamp(max=max(n - 2, 0))
    high = (low + 1).clamp(max=n - 1)
    weight_shape = [1, 1, 1]
    weight_shape[axis] = -1
    weight = (positions - low).float().view(weight_shape)
    shape = list(volume.shape)
    shape[axis] = len(positions)
    out = volume.new_empty(shape)
    along = 1 if axis == 0 else 0  # chunks are cut across another axis
    per_index = math.prod(shape) // shape[along]
    chunk = max(1, _CHUNK_VOXELS // max(per_index, 1))
    for start in range(0, shape[along], chunk):
        length = min(chunk, shape[along] - start)
        part = volume.narrow(along, start, length)
        torch.lerp(
            part.index_select(axis, low), part.index_select(axis, high), weight, out=out.narrow(along, start, length)
        )
    return out


def _window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Where windows of ``roi`` voxels start along an axis of ``size`` (``size >= roi``):
    every ``int(roi * (1 - overlap))`` voxels (at least 1), the last one moved back to end
    flush with the axis, as MONAI's ``sliding_window_inference`` lays them out."""
    if roi >= size:
        return [0]
    interval = max(int(roi * (1 - overlap)), 1)
    starts = []
    for start in range(0, size, interval):
        starts.append(min(start, size - roi))
        if start + roi >= size:
            break
    return starts


def infer_volume(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    roi: Sequence[int] | None = None,
    overlap: float = 0.25,
    batch: int = 1,
) -> tuple[Tensor, np.ndarray]:
    """The model's output for a preprocessed volume ``image`` ``[1, C, D, H, W]``, and the
    centre of the part of the volume each output row stands for, in voxel indices of the
    image (``[rows, 3]``).

    Without ``roi`` the whole volume is one model call: one row. With it, windows of
    ``roi`` voxels (laid out by :func:`_window_starts` on each axis; a volume smaller than
    the window is padded with zeros on both sides, as MONAI pads it) go to the model
    ``batch`` at a time: one row of class logits per window, in order (depth, then height,
    then width)."""
    spatial = image.shape[2:]
    if roi is None:
        return predict(image), np.array([[(n - 1) / 2 for n in spatial]])
    before = [max(r - n, 0) // 2 for n, r in zip(spatial, roi, strict=True)]
    after = [max(r - n, 0) - b for n, r, b in zip(spatial, roi, before, strict=True)]
    if any(before) or any(after):
        image = F.pad(image, [p for axis in (2, 1, 0) for p in (before[axis], after[axis])])
    grids = np.meshgrid(
        *(_window_starts(n, r, overlap) for n, r in zip(image.shape[2:], roi, strict=True)), indexing="ij"
    )
    starts = np.stack([g.ravel() for g in grids], axis=1)
    outputs = []
    for first in range(0, len(starts), batch):
        windows = [
            image[0, :, d : d + roi[0], h : h + roi[1], w : w + roi[2]] for d, h, w in starts[first : first + batch]
        ]
        outputs.append(predict(torch.stack(windows)))
    centres = starts - np.array(before) + (np.array(roi) - 1) / 2
    return torch.cat(outputs), centres


def segment_volume(
    predict: Callable[[Tensor], Tensor],
    image: Tensor,
    roi: Sequence[int] | None = None,
    overlap: float = 0.25,
    batch: int = 1,
) -> Tensor:
    """A segmentation model's per-voxel output ``[1, K, D, H, W]`` for a preprocessed volume
    ``image`` ``[1, C, D, H, W]``, on the image's own voxels. Without ``roi``: one model call.
    With it: MONAI's ``sliding_window_inference`` lays out the windows as
    :func:`infer_volume` does and stitches their outputs, each voxel the mean of the
    windows that cover it (``mode="constant"``, MONAI's default), so a model trained with
    MONAI's inferer gets here what it got there."""
    output: object
    if roi is None:
        output = predict(image)
    else:
        with torch.inference_mode():  # the model pool's outputs are inference tensors, which MONAI adds up in place
            from monai.inferers import sliding_window_inference  # seconds to import: only volume pipelines need it

            output = sliding_window_inference(image, roi, batch, predict, overlap=overlap, mode="constant")
    if not isinstance(output, Tensor) or output.ndim != 5 or output.shape[2:] != image.shape[2:]:
        got = list(output.shape) if isinstance(output, Tensor) else type(output).__name__
        raise ValueError(
            f"a segmentation model must give one value per voxel of its input {list(image.shape[2:])} "
            f"([batch, classes, depth, height, width]); this one gave {got}"
        )
    return output
