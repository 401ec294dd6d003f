"""Synthetic chest-CT phantom in Hounsfield units, numpy only.

Why it exists: no medical data set can be downloaded, so the demo model, the tests and
``radpipe demo`` all run on slices drawn here. A "patient" is a set of smooth functions of
z (body, fat, lungs, heart, ribs, spine, lung texture) plus a 3D vessel tree; a slice is
that patient rendered at one z, so consecutive slices of a volume vary smoothly. Nodules
are spheres; hard negatives carry extra vessels running along z, whose round cross-sections
look like small nodules in any single slice.

Coordinates are in mm, image-plane origin at the centre; x grows towards the patient's left
(image columns), y towards posterior (image rows), as in DICOM's LPS with an axial
orientation of [1, 0, 0, 0, 1, 0].
"""

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SIZE = 512
PIXEL_SPACING_MM = 0.7
AIR_HU, FAT_HU, SOFT_HU, LUNG_HU, BONE_HU = -1000.0, -100.0, 40.0, -850.0, 700.0
NODULE_RADIUS_MM = (2.0, 12.0)
NODULE_HU = (-100.0, 100.0)
VESSEL_RADIUS_MM = (1.0, 3.0)
# A nodule counts as visible in a slice when its cross-section radius is at least half the
# sphere's and at least the widest vessel's: a thinner cut looks exactly like a vessel seen
# end-on, so no reader of that slice alone could call it a nodule.
VISIBLE_FRACTION = 0.5

