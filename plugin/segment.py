"""Segmentation: a model's per-voxel output -> masks on the series' own slices -> lesions.

Contract (the extension point, as plugin/postprocess.py is for classification): given the
pipeline's ``postprocess`` block, the model's class names and the job's
:class:`ModelOutput` (``logits`` ``[1, K, D', H', W']`` on ``volume.grid``), return a
:class:`Segmentation`: each segment's mask and probabilities on ``volume.source`` and its
measured lesions. Raises ValueError for output that is not per-voxel, or a segment that is
not a class of the model (the loader checks this too).

Why on the source: DICOM SEG frames and SR references point at the series' own images, and
a reader checks a volume or a diameter on them, not on the grid the model happened to see.

- Probabilities are computed on the model's grid (softmax over channels, channel 0 the
  background; or sigmoid per channel) and interpolated trilinearly at each source voxel
  centre, whose index on the grid comes from the two affines. A model voxel stands for half
  a step around its centre: a source voxel in that margin takes the edge value, one beyond
  it probability 0 (the model did not see it).
- Softmax: a voxel is in a segment when its probability is at least the segment's
  threshold and its class is the most probable of the model's non-background classes (the
  first wins a tie), so segments do not overlap. Sigmoid: each segment on its own.
- A lesion is a 26-connected component of a segment's mask; one that fails the segment's
  ``min_volume_mm3``, ``min_mean_probability`` or ``min_compactness`` (plugin/pipeline.py,
  SegmentSpec) is removed from the mask too. A lesion that the series' first or last slice
  cuts counts twice its volume for ``min_compactness`` (mirrored at the cut): the series
  shows only part of it, and a ball cut through its middle would otherwise look flat.
- With a ``grow_threshold`` below the threshold (hysteresis), each lesion that passed the
  filters then grows into the voxels connected to it at or above ``grow_threshold`` (of its
  class, for softmax), not through a part the filters removed; lesions that meet become
  one. The filters judge a lesion as detected, on its voxels at or above the threshold, and
  its mean and maximum probability (its score) stay theirs: growing moves outlines, never
  which lesions are found (the lower-probability rim would lower every small lesion's mean
  and push it under ``min_mean_probability``, and grow specks past ``min_volume_mm3``).
  The mask, and so the SEG, is the grown lesions, and their volume, diameter and centroid
  are measured on it: the SR measures what the SEG outlines.
- With an ``outline`` (SegmentSpec), each lesion is then redrawn by the series' own values
  (plugin/pipeline.py, Outline), read through the caller's :data:`Pixels` for the lesion's
  slices only, and measured as redrawn. Lesions are redrawn one after the other; a voxel
  goes to the lesion whose outline (as the model drew it, or as redrawn) is nearer, and
  each stays a voxel apart from the others and from other segments: outlines never merge.
  A lesion whose pieces the values part (lower between them than ``min_value``) stays one
  lesion, measured over its pieces. With the outline's ``alone``, a lesion scored under
  ``min_mean_probability`` but at least ``alone``'s passes the filters, and is reported
  only if, redrawn, it stands alone in the series' values (plugin/pipeline.py, Alone); with
  its ``apart``, every other lesion is reported only if it stands apart, not part of
  something larger (plugin/pipeline.py, Apart).
"""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage
from scipy.spatial.distance import pdist

from plugin.pipeline import Postprocess, SegmentSpec
from plugin.postprocess import ModelOutput
from plugin.volume import Grid

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)  # voxels that share a face, edge or corner are one lesion
_CHUNK_VOXELS = 1 << 22  # source voxels x channels interpolated at once (16 MiB as float32)
_SNAP = 1e-6  # a grid index this close to a voxel centre is that centre: a shared grid gives its values back exactly

Pixels = Callable[[slice], np.ndarray]
"""The source series' values in modality units on a run of its slices, ``[n, H, W]``."""