_CENTRE_PX = (SIZE - 1) / 2
_AXIS_MM = ((np.arange(SIZE) - _CENTRE_PX) * PIXEL_SPACING_MM).astype(np.float32)
_X, _Y = _AXIS_MM[None, :], _AXIS_MM[:, None]  # broadcast: x along columns, y along rows
_TEXTURE_GRID_MM = 16.0


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Linear-interpolation weights [n_out, n_in] spanning the same extent (for smooth noise)."""
    pos = np.linspace(0, n_in - 1, n_out)
    low = np.clip(np.floor(pos).astype(int), 0, n_in - 2)
    frac = (pos - low).astype(np.float32)
    weights = np.zeros((n_out, n_in), np.float32)
    weights[np.arange(n_out), low] = 1 - frac
    weights[np.arange(n_out), low + 1] = frac
    return weights


_TEXTURE_CELLS = int(SIZE * PIXEL_SPACING_MM / _TEXTURE_GRID_MM) + 2
_TEXTURE_UPSAMPLE = _interp_matrix(SIZE, _TEXTURE_CELLS)


@dataclass(frozen=True)
class _Patient:
    """Everything about one synthetic patient that does not depend on the slice position."""

    body_a: float  # lateral semi-axis of the body ellipse
    body_b: float  # antero-posterior semi-axis
    body_cy: float
    fat: float  # subcutaneous fat thickness
    mediastinum: float  # half-width of the mediastinum
    heart: tuple[float, float, float, float, float]  # cx, cy, a, b, z of its widest section
    lung_phase: float
    rib_angles: np.ndarray
    rib_drift: float  # rad/mm: ribs slant, so their cross-sections move along z
    vessel_hu: float
    vessels: np.ndarray  # [K, 4] spheres (x, y, z, r) whose union is the vessel tree
    texture: np.ndarray  # [nz, cells, cells] coarse lung-texture grid, HU
    texture_z0: float
    noise_hu: float


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _segments_to_spheres(start: np.ndarray, end: np.ndarray, radius: np.ndarray) -> np.ndarray:
    """Sample each tube densely enough with spheres that their union looks like a tube."""
    length = np.linalg.norm(end - start, axis=1)
    counts = np.maximum(2, np.ceil(length / (0.6 * radius)).astype(int) + 1)
    seg = np.repeat(np.arange(len(start)), counts)
    first = np.cumsum(counts) - counts
    t = (np.arange(counts.sum()) - np.repeat(first, counts)) / np.repeat(counts - 1, counts)
    points = start[seg] + (end - start)[seg] * t[:, None]
    return np.column_stack([points, radius[seg]]).astype(np.float32)


def _vessel_tree(rng: np.random.Generator, hilum: np.ndarray, side: float, roots: int = 8) -> np.ndarray:
    """Branching tree from a hilum, each generation 2 children 0.8x thinner, as spheres."""
    start = np.repeat(hilum[None], roots, axis=0)
    direction = rng.normal(size=(roots, 3))
    direction[:, 0] = side * (np.abs(direction[:, 0]) + 0.4)
    direction = _unit(direction)
    radius = np.full(roots, VESSEL_RADIUS_MM[1])
    starts, ends, radii = [], [], []
    while radius[0] >= VESSEL_RADIUS_MM[0]:
        end = start + direction * rng.uniform(12, 26, len(start))[:, None]
        starts.append(start)
        ends.append(end)
        radii.append(radius)
        start = np.repeat(end, 2, axis=0)
        direction = _unit(np.repeat(direction, 2, axis=0) + rng.normal(scale=0.55, size=(len(start), 3)))
        radius = np.repeat(radius * 0.8, 2)
    return _segments_to_spheres(np.concatenate(starts), np.concatenate(ends), np.concatenate(radii))


def _new_patient(rng: np.random.Generator, z_range: tuple[float, float]) -> _Patient:
    body_a, body_b = rng.uniform(150, 172), rng.uniform(108, 125)
    body_cy = rng.uniform(-5, 10)
    z_mid = (z_range[0] + z_range[1]) / 2
    mediastinum = rng.uniform(20, 30)
    hilum_y = body_cy + rng.uniform(-5, 10)
    # Each tree starts inside the mediastinum, so where its roots meet (a nodule-sized clump)
    # is hidden in soft tissue; the lungs only show them already apart.
    trees = [
        _vessel_tree(rng, np.array([side * (mediastinum - 15), hilum_y, z_mid + rng.uniform(-25, 25)]), side)
        for side in (-1.0, 1.0)
    ]
    n_texture_z = int((z_range[1] - z_range[0]) / _TEXTURE_GRID_MM) + 2
    return _Patient(
        body_a=body_a,
        body_b=body_b,
        body_cy=body_cy,
        fat=rng.uniform(8, 20),
        mediastinum=mediastinum,
        heart=(
            rng.uniform(5, 25),
            body_cy - rng.uniform(15, 30),
            rng.uniform(45, 60),
            rng.uniform(38, 50),
            z_mid + rng.uniform(-120, 0),
        ),
        lung_phase=rng.uniform(0, 2 * np.pi),
        rib_angles=np.linspace(-np.pi, np.pi, 14, endpoint=False) + rng.uniform(-0.1, 0.1, 14),
        rib_drift=rng.uniform(0.01, 0.02),
        vessel_hu=rng.uniform(25, 55),
        vessels=np.concatenate(trees),
        texture=rng.normal(scale=rng.uniform(25, 45), size=(n_texture_z, _TEXTURE_CELLS, _TEXTURE_CELLS)).astype(
            np.float32
        ),
        texture_z0=z_range[0],
        noise_hu=rng.uniform(10, 20),
    )


def _with_vessels(patient: _Patient, extra: np.ndarray) -> _Patient:
    return _Patient(**{**patient.__dict__, "vessels": np.concatenate([patient.vessels, extra])})


def _splat(x: np.ndarray, y: np.ndarray, r: np.ndarray, half_px: int, edge_mm: float = 0.7) -> np.ndarray:
    """Occupancy in [0, 1] of a set of discs (mm), soft-edged, accumulated with bincount."""
    if len(x) == 0:
        return np.zeros((SIZE, SIZE), np.float32)
    col, row = x / PIXEL_SPACING_MM + _CENTRE_PX, y / PIXEL_SPACING_MM + _CENTRE_PX
    offsets = np.arange(-half_px, half_px + 1)
    gx = np.rint(col).astype(int)[:, None, None] + offsets[None, None, :]
    gy = np.rint(row).astype(int)[:, None, None] + offsets[None, :, None]
    dist_mm = np.hypot(gx - col[:, None, None], gy - row[:, None, None]) * PIXEL_SPACING_MM
    occ = np.clip((r[:, None, None] - dist_mm) / edge_mm + 0.5, 0.0, 1.0)
    keep = (occ > 0) & (gx >= 0) & (gx < SIZE) & (gy >= 0) & (gy < SIZE)
    flat = np.broadcast_to(gy * SIZE + gx, occ.shape)[keep]
    acc = np.bincount(flat, weights=occ[keep], minlength=SIZE * SIZE)
    return np.minimum(acc, 1.0).reshape(SIZE, SIZE).astype(np.float32)


def _ellipse(cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((_X - cx) / a) ** 2 + ((_Y - cy) / b) ** 2 < 1


def _lung_mask(p: _Patient, z: float) -> np.ndarray:
    scale = 0.92 + 0.08 * np.cos(z / 90 + p.lung_phase)  # lungs widen and narrow along z
    cavity_a, cavity_b = (p.body_a - p.fat - 16) * scale, (p.body_b - p.fat - 16) * scale
    hx, hy, ha, hb, hz = p.heart
    heart_scale = np.exp(-(((z - hz) / 90) ** 2))
    half_width = (cavity_a - p.mediastinum) / 2
    lobes = _ellipse(p.mediastinum + half_width, p.body_cy, half_width * 1.1, cavity_b * 1.05)
    lungs = _ellipse(0, p.body_cy, cavity_a, cavity_b) & (lobes | lobes[:, ::-1])
    lungs &= ~_ellipse(0, _spine_y(p), 30, 30)
    if heart_scale > 0.2:
        lungs &= ~_ellipse(hx, hy, ha * heart_scale, hb * heart_scale)
    return lungs


def _texture(p: _Patient, z: float) -> np.ndarray:
    pos = np.clip((z - p.texture_z0) / _TEXTURE_GRID_MM, 0, len(p.texture) - 1.001)
    low = int(pos)
    frac = np.float32(pos - low)
    grid = p.texture[low] * (1 - frac) + p.texture[min(low + 1, len(p.texture) - 1)] * frac
    return _TEXTURE_UPSAMPLE @ grid @ _TEXTURE_UPSAMPLE.T


def _section(spheres: np.ndarray, z: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y and cross-section radius of the spheres the plane z cuts."""
    dz = spheres[:, 2] - z
    hit = np.abs(dz) < spheres[:, 3]
    return spheres[hit, 0], spheres[hit, 1], np.sqrt(spheres[hit, 3] ** 2 - dz[hit] ** 2)


def _spine_y(p: _Patient) -> float:
    """Centre of the vertebral body."""
    return p.body_cy + p.body_b - p.fat - 40


def _nodule_occupancy(nodule: np.ndarray, z: float) -> np.ndarray | None:
    """Soft-edged occupancy of a nodule's (x, y, z, radius, HU) cross-section at ``z``; None where it misses."""
    x, y, nz, radius, _ = nodule
    if abs(nz - z) >= radius:
        return None
    section = np.sqrt(radius**2 - (nz - z) ** 2)
    half = int(section / PIXEL_SPACING_MM) + 4
    return _splat(np.array([x]), np.array([y]), np.array([section]), half, edge_mm=0.25 * radius)


def _nodule_labels(nodules: np.ndarray, z: float, lungs: np.ndarray) -> np.ndarray:
    """Where :func:`_render` draws each nodule at ``z``: 0 elsewhere, ``i + 1`` for ``nodules[i]``.
    A pixel belongs to a nodule where the nodule's share of its HU is at least half."""
    labels = np.zeros((SIZE, SIZE), np.uint8)
    for index, nodule in enumerate(nodules):
        occ = _nodule_occupancy(nodule, z)
        if occ is not None:
            labels[occ * lungs >= 0.5] = index + 1
    return labels


def _render(rng: np.random.Generator, p: _Patient, z: float, lungs: np.ndarray, nodules: np.ndarray) -> np.ndarray:
    """One axial slice at ``z`` (``lungs``: its lung mask; ``nodules``: [M, 5] x, y, z, radius, HU)."""
    image = np.full((SIZE, SIZE), AIR_HU, np.float32)
    inner_a, inner_b = p.body_a - p.fat, p.body_b - p.fat
    image[_ellipse(0, p.body_cy, p.body_a, p.body_b)] = FAT_HU
    image[_ellipse(0, p.body_cy, inner_a, inner_b)] = SOFT_HU
    image = np.where(lungs, LUNG_HU + _texture(p, z), image)

    vx, vy, vr = _section(p.vessels, z)
    vessels = _splat(vx, vy, vr, half_px=6) * lungs
    image += vessels * (p.vessel_hu - image)
    for nodule in nodules:
        occ = _nodule_occupancy(nodule, z)
        if occ is not None:
            image += occ * lungs * (nodule[4] - image)

    # Bone last. Ribs: pairs of discs on an ellipse just inside the muscle, drifting with z.
    # Spine: vertebral body, two laminae around the canal, spinous process. Then the sternum.
    angles = p.rib_angles + p.rib_drift * z
    angles = angles[np.abs(np.cos(angles)) > 0.3]  # ribs end before the sternum and the spine
    ring_a, ring_b = inner_a - 7, inner_b - 7
    spine_y = _spine_y(p)
    bone_x = np.concatenate([ring_a * np.cos(angles), (ring_a - 4) * np.cos(angles + 0.03), [0, -9, 9, 0, 0]])
    bone_y = np.concatenate(
        [
            p.body_cy + ring_b * np.sin(angles),
            p.body_cy + (ring_b - 4) * np.sin(angles + 0.03),
            spine_y + np.array([0, 25, 25, 37, -(2 * inner_b - 44)]),
        ]
    )
    bone_r = np.concatenate([np.full(2 * len(angles), 4.5), [16, 4.5, 4.5, 5, 7]])
    bone = _splat(bone_x, bone_y, bone_r, half_px=25)
    image += bone * (BONE_HU - image)

    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(p.noise_hu)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16)