@dataclass(frozen=True)
class Lesion:
    """One connected part of a segment, measured on the source series."""

    label: str  # the segment's label
    segment_number: int  # 1-based: position of its SegmentSpec in postprocess.segments
    number: int  # 1-based within the series: by segment, then volume descending
    volume_mm3: float
    diameter_mm: float  # longest in-plane diameter over the lesion's slices (see _longest_diameter)
    centroid: tuple[float, float, float]  # patient coordinates (LPS, mm)
    mean_probability: float
    max_probability: float
    slices: tuple[int, ...]  # source slice indices (job image order) it covers


@dataclass(frozen=True, eq=False)
class Segmentation:
    """``masks`` ``[S, D, H, W]`` bool and ``probabilities`` ``[S, D, H, W]`` uint8
    (``round(p * 255)``, a FRACTIONAL SEG's values) on the source series, one per segment
    in segment-number order."""

    segments: list[SegmentSpec]
    masks: np.ndarray
    probabilities: np.ndarray
    lesions: list[Lesion]


def _source_axes(source: Grid, grid: Grid) -> tuple[list[int], list[np.ndarray]]:
    """For each source axis: the model grid axis it runs along, and the fractional index on
    that axis of each of its voxels. radpipe's grids only permute, flip, scale and shift the
    series' axes (plugin/volume.py), so trilinear interpolation is three linear ones; a
    grid rotated against the series raises ValueError."""
    to_grid = np.linalg.solve(grid.affine, source.affine)  # source index -> grid index
    linear = to_grid[:3, :3]
    axes = [int(a) for a in np.argmax(np.abs(linear), axis=0)]
    across = linear.copy()
    across[axes, [0, 1, 2]] = 0
    if sorted(axes) != [0, 1, 2] or np.abs(across).max() > 1e-6 * np.abs(linear).max():
        raise ValueError(
            "the model's grid is rotated against the series; segmentation needs the axes of one along the other's"
        )
    positions = [linear[axes[a], a] * np.arange(n) + to_grid[axes[a], 3] for a, n in enumerate(source.shape)]
    return axes, positions


def _along(values: np.ndarray, axis: int, positions: np.ndarray) -> np.ndarray:
    """``values`` interpolated linearly along ``axis`` at fractional ``positions``. A voxel
    stands for half a step around its centre: a position in that margin beyond the first or
    last voxel takes its value, one farther out gets 0."""
    n = values.shape[axis]
    nearest = np.rint(positions)
    positions = np.where(np.abs(positions - nearest) < _SNAP, nearest, positions)
    seen = (positions >= -0.5) & (positions <= n - 0.5)
    positions = np.clip(positions, 0, n - 1)
    low = np.minimum(np.floor(positions), max(n - 2, 0)).astype(np.int64)
    high = np.minimum(low + 1, n - 1)
    shape = [1] * values.ndim
    shape[axis] = -1
    weight = torch.from_numpy((positions - low).astype(np.float32)).view(shape)
    below, above = torch.from_numpy(values.take(low, axis)), torch.from_numpy(values.take(high, axis))
    # lerp gives either end exactly (a grid shared with the source gives its values back)
    return (torch.lerp(below, above, weight) * torch.from_numpy(seen).view(shape)).numpy()


def _on_source(values: np.ndarray, positions: list[np.ndarray], box: tuple[slice, ...]) -> np.ndarray:
    """The model's ``values`` ``[C, ...]`` (axes in source order) at the source voxels of ``box``."""
    for axis, (where, part) in enumerate(zip(positions, box, strict=True), start=1):
        values = _along(values, axis, where[part])
    return values


def _longest_diameter(inside: np.ndarray, in_plane: np.ndarray) -> float:
    """The longest in-plane diameter over a lesion's slices: the largest distance between
    two points of its outline in one slice, the outline drawn through the midpoints of its
    outer pixel edges (halfway between a pixel in it and one outside, as marching squares
    and pyradiomics draw it). Only a row's or a column's first and last pixel can give the
    farthest points, so only their edges are compared. ``inside`` ``[D, H, W]``: the lesion
    in its bounding box; ``in_plane``: the patient step (mm) of a row and of a column."""
    longest = 0.0
    for plane in inside:
        if not plane.any():  # a lesion redrawn by an outline may have come apart across a slice
            continue
        rows, columns = np.flatnonzero(plane.any(axis=1)), np.flatnonzero(plane.any(axis=0))
        left = plane[rows].argmax(axis=1) - 0.5
        right = plane.shape[1] - plane[rows, ::-1].argmax(axis=1) - 0.5
        top = plane[:, columns].argmax(axis=0) - 0.5
        bottom = plane.shape[0] - plane[::-1, columns].argmax(axis=0) - 0.5
        edges = [(rows, left), (rows, right), (top, columns), (bottom, columns)]
        points = np.concatenate([np.column_stack(edge) for edge in edges])
        longest = max(longest, float(pdist(points @ in_plane.T).max()))
    return longest


_Part = tuple[tuple[slice, ...], np.ndarray, np.ndarray]  # bounding box on the source, the part in it, probabilities


def _parts(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """The 26-connected parts of ``mask`` ``[D, H, W]``, labelled over the slices that hold
    any (labelling only those is faster), and the first of those slices."""
    occupied = np.flatnonzero(mask.any(axis=(1, 2)))
    if not len(occupied):
        return np.zeros((0, *mask.shape[1:]), dtype=np.int32), 0
    first = int(occupied[0])
    part = mask[first : occupied[-1] + 1]
    labels: np.ndarray
    try:  # uint16: half of scipy's int32, a whole volume's worth (scipy takes it; its stubs say int32 only)
        labels = ndimage.label(part, structure=_CONNECTIVITY, output=np.uint16)[0]  # type: ignore[call-overload]
    except RuntimeError:  # more than 65535 parts
        labels = ndimage.label(part, structure=_CONNECTIVITY)[0]
    return labels, first


def _clear(box: tuple[slice, ...], inside: np.ndarray, *masks: np.ndarray | None) -> None:
    for mask in masks:
        if mask is not None:
            mask[box][inside] = False


def _lowest_score(spec: SegmentSpec) -> float:
    """The mean probability under which no lesion of ``spec`` is reported: its own, or its
    outline's lower one for lesions that stand alone (plugin/pipeline.py, Alone)."""
    alone = None if spec.outline is None else spec.outline.alone
    return spec.min_mean_probability if alone is None else alone.min_mean_probability


def _detected(
    mask: np.ndarray,
    grown: np.ndarray | None,
    spec: SegmentSpec,
    values: np.ndarray,
    positions: list[np.ndarray],
    source: Grid,
) -> list[_Part]:
    """The connected parts of ``mask`` that pass the segment's lesion filters, each as its
    bounding box on the source, the part within it and its voxels' probabilities; parts that
    fail are cleared from ``mask``, and from ``grown`` (if any: no lesion grows through
    them). ``values`` ``[1, ...]``: the segment's probabilities on the model's grid."""
    components, first = _parts(mask)
    if not len(components):
        return []
    voxel_mm3 = abs(float(np.linalg.det(source.affine[:3, :3])))
    passed: list[_Part] = []
    for component, (depth, rows, columns) in enumerate(ndimage.find_objects(components), start=1):
        inside = components[depth, rows, columns] == component
        box = (slice(depth.start + first, depth.stop + first), rows, columns)  # on the source
        volume = int(inside.sum()) * voxel_mm3
        if volume < spec.min_volume_mm3:  # before measuring the rest: most specks stop here
            _clear(box, inside, mask, grown)
            continue
        diameter = _longest_diameter(inside, source.affine[:3, 1:3])
        probability = _on_source(values, positions, box)[0][inside]
        # A lesion the series' first or last slice cuts is judged as if mirrored there: the
        # series shows only part of it, and a ball cut through its middle is half as compact.
        cut = box[0].start == 0 or box[0].stop == source.shape[0]
        compactness = (2 if cut else 1) * volume / (np.pi / 6 * diameter**3)
        if probability.mean() < _lowest_score(spec) or compactness < spec.min_compactness:
            _clear(box, inside, mask, grown)
            continue
        passed.append((box, inside, probability))
    return passed


def _grown(mask: np.ndarray, grown: np.ndarray, values: np.ndarray, positions: list[np.ndarray]) -> list[_Part]:
    """Hysteresis: the connected parts of ``grown`` that hold a lesion of ``mask`` (the
    detected ones, all within ``grown``), each as its bounding box on the source, the part
    within it and the probabilities of its detected voxels (its score, as the filters judged
    it). ``mask`` becomes those parts."""
    components, first = _parts(grown)
    if not len(components):
        return []
    depth = slice(first, first + len(components))
    held = np.unique(components[mask[depth]])
    parts: list[_Part] = []
    for component, where in enumerate(ndimage.find_objects(components), start=1):
        if where is None or component not in held:
            continue
        inside = components[where] == component
        box = (slice(where[0].start + first, where[0].stop + first), *where[1:])
        probability = _on_source(values, positions, box)[0][inside & mask[box]]
        parts.append((box, inside, probability))
        mask[box] |= inside  # box by box: a whole-volume np.isin made three volumes of temporaries
    return parts


def _ball(spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """The voxels within ``radius_mm`` of the middle one on a grid of ``spacing``: a
    structuring element (on each axis at least the middle voxel)."""
    steps = [int(radius_mm // step) for step in spacing]
    offsets = np.indices([2 * n + 1 for n in steps]) - np.reshape(steps, (3, 1, 1, 1))
    return ((offsets * np.reshape(spacing, (3, 1, 1, 1))) ** 2).sum(axis=0) <= radius_mm**2


def _attached(lesion: np.ndarray, dense: np.ndarray, around: np.ndarray) -> int:
    """How many voxels of ``dense`` connect to ``lesion`` within ``around`` (a structuring
    element) of it, outside it: what goes on from a lesion into its surroundings."""
    near = (ndimage.binary_dilation(lesion, around) & dense) | lesion
    pieces = ndimage.label(near, _CONNECTIVITY)[0]
    return int((np.isin(pieces, pieces[lesion]) & ~lesion).sum())


def _outlined(
    mask: np.ndarray,
    elsewhere: Callable[[tuple[slice, ...]], np.ndarray],
    parts: list[_Part],
    spec: SegmentSpec,
    pixels: Pixels,
    values: np.ndarray,
    positions: list[np.ndarray],
    source: Grid,
) -> list[_Part]:
    """Each part of ``mask`` redrawn by the series' values (plugin/pipeline.py, Outline),
    one after the other; ``mask`` becomes the redrawn parts. A part takes only voxels nearer
    to it than to the other parts and to ``elsewhere(box)`` (the other segments' voxels in
    ``box``), and none next to them. A part scored under the segment's
    ``min_mean_probability`` (let through for ``outline.alone``) is kept only if it stands
    alone; those are judged first, so that one dropped claims no voxel from the others. The
    others, with ``outline.apart``, are kept only if they stand apart, judged as they are
    redrawn (one dropped may already have kept a lesion redrawn before it from voxels nearer
    to it). ``values`` ``[1, ...]``: the segment's probabilities on the model's grid."""
    outline = spec.outline
    assert outline is not None  # _lesions calls this for a segment with an outline
    ball = _ball(source.spacing, outline.reach_mm)
    on_probation = [outline.alone is not None and bool(part[2].mean() < spec.min_mean_probability) for part in parts]
    redrawn: list[_Part] = []
    for (box, inside, probability), probation in sorted(zip(parts, on_probation, strict=True), key=lambda p: not p[1]):
        judge = outline.alone if probation else outline.apart
        around = np.ones((1, 1, 1), dtype=bool) if judge is None else _ball(source.spacing, judge.reach_mm)
        # twice the reach and a voxel: the other outlines that can claim a voxel in reach, and
        # the voxels next to one; for a lesion judged, as far again as it is judged
        wide = tuple(
            slice(max(b.start - m - a // 2, 0), min(b.stop + m + a // 2, n))
            for b, m, a, n in zip(box, ball.shape, around.shape, source.shape, strict=True)
        )
        lesion = np.zeros([w.stop - w.start for w in wide], dtype=bool)
        lesion[tuple(slice(b.start - w.start, b.stop - w.start) for b, w in zip(box, wide, strict=True))] = inside
        others = (mask[wide] & ~lesion) | elsewhere(wide)
        dense = pixels(wide[0])[:, wide[1], wide[2]] >= outline.min_value
        candidate = (
            ndimage.binary_dilation(lesion, ball)
            & dense
            & (_on_source(values, positions, wide)[0] >= outline.min_probability)
        )
        if others.any():
            to_lesion, to_others = (
                ndimage.distance_transform_edt(~m, sampling=source.spacing) for m in (lesion, others)
            )
            candidate &= (to_lesion < to_others) & ~ndimage.binary_dilation(others, _CONNECTIVITY)
        pieces = ndimage.label(candidate, _CONNECTIVITY)[0]
        # every piece that holds some of it: one lesion the model drew stays one (it may
        # come apart where the values between its pieces fall under min_value)
        kept = np.isin(pieces, pieces[lesion & candidate])
        if judge is not None:
            # one on probation with no voxel at min_value is dropped; any other keeps the model's outline
            unseen = probation and not kept.any()
            if unseen or _attached(kept, dense, around) > judge.max_attached * kept.sum():
                mask[wide] &= ~lesion
                continue
        if not kept.any():  # nothing of it at min_value: the model's outline stays
            redrawn.append((box, inside, probability))
            continue
        mask[wide] &= ~lesion
        mask[wide] |= kept
        [where] = ndimage.find_objects(kept.astype(np.uint8))
        redrawn.append(
            (
                tuple(slice(w.start + k.start, w.start + k.stop) for w, k in zip(wide, where, strict=True)),
                kept[where],
                probability,
            )
        )
    return redrawn


def _lesions(
    mask: np.ndarray,
    grown: np.ndarray | None,
    spec: SegmentSpec,
    number: int,
    values: np.ndarray,
    positions: list[np.ndarray],
    source: Grid,
    elsewhere: Callable[[tuple[slice, ...]], np.ndarray],
    pixels: Pixels | None,
) -> list[Lesion]:
    """The lesions of segment ``number``, measured: the connected parts of its ``mask``
    (voxels at or above its threshold) that pass its lesion filters, grown into ``grown``
    (those at or above its ``grow_threshold``; None: not grown; the parts that fail the
    filters are cleared from it), then redrawn by the series' values where the segment has
    an ``outline`` (:func:`_outlined`, with ``elsewhere`` and ``pixels``). ``mask`` becomes
    the lesions' voxels. ``values`` ``[1, ...]``: the segment's probabilities on the model's grid."""
    parts = _detected(mask, grown, spec, values, positions, source)
    if grown is not None:
        parts = _grown(mask, grown, values, positions)
    if spec.outline is not None and pixels is not None:  # segment() checks that an outline has pixels
        parts = _outlined(mask, elsewhere, parts, spec, pixels, values, positions, source)
    voxel_mm3 = abs(float(np.linalg.det(source.affine[:3, :3])))
    found = []
    for box, inside, probability in parts:
        voxels = np.argwhere(inside) + [b.start for b in box]
        centroid = source.to_patient(voxels.mean(axis=0, keepdims=True))[0]
        found.append(
            Lesion(
                label=spec.label,
                segment_number=number,
                number=0,
                volume_mm3=int(inside.sum()) * voxel_mm3,
                diameter_mm=_longest_diameter(inside, source.affine[:3, 1:3]),
                centroid=(float(centroid[0]), float(centroid[1]), float(centroid[2])),
                mean_probability=float(probability.mean()),
                max_probability=float(probability.max()),
                slices=tuple(range(box[0].start, box[0].stop)),
            )
        )
    return found


def segment(
    postprocess: Postprocess, classes: list[str], output: ModelOutput, pixels: Pixels | None = None
) -> Segmentation:
    """The pipeline's segments and their lesions on the job's series (see the module's
    docstring). Takes the logits out of ``output`` (:meth:`ModelOutput.take_logits`): they
    are freed once their probabilities are made, before the lesions are searched.
    ``pixels`` reads the series' values, for the segments that have an ``outline``."""
    logits, placement = output.logits, output.volume
    if logits.ndim != 5 or logits.shape[0] != 1 or placement is None:
        raise ValueError(
            f"the model gave output of shape {list(logits.shape)}; segmentation needs per-voxel output "
            "[1, classes, depth, height, width] on a volume"
        )
    if logits.shape[1] != len(classes) or tuple(logits.shape[2:]) != placement.grid.shape:
        raise ValueError(
            f"the model gave output of shape {list(logits.shape)}; its {len(classes)} classes on its grid "
            f"{list(placement.grid.shape)} need [1, {len(classes)}, {', '.join(map(str, placement.grid.shape))}]"
        )
    softmax = postprocess.activation == "softmax"
    for spec in postprocess.segments:
        if spec.label not in classes:
            raise ValueError(f"segment {spec.label!r} is not a class of the model {classes}")
        if softmax and spec.label == classes[0]:
            raise ValueError(f"segment {spec.label!r} is the background (the first class) of a softmax model")
        if spec.outline is not None and pixels is None:
            raise ValueError(f"segment {spec.label!r} is outlined by the series' values, and none were given")
    source = placement.source
    axes, positions = _source_axes(source, placement.grid)
    with torch.no_grad():
        scores = output.take_logits()[0].detach().float().cpu()
        del logits
        if softmax:
            # every non-background class is kept (a voxel goes to the most probable), made slab
            # by slab: no whole-volume temporary (the background's probabilities) beside the logits
            on_grid = torch.empty((len(classes) - 1, *scores.shape[1:]))
            slab = max(1, _CHUNK_VOXELS // scores[0, 0].numel())
            for start in range(0, scores.shape[1], slab):
                on_grid[:, start : start + slab] = torch.softmax(scores[:, start : start + slab], dim=0)[1:]
        else:
            on_grid = torch.sigmoid(scores)
        del scores
    channels = [classes.index(s.label) - softmax for s in postprocess.segments]
    if not softmax:
        on_grid, channels = on_grid[channels], list(range(len(channels)))
    values = np.ascontiguousarray(on_grid.permute(0, *(1 + a for a in axes)).numpy())  # axes in source order
    del on_grid  # values is a copy when the axes change

    depth, height, width = source.shape
    thresholds = np.array([s.threshold for s in postprocess.segments], dtype=np.float32).reshape(-1, 1, 1, 1)
    growing = [s.grow_threshold is not None and s.grow_threshold < s.threshold for s in postprocess.segments]
    lows = np.array(
        [s.threshold if s.grow_threshold is None else s.grow_threshold for s in postprocess.segments], dtype=np.float32
    ).reshape(-1, 1, 1, 1)
    masks = np.zeros((len(channels), *source.shape), dtype=bool)
    grown = np.zeros((len(channels), *source.shape), dtype=bool) if any(growing) else masks
    probabilities = np.zeros((len(channels), *source.shape), dtype=np.uint8)
    chunk = max(1, _CHUNK_VOXELS // (len(values) * height * width))
    for start in range(0, depth, chunk):  # by chunks of slices: only the masks and uint8 probabilities are whole
        part = slice(start, start + chunk)
        sampled = _on_source(values, positions, (part, slice(None), slice(None)))
        chosen = sampled[channels]
        inside, low = chosen >= thresholds, chosen >= lows
        if softmax and len(values) > 1:
            most = torch.from_numpy(sampled).argmax(dim=0).numpy() == np.reshape(channels, (-1, 1, 1, 1))
            inside, low = inside & most, low & most
        masks[:, part] = inside
        if any(growing):
            grown[:, part] = low
        probabilities[:, part] = np.rint(chosen * 255)

    lesions: list[Lesion] = []
    for number, (spec, channel) in enumerate(zip(postprocess.segments, channels, strict=True), start=1):
        rim = grown[number - 1] if growing[number - 1] else None

        def elsewhere(box: tuple[slice, ...], number: int = number) -> np.ndarray:
            return np.asarray(np.delete(masks[(slice(None), *box)], number - 1, axis=0).any(axis=0))

        found = _lesions(
            masks[number - 1], rim, spec, number, values[channel : channel + 1], positions, source, elsewhere, pixels
        )
        lesions += sorted(found, key=lambda lesion: -lesion.volume_mm3)
    lesions = [dataclasses.replace(lesion, number=i) for i, lesion in enumerate(lesions, start=1)]
    return Segmentation(list(postprocess.segments), masks, probabilities, lesions)