def _lung_points(rng: np.random.Generator, lungs: np.ndarray, n: int, margin_mm: float) -> np.ndarray:
    """``n`` (x, y) points inside the ``lungs`` mask, at least ``margin_mm`` from its edge."""
    candidates = np.flatnonzero(lungs)
    ring = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    found: list[tuple[float, float]] = []
    for _ in range(200):
        if len(found) == n:
            break
        row, col = divmod(int(rng.choice(candidates)), SIZE)
        x, y = float(_AXIS_MM[col]), float(_AXIS_MM[row])
        cols = np.rint((x + margin_mm * np.cos(ring)) / PIXEL_SPACING_MM + _CENTRE_PX).astype(int)
        rows = np.rint((y + margin_mm * np.sin(ring)) / PIXEL_SPACING_MM + _CENTRE_PX).astype(int)
        inside = (cols >= 0) & (cols < SIZE) & (rows >= 0) & (rows < SIZE)
        if inside.all() and lungs[rows, cols].all():
            found.append((x, y))
    if len(found) < n:
        raise RuntimeError("phantom: could not place points inside the lungs")
    return np.array(found, np.float32)


def _extra_vessels(rng: np.random.Generator, lungs: np.ndarray, z: float, count: int) -> np.ndarray:
    """Vessels running roughly along z (``lungs``: mask at ``z``): round cross-sections, the hard negatives."""
    xy = _lung_points(rng, lungs, count, margin_mm=VESSEL_RADIUS_MM[1] + 2)
    centre = np.column_stack([xy, np.full(count, z) + rng.uniform(-10, 10, count)])
    direction = _unit(np.column_stack([rng.normal(scale=0.25, size=(count, 2)), np.ones(count)]))
    half = rng.uniform(20, 40, count)[:, None] * direction
    radius = rng.uniform(1.5, VESSEL_RADIUS_MM[1], count)
    return _segments_to_spheres(centre - half, centre + half, radius)


def _nodule(
    rng: np.random.Generator, lungs: np.ndarray, z: float, min_radius: float = NODULE_RADIUS_MM[0]
) -> tuple[float, ...]:
    """(x, y, z, radius, HU) of a nodule centred at ``z`` inside ``lungs``, the mask there."""
    radius = rng.uniform(min_radius, NODULE_RADIUS_MM[1])
    x, y = _lung_points(rng, lungs, 1, margin_mm=radius + 2)[0]
    return (x, y, z, radius, rng.uniform(*NODULE_HU))


def _visible_reach(radius: np.ndarray) -> np.ndarray:
    """Half-thickness of the slab around a nodule's centre where it is visible; < 0: nowhere."""
    section = np.maximum(radius * VISIBLE_FRACTION, VESSEL_RADIUS_MM[1])
    return np.where(radius >= section, np.sqrt(np.maximum(radius**2 - section**2, 0)), -1.0)


def _visible(nodules: np.ndarray, z: float) -> bool:
    return bool((np.abs(nodules[:, 2] - z) <= _visible_reach(nodules[:, 3])).any())


def _nodule_set(rng: np.random.Generator, centres: Sequence[float], masks: Sequence[np.ndarray]) -> np.ndarray:
    """[M, 5] nodules centred at z = ``centres`` (lung ``masks`` there); the first is wide enough to show."""
    rows = [
        _nodule(rng, lungs, c, min_radius=VESSEL_RADIUS_MM[1] if i == 0 else NODULE_RADIUS_MM[0])
        for i, (c, lungs) in enumerate(zip(centres, masks, strict=True))
    ]
    return np.array(rows, np.float32).reshape(-1, 5)


@dataclass(frozen=True)
class PhantomVolume:
    """A rendered volume and where the phantom put its nodules (the truth a segmenter is scored on).

    ``hu``: [n, 512, 512] int16, slice ``i`` at z = ``i * slice_thickness_mm``; ``labels``: [n]
    uint8, 1 where a nodule is visible (see ``VISIBLE_FRACTION``); ``nodules``: [M, 5] x, y, z,
    radius (mm) and HU of each sphere; ``mask``: [n, 512, 512] uint8, ``i + 1`` where
    ``nodules[i]`` is drawn (clipped to the lungs, as rendered), 0 elsewhere.
    """

    hu: np.ndarray
    labels: np.ndarray
    nodules: np.ndarray
    mask: np.ndarray
    slice_thickness_mm: float


def render_volume(
    rng: np.random.Generator,
    n_slices: int,
    n_nodules: int,
    slice_thickness_mm: float = 2.5,
    end_on_vessels: bool = False,
) -> PhantomVolume:
    """A contiguous axial volume with ``n_nodules`` spheres centred on random slices, and its truth.

    A slice's label is 1 where one of the nodules is visible, which the first always is on
    its centre slice. A volume without nodules is a hard negative: it carries extra vessels
    seen end-on; ``end_on_vessels`` puts them beside the nodules too (a segmenter has to see
    them beside nodules to learn that they are not). The truth costs no random numbers: the
    same ``rng`` state gives the same pixels as before truth was recorded.
    """
    z = np.arange(n_slices, dtype=np.float64) * slice_thickness_mm
    patient = _new_patient(rng, (float(z[0]), float(z[-1])))
    centres = rng.choice(z, size=n_nodules, replace=n_nodules > n_slices).tolist()
    nodules = _nodule_set(rng, centres, [_lung_mask(patient, c) for c in centres])
    if end_on_vessels or not n_nodules:
        mid = float(z[n_slices // 2])
        extra = _extra_vessels(rng, _lung_mask(patient, mid), mid, int(rng.integers(6, 13)))
        patient = _with_vessels(patient, extra)
    lungs = [_lung_mask(patient, zi) for zi in z]
    volume = np.stack([_render(rng, patient, float(zi), mask, nodules) for zi, mask in zip(z, lungs, strict=True)])
    truth = np.stack([_nodule_labels(nodules, float(zi), mask) for zi, mask in zip(z, lungs, strict=True)])
    labels = np.array([_visible(nodules, float(zi)) for zi in z], np.uint8)
    return PhantomVolume(volume, labels, nodules, truth, slice_thickness_mm)


def make_volume(
    rng: np.random.Generator, n_slices: int, n_nodules: int, slice_thickness_mm: float = 2.5
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`render_volume`'s [n, 512, 512] int16 HU and per-slice labels [n] uint8."""
    rendered = render_volume(rng, n_slices, n_nodules, slice_thickness_mm)
    return rendered.hu, rendered.labels


def make_slices(rng: np.random.Generator, n: int, positive_fraction: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """``n`` independent slices (each from a new patient) and labels, shuffled.

    Exactly ``round(n * positive_fraction)`` slices carry 1-3 nodules, at least one of them
    visible (see ``VISIBLE_FRACTION``); the others are cut anywhere. Half of all
    slices, positive or not, carry extra end-on vessels, so that "round blob" alone does
    not mean "nodule" and the number of blobs is no shortcut.
    """
    labels = np.zeros(n, np.uint8)
    labels[: round(n * positive_fraction)] = 1
    rng.shuffle(labels)
    images = np.empty((n, SIZE, SIZE), np.int16)
    for i, label in enumerate(labels):
        z = float(rng.uniform(-40, 40))
        patient = _new_patient(rng, (z - 1, z + 1))
        lungs = _lung_mask(patient, z)
        if rng.random() < 0.5:
            patient = _with_vessels(patient, _extra_vessels(rng, lungs, z, int(rng.integers(4, 13))))
        count = int(rng.integers(1, 4)) if label else 0
        nodules = _nodule_set(rng, [z] * count, [lungs] * count)
        reach = nodules[:, 3].copy()
        reach[:1] = _visible_reach(reach[:1])
        nodules[:, 2] += rng.uniform(-1, 1, count) * reach  # the first where visible, others anywhere
        images[i] = _render(rng, patient, z, lungs, nodules)
    return images, labels
