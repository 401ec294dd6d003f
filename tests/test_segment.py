"""Segmentation pipelines: a per-voxel model output, on whatever grid the model saw, comes
back exactly onto the series' own voxels; spheres in it become lesions with the sphere's
volume, diameter and centre; and the pipeline keys that ask for it load or fail at their
line and column."""

import dataclasses
import json
import textwrap
import weakref

import numpy as np
import pytest
import torch
import yaml
from scipy import ndimage

from plugin.pipeline import PipelineError, Postprocess, load_pipeline, load_pipeline_files
from plugin.postprocess import ModelOutput
from plugin.segment import _parts, segment
from plugin.volume import Grid, Placement, Resampling
from tests.conftest import DEMO_PIPELINE

NODULE = {"label": "nodule", "code": ["SCT", "27925004", "Nodule"]}
CLASSES = ["background", "nodule"]


def _grid(shape, columns, origin) -> Grid:
    """A grid whose affine has ``columns`` (direction x spacing of d, h, w) and ``origin``."""
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack(columns)
    affine[:3, 3] = origin
    return Grid(shape, affine)


# An axial series as the loader stacks it (slices feet to head, SPL): 1 mm slices of 0.7 mm pixels.
SOURCE = _grid((48, 112, 112), [[0, 0, 1.0], [0, 0.7, 0], [0.7, 0, 0]], [-39.2, -39.2, -24.0])


def _positions(grid: Grid) -> np.ndarray:
    """Patient coordinates of every voxel centre, ``[D, H, W, 3]``."""
    indices = np.indices(grid.shape).reshape(3, -1).T
    return grid.to_patient(indices.astype(float)).reshape(*grid.shape, 3)


def _run(logits: np.ndarray, grid: Grid, postprocess: dict, classes=CLASSES, source: Grid = SOURCE, pixels=None):
    output = ModelOutput(torch.from_numpy(logits[None]).float(), Placement(source, grid, np.zeros((1, 3))))
    return segment(Postprocess.model_validate(postprocess), classes, output, pixels)


def _logit(p: np.ndarray) -> np.ndarray:
    return np.log(p / (1 - p))


# --- back onto the source, exactly ----------------------------------------------------------------


def test_a_grid_shared_with_the_source_gives_the_output_back():
    logits = np.random.default_rng(0).normal(0, 2, (1, *SOURCE.shape)).astype(np.float32)
    result = _run(logits, SOURCE, {"activation": "sigmoid", "segments": [{**NODULE, "threshold": 0.7}]}, ["nodule"])
    p = torch.sigmoid(torch.from_numpy(logits)).numpy()
    np.testing.assert_array_equal(result.probabilities, np.rint(p * 255).astype(np.uint8))
    np.testing.assert_array_equal(result.masks, p >= np.float32(0.7))


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "IAR", "PSL"])
def test_a_reoriented_grid_lines_up_voxel_for_voxel(orientation):
    """The model saw the series flipped and permuted (Resampling, as the runner does): each
    source voxel gets exactly the value the model gave that same voxel."""
    logits = torch.from_numpy(np.random.default_rng(1).normal(0, 2, SOURCE.shape).astype(np.float32))
    resampling = Resampling(SOURCE, orientation, None)
    sigmoid = {"activation": "sigmoid", "segments": [NODULE]}
    result = _run(resampling(logits)[None].numpy(), resampling.target, sigmoid, ["nodule"])
    np.testing.assert_array_equal(result.probabilities[0], np.rint(torch.sigmoid(logits).numpy() * 255))


def test_a_resampled_grid_gives_back_a_linear_function_of_position():
    """On a RAS grid of 1.3 x 1.1 x 1.7 mm, cropped by 3 voxels on each side (as
    crop_or_pad does), the probability is a linear function of patient position: trilinear
    interpolation reproduces it at every source voxel the grid covers, a voxel within half a
    model voxel beyond it takes the edge value, and one farther out probability 0."""
    target = Resampling(SOURCE, "RAS", (1.3, 1.1, 1.7)).target
    grid = target.mapped([n - 6 for n in target.shape], [1, 1, 1], [3, 3, 3])

    def f(points: np.ndarray) -> np.ndarray:
        return 0.5 + points @ np.array([0.004, -0.003, 0.006])

    logits = _logit(f(_positions(grid)))[None].astype(np.float32)
    result = _run(logits, grid, {"activation": "sigmoid", "segments": [{**NODULE, "threshold": 0.05}]}, ["nodule"])

    index = grid.to_index(_positions(SOURCE).reshape(-1, 3))
    upper = np.array(grid.shape) - 1
    covered = np.all((index >= 0) & (index <= upper), axis=-1).reshape(SOURCE.shape)
    unseen = np.any((index < -0.5) | (index > upper + 0.5), axis=-1).reshape(SOURCE.shape)
    margin = ~covered & ~unseen
    assert covered.mean() > 0.4 and unseen.mean() > 0.2 and margin.mean() > 0.01
    # in the margin: the value at the nearest point of the grid
    expected = f(grid.to_patient(np.clip(index, 0, upper))).reshape(SOURCE.shape) * 255
    assert np.abs(result.probabilities[0][~unseen] - expected[~unseen]).max() <= 0.5 + 1e-3
    assert not result.probabilities[0][unseen].any()
    np.testing.assert_array_equal(result.masks[0], ~unseen)  # f > 0.08 wherever the model looked


# --- lesions --------------------------------------------------------------------------------------

# (centre LPS mm, radius mm): centres off the pixel grid, on slice centres (so a slice cuts each
# sphere through its middle and its longest axial diameter is 2r), radii not a whole number of
# slices (so no slice just touches a sphere)
SPHERES = [((10.3, -12.55, 5.0), 6.3), ((-15.2, 8.05, -10.0), 4.2), ((14.1, 17.3, -12.0), 2.6)]


def _spheres(grid: Grid, spheres) -> np.ndarray:
    """Softmax logits [background, nodule] whose nodule probability falls through 0.5 at
    each sphere's surface."""
    positions = _positions(grid)
    inside = np.full(grid.shape, -np.inf)
    for centre, radius in spheres:
        inside = np.maximum(inside, radius - np.linalg.norm(positions - np.array(centre), axis=-1))
    return np.stack([np.zeros(grid.shape), 2.0 * inside]).astype(np.float32)  # 2/mm: a smooth edge


def _ellipsoids(grid: Grid, shapes) -> np.ndarray:
    """Softmax logits [background, nodule] for ``(centre, radii, per_mm)`` ellipsoids: the
    nodule logit rises by about ``per_mm`` per mm inside each surface."""
    positions = _positions(grid)
    nodule = np.full(grid.shape, -np.inf)
    for centre, radii, per_mm in shapes:
        inside = (1 - np.linalg.norm((positions - np.array(centre)) / np.array(radii), axis=-1)) * min(radii)
        nodule = np.maximum(nodule, per_mm * inside)
    return np.stack([np.zeros(grid.shape), nodule]).astype(np.float32)


def _nearest(lesions, shapes) -> list:
    """The lesion nearest each shape's centre."""
    return [min(lesions, key=lambda lesion: np.linalg.norm(np.subtract(lesion.centroid, shape[0]))) for shape in shapes]


def test_spheres_become_lesions_measured_in_the_patient():
    """The model saw the series as RAS at 0.8 mm. (Interpolating the spheres' smooth edges
    from coarser grids shrinks them: by about h^2 / 8r along each axis.)"""
    grid = Resampling(SOURCE, "RAS", (0.8, 0.8, 0.8)).target
    result = _run(_spheres(grid, SPHERES), grid, {"segments": [NODULE]})

    assert [lesion.number for lesion in result.lesions] == [1, 2, 3]  # volume descending
    pixel = 0.7
    for lesion, (centre, radius) in zip(result.lesions, SPHERES, strict=True):
        assert (lesion.label, lesion.segment_number) == ("nodule", 1)
        assert lesion.volume_mm3 == pytest.approx(4 / 3 * np.pi * radius**3, rel=0.04)
        assert lesion.diameter_mm == pytest.approx(2 * radius, abs=pixel)
        np.testing.assert_allclose(lesion.centroid, centre, atol=0.1)
        assert 0.5 <= lesion.mean_probability < lesion.max_probability < 1
        z = round(SOURCE.to_index(np.array([centre]))[0, 0])
        assert lesion.slices == tuple(range(z - int(radius), z + int(radius) + 1))
    assert result.masks.shape == (1, *SOURCE.shape) and result.probabilities.dtype == np.uint8
    assert result.masks.sum() * 0.49 == pytest.approx(sum(lesion.volume_mm3 for lesion in result.lesions))


def test_parts_below_min_volume_are_dropped_from_the_mask_too():
    grid = Resampling(SOURCE, "RAS", (1.2, 1.2, 1.2)).target
    spheres = [*SPHERES[:1], ((-5.0, -5.0, 0.0), 1.5)]  # 14 mm3
    result = _run(_spheres(grid, spheres), grid, {"segments": [{**NODULE, "min_volume_mm3": 20}]})
    [lesion] = result.lesions
    assert lesion.centroid == pytest.approx(spheres[0][0], abs=0.1)
    assert result.masks.sum() * 0.49 == pytest.approx(lesion.volume_mm3)


def test_lesions_less_certain_or_flatter_than_the_filters_are_dropped_from_the_mask_too():
    """A ball with a sharp edge is kept; a ball of the same kind with a soft edge (a lower
    mean probability) and a flat disc (an ellipsoid 14 mm wide, 4 mm deep) are dropped."""
    grid = Resampling(SOURCE, "RAS", (0.8, 0.8, 0.8)).target
    shapes = [((10.3, -12.55, 5.0), (6.3, 6.3, 6.3), 2.0), ((-15.2, 8.05, -10.0), (4.2, 4.2, 4.2), 0.3),
              ((15.0, 18.0, -14.0), (7.0, 7.0, 2.0), 2.0)]  # fmt: skip
    logits = _ellipsoids(grid, shapes)

    ball, soft, disc = _nearest(_run(logits, grid, {"segments": [NODULE]}).lesions, shapes)
    compactness = [lesion.volume_mm3 / (np.pi / 6 * lesion.diameter_mm**3) for lesion in (ball, soft, disc)]
    assert soft.mean_probability < 0.65 < min(ball.mean_probability, disc.mean_probability)
    assert compactness[2] < 0.5 < min(compactness[:2])

    filters = {"min_mean_probability": 0.65, "min_compactness": 0.5}
    result = _run(logits, grid, {"segments": [{**NODULE, **filters}]})
    assert [lesion.centroid for lesion in result.lesions] == [ball.centroid]
    assert result.masks.sum() * 0.49 == pytest.approx(ball.volume_mm3)


def test_a_ball_cut_by_the_series_end_is_as_compact_as_a_ball():
    """A ball cut through its middle by the series' first slice, a whole ball and a flat
    disc cut by the last slice: for min_compactness the cut ones count twice their volume,
    so the half ball passes as the whole one does and the half disc still fails. Judged on
    what the series shows, the half ball would be as flat as the disc."""
    grid = Resampling(SOURCE, "RAS", (0.8, 0.8, 0.8)).target
    first, last = SOURCE.to_patient(np.array([[0.0, 0, 0], [47.0, 0, 0]]))[:, 2]
    shapes = [((10.3, -12.55, first), (6.3, 6.3, 6.3), 2.0), ((-15.2, 8.05, 0.0), (6.3, 6.3, 6.3), 2.0),
              ((15.0, 18.0, last), (7.0, 7.0, 2.0), 2.0)]  # fmt: skip
    logits = _ellipsoids(grid, shapes)

    half, whole, disc = _nearest(_run(logits, grid, {"segments": [NODULE]}).lesions, shapes)
    assert half.slices[0] == 0 and disc.slices[-1] == 47 and 0 < whole.slices[0] < whole.slices[-1] < 47
    assert half.volume_mm3 == pytest.approx(whole.volume_mm3 / 2, rel=0.15)  # the half shown, and its mid slice
    compactness = [lesion.volume_mm3 / (np.pi / 6 * lesion.diameter_mm**3) for lesion in (half, whole, disc)]
    assert compactness[0] < 0.5 < compactness[1] and compactness[2] < 0.25

    result = _run(logits, grid, {"segments": [{**NODULE, "min_compactness": 0.6}]})
    assert sorted(lesion.centroid for lesion in result.lesions) == sorted([half.centroid, whole.centroid])


def test_grow_threshold_grows_detected_lesions_to_their_soft_edge():
    """A model that under-segments: its probability falls through 0.5 at 4.4 mm from a 5 mm
    ball's centre and through 0.3 at 5 mm. At threshold 0.5 the lesion is the 4.4 mm ball;
    growing to 0.3 gives the 5 mm ball, in the mask and in its measurements alike. The
    filters judge each lesion as detected, on its voxels at or above 0.5: the ball's mean
    probability there passes 0.7, the grown ball's would not; a speck of 2 mm3 fails
    min_volume_mm3 and does not grow (to 10 mm3, which would pass); a blob that never
    reaches 0.5 is no lesion."""
    grid = Resampling(SOURCE, "RAS", (0.8, 0.8, 0.8)).target
    positions = _positions(grid)
    ball, blob, speck = np.array([10.3, -12.55, 5.0]), np.array([-15.2, 8.05, -10.0]), np.array([15.0, 18.0, -14.0])
    nodule = 1.41 * (4.4 - np.linalg.norm(positions - ball, axis=-1))  # logit 0 at 4.4 mm, -0.85 (p 0.3) at 5 mm
    nodule = np.maximum(nodule, -0.4 - np.linalg.norm(positions - blob, axis=-1))  # p at most 0.4
    nodule = np.maximum(nodule, 2.0 * (1.0 - np.linalg.norm(positions - speck, axis=-1)))
    logits = np.stack([np.zeros(grid.shape), nodule]).astype(np.float32)
    filters = {"min_volume_mm3": 5, "min_mean_probability": 0.7}

    [detected] = _run(logits, grid, {"segments": [{**NODULE, **filters}]}).lesions
    same = _run(logits, grid, {"segments": [{**NODULE, **filters, "grow_threshold": 0.5}]})
    grown = _run(logits, grid, {"segments": [{**NODULE, **filters, "grow_threshold": 0.3}]})
    assert same.lesions == [detected]
    assert detected.volume_mm3 == pytest.approx(4 / 3 * np.pi * 4.4**3, rel=0.05)
    [lesion] = grown.lesions
    assert lesion.volume_mm3 == pytest.approx(4 / 3 * np.pi * 5.0**3, rel=0.05)
    assert lesion.diameter_mm == pytest.approx(10.0, abs=0.7) and detected.diameter_mm < lesion.diameter_mm - 1
    np.testing.assert_allclose(lesion.centroid, ball, atol=0.1)
    assert (lesion.mean_probability, lesion.max_probability) == (detected.mean_probability, detected.max_probability)
    assert grown.probabilities[0][grown.masks[0]].mean() / 255 < 0.7  # the grown voxels' mean fails the filter
    assert grown.masks.sum() * 0.49 == pytest.approx(lesion.volume_mm3)  # the SEG's mask is what the SR measures
    assert (grown.masks >= same.masks).all()
    np.testing.assert_array_equal(grown.probabilities, same.probabilities)


def test_an_outline_redraws_lesions_by_the_series_values():
    """A series of balls of 5 mm radius in lung (-850 HU): three solid (0 HU), two of them
    0.2 mm apart, and a faint one (-700 HU). The model finds all four but draws them smaller
    (probability 0.5 at 4 mm from the centre, 0.18 at 5 mm), one of the close pair smaller
    still (3 mm). Outlined by the series' values at -450 HU, the lone solid ball's mask is
    its voxels exactly; each of the close pair is outlined within its own ball, nearly all
    of it (a voxel goes to the lesion whose outline as drawn is nearer, and a voxel is left
    between them): two lesions in the mask too; the faint one has no voxel at -450 HU and
    keeps the model's outline. Which lesions are found, and their scores, do not change."""
    positions = _positions(SOURCE)
    lone, near, faint = np.array([10.3, -12.55, 5.0]), np.array([-15.2, 8.05, -10.0]), np.array([14.1, 17.3, -12.0])
    balls, drawn_radii = [lone, near, near + np.array([10.2, 0, 0]), faint], [4.0, 4.0, 3.0, 4.0]
    distances = [np.linalg.norm(positions - centre, axis=-1) for centre in balls]
    nodule = np.max([1.5 * (r - d) for r, d in zip(drawn_radii, distances, strict=True)], axis=0)
    logits = np.stack([np.zeros(SOURCE.shape), nodule]).astype(np.float32)
    series = np.full(SOURCE.shape, -850.0, dtype=np.float32)
    for centre, distance in zip(balls, distances, strict=True):
        series[distance <= 5.0] = -700.0 if centre is faint else 0.0
    outlined = {"segments": [{**NODULE, "outline": {"min_value": -450}}]}

    drawn = _run(logits, SOURCE, {"segments": [NODULE]})
    result = _run(logits, SOURCE, outlined, pixels=lambda slices: series[slices])
    assert len(result.lesions) == len(drawn.lesions) == 4
    centres = [(c,) for c in balls]
    for before, after in zip(_nearest(drawn.lesions, centres), _nearest(result.lesions, centres), strict=True):
        assert (after.mean_probability, after.max_probability) == (before.mean_probability, before.max_probability)
    lone_lesion, _, _, faint_lesion = _nearest(result.lesions, centres)
    ball = distances[0] <= 5.0
    np.testing.assert_array_equal(result.masks[0] & (distances[0] <= 9.0), ball)
    assert lone_lesion.volume_mm3 == pytest.approx(ball.sum() * 0.49)
    parts = ndimage.label(result.masks[0], np.ones((3, 3, 3)))[0]
    assert parts.max() == 4  # the close ones did not merge
    for own, other in ((1, 2), (2, 1)):
        part = parts == parts[tuple(np.rint(SOURCE.to_index(balls[own][None])[0]).astype(int))]
        assert not (part & (distances[other] <= 5.0)).any()
        assert (part & (distances[own] <= 5.0)).sum() >= 0.9 * (distances[own] <= 5.0).sum()
    assert faint_lesion.volume_mm3 == _nearest(drawn.lesions, [(faint,)])[0].volume_mm3
    assert result.masks.sum() * 0.49 == pytest.approx(sum(lesion.volume_mm3 for lesion in result.lesions))

    with pytest.raises(ValueError, match="outlined by the series' values, and none were given"):
        _run(logits, SOURCE, outlined)


def test_a_lesion_whose_outline_comes_apart_stays_one_lesion():
    """The model draws one lesion over two balls of 5 mm radius stacked 0.2 mm apart
    (probability 0.5 up to 5.2 mm from either centre). Outlined by the series' values, the
    slice between the balls falls away: the lesion is both balls' voxels, in two pieces,
    still one lesion, measured across them."""
    positions = _positions(SOURCE)
    distances = [np.linalg.norm(positions - centre, axis=-1) for centre in ([-15.2, 8.05, -10.0], [-15.2, 8.05, 0.2])]
    logits = np.stack([np.zeros(SOURCE.shape), np.max([1.5 * (5.2 - d) for d in distances], axis=0)])
    balls = (distances[0] <= 5.0) | (distances[1] <= 5.0)
    series = np.where(balls, 0.0, -850.0)
    result = _run(logits.astype(np.float32), SOURCE, {"segments": [{**NODULE, "outline": {"min_value": -450}}]},
                  pixels=lambda slices: series[slices])  # fmt: skip
    [lesion] = result.lesions
    np.testing.assert_array_equal(result.masks[0], balls)
    assert ndimage.label(balls, np.ones((3, 3, 3)))[1] == 2
    assert lesion.volume_mm3 == pytest.approx(balls.sum() * 0.49)
    assert lesion.diameter_mm == pytest.approx(10.0, abs=0.7)


def test_a_lesion_scored_lower_is_reported_when_it_stands_alone():
    """Lesions the model scores by constant probabilities, in a series of lung (-850 HU)
    with solid balls (0 HU) and vessels along the slices (40 HU): a small ball alone (mean
    0.8), the end of a vessel that goes on out of its outline (0.8), a ball with a vessel
    through it (0.95) and a ball just below the vessel's end (0.95). The segment reports what
    scores 0.87 or more; with ``alone`` at 0.75 the lone ball too, redrawn to its own
    voxels, its score its own. The vessel's end goes on into 40 HU voxels within 4 mm: it
    is dropped, and the other lesions are outlined exactly as without ``alone`` (the ball
    below the end takes the voxels the end's outline would have claimed)."""
    positions = _positions(SOURCE)
    lone, end, crossed = np.array([10.0, -12.0, 5.0]), np.array([-15.0, 8.0, -4.0]), np.array([15.0, 20.0, -12.0])
    below = end + np.array([0.0, 5.0, -5.0])
    distances = [np.linalg.norm(positions - centre, axis=-1) for centre in (lone, end, crossed, below)]
    nodule = np.full(SOURCE.shape, -4.0)
    for distance, (radius, p) in zip(distances, ((3.5, 0.8), (3.5, 0.8), (4.5, 0.95), (2.5, 0.95)), strict=True):
        nodule[distance <= radius] = _logit(np.float64(p))
    logits = np.stack([np.zeros(SOURCE.shape), nodule]).astype(np.float32)
    series = np.full(SOURCE.shape, -850.0, dtype=np.float32)
    across = [np.linalg.norm(positions[..., :2] - centre[:2], axis=-1) for centre in (end, crossed)]
    series[(across[0] <= 3.0) & (positions[..., 2] >= end[2] - 2.0)] = 40.0  # a vessel that ends at the lesion
    series[across[1] <= 2.0] = 40.0
    series[distances[0] <= 3.0] = series[distances[2] <= 4.0] = series[distances[3] <= 3.0] = 0.0
    segment_ = {**NODULE, "min_mean_probability": 0.87, "outline": {"min_value": -450}}
    alone = {**segment_, "outline": {"min_value": -450, "alone": {"min_mean_probability": 0.75}}}

    def pixels(slices):
        return series[slices]

    without = _run(logits, SOURCE, {"segments": [segment_]}, pixels=pixels)
    assert sorted(round(lesion.mean_probability, 3) for lesion in without.lesions) == [0.95, 0.95]
    result = _run(logits, SOURCE, {"segments": [alone]}, pixels=pixels)
    assert len(result.lesions) == 3
    [lone_lesion] = _nearest(result.lesions, [(lone,)])
    assert lone_lesion.mean_probability == pytest.approx(0.8)
    np.testing.assert_array_equal(result.masks[0] & (distances[0] <= 9.0), distances[0] <= 3.0)
    np.testing.assert_array_equal(result.masks[0] & (distances[0] > 9.0), without.masks[0])
    assert [dataclasses.replace(lesion, number=0) for lesion in result.lesions if lesion != lone_lesion] == [
        dataclasses.replace(lesion, number=0) for lesion in without.lesions
    ]


def test_a_lesion_that_is_part_of_something_larger_is_dropped_when_lesions_must_stand_apart():
    """Three lesions the model scores 0.95, in a series of lung (-850 HU) beside a
    mediastinum (40 HU, x >= 25 mm): a ball (0 HU) alone, a ball with a vessel (40 HU)
    touching its side, and one the model sees where the mediastinum begins (as the demo's
    model sees the hilum). With ``apart`` at 1.0 the last one is dropped: within 4 mm of it
    more than its own volume of dense voxels goes on. The two balls are outlined exactly as
    without ``apart``: a vessel touching a nodule adds less than the nodule."""
    positions = _positions(SOURCE)
    lone, touched, edge = np.array([-15.0, 15.0, 0.0]), np.array([-15.0, -15.0, 0.0]), np.array([27.0, 0.0, 0.0])
    distances = [np.linalg.norm(positions - centre, axis=-1) for centre in (lone, touched, edge)]
    nodule = np.full(SOURCE.shape, -4.0)
    for distance in distances:
        nodule[distance <= 4.0] = _logit(np.float64(0.95))
    logits = np.stack([np.zeros(SOURCE.shape), nodule]).astype(np.float32)
    series = np.full(SOURCE.shape, -850.0, dtype=np.float32)
    series[positions[..., 0] >= 25.0] = 40.0
    vessel = np.linalg.norm(positions[..., :2] - touched[:2] - np.array([5.5, 0.0]), axis=-1) <= 1.5  # along z
    series[vessel] = 40.0
    series[(distances[0] <= 4.0) | (distances[1] <= 4.0)] = 0.0
    outline = {"min_value": -450}
    segment_ = {**NODULE, "min_mean_probability": 0.87, "outline": outline}
    apart = {**segment_, "outline": {**outline, "apart": {"max_attached": 1.0}}}

    def pixels(slices):
        return series[slices]

    without = _run(logits, SOURCE, {"segments": [segment_]}, pixels=pixels)
    assert len(without.lesions) == 3
    result = _run(logits, SOURCE, {"segments": [apart]}, pixels=pixels)
    assert len(result.lesions) == 2
    assert not result.masks[0][distances[2] <= 8.0].any()
    np.testing.assert_array_equal(result.masks[0], without.masks[0] & (distances[2] > 8.0))
    assert [dataclasses.replace(lesion, number=0) for lesion in result.lesions] == [
        dataclasses.replace(lesion, number=0)
        for lesion in without.lesions
        if np.linalg.norm(lesion.centroid - edge) > 8
    ]


def test_more_parts_than_uint16_counts_are_labelled_all_the_same():
    """Lesions are labelled in uint16 to halve the label volume; past 65535 parts, in int32."""
    mask = np.zeros((5, 520, 520), dtype=bool)
    mask[1::2, ::2, ::2] = True  # isolated voxels: 2 x 260 x 260 = 135200 parts
    labels, first = _parts(mask)
    assert first == 1 and labels.max() == 135200 and labels.dtype == np.int32
    few, _ = _parts(mask[:2, :10, :10])
    assert few.max() == 25 and few.dtype == np.uint16


def test_segment_frees_the_logits_though_its_caller_holds_the_output():
    """A 500-slice series' logits are 0.5 GB: segment takes them out of the ModelOutput that
    the runner holds until the result is written, and nothing keeps them once it returns."""
    logits = torch.zeros((1, 2, *SOURCE.shape))
    freed = weakref.ref(logits)
    output = ModelOutput(logits, Placement(SOURCE, SOURCE, np.zeros((1, 3))))
    del logits
    segment(Postprocess.model_validate({"segments": [NODULE]}), CLASSES, output)
    assert freed() is None
    assert output.logits.numel() == 0


def test_nothing_above_threshold_is_no_lesion():
    grid = Resampling(SOURCE, None, (2.0, 2.0, 2.0)).target
    logits = np.stack([np.zeros(grid.shape), np.full(grid.shape, -1.0)]).astype(np.float32)  # p = 0.27
    result = _run(logits, grid, {"segments": [NODULE]})
    assert result.lesions == [] and not result.masks.any()
    assert (result.probabilities == 69).all()  # round(0.269 * 255)


def test_softmax_segments_do_not_overlap_sigmoid_ones_may():
    """Where vessel is more probable than nodule, a softmax voxel is vessel even when its
    nodule probability passes the nodule's threshold; sigmoid segments are independent."""
    classes = ["background", "nodule", "vessel"]
    vessel = {"label": "vessel", "code": ["SCT", "59820001", "Blood vessel"]}
    logits = np.full((3, *SOURCE.shape), -4.0, np.float32)
    logits[0] = 0
    logits[1, :, :, :60] = 3.0  # nodule in the columns up to 59
    logits[2, :, :, 50:] = 3.2  # vessel from column 50: in 50..59 nodule 0.44, vessel 0.54
    soft = _run(logits, SOURCE, {"segments": [{**NODULE, "threshold": 0.3}, vessel]}, classes)
    assert soft.masks[0].any(axis=(0, 1)).nonzero()[0].max() == 49
    assert soft.masks[1].any(axis=(0, 1)).nonzero()[0].min() == 50
    sig = _run(logits, SOURCE, {"activation": "sigmoid", "segments": [NODULE, vessel]}, classes)
    assert (sig.masks[0] & sig.masks[1]).any(axis=(0, 1)).nonzero()[0].tolist() == list(range(50, 60))
    assert [(lesion.segment_number, lesion.number) for lesion in sig.lesions] == [(1, 1), (2, 2)]


def test_output_that_is_not_per_voxel_is_refused():
    postprocess = Postprocess.model_validate({"segments": [NODULE]})
    with pytest.raises(ValueError, match=r"shape \[5, 2\]; segmentation needs per-voxel output"):
        segment(postprocess, CLASSES, ModelOutput(torch.zeros(5, 2)))
    with pytest.raises(ValueError, match="'nodule' is not a class of the model"):
        _run(np.zeros((2, *SOURCE.shape), np.float32), SOURCE, {"segments": [NODULE]}, ["background", "mass"])
    with pytest.raises(ValueError, match="'background' is the background"):
        _run(np.zeros((2, *SOURCE.shape), np.float32), SOURCE, {"segments": [{**NODULE, "label": "background"}]})
    with pytest.raises(ValueError, match=r"shape \[1, 3, 48, 112, 112\]; its 2 classes on its grid"):
        _run(np.zeros((3, *SOURCE.shape), np.float32), SOURCE, {"segments": [NODULE]})
    turned = np.eye(4)
    turned[:2, :2] = [[np.cos(0.1), -np.sin(0.1)], [np.sin(0.1), np.cos(0.1)]]
    rotated = Grid(SOURCE.shape, turned @ SOURCE.affine)
    with pytest.raises(ValueError, match="the model's grid is rotated against the series"):
        _run(np.zeros((2, *SOURCE.shape), np.float32), rotated, {"segments": [NODULE]})


# --- the pipeline keys ----------------------------------------------------------------------------


def test_the_classification_demo_still_loads():
    pipeline = load_pipeline(DEMO_PIPELINE)
    assert pipeline.task == "classification" and pipeline.postprocess.segments == []


SEGMENTATION = """\
name: seg
version: 1
task: segmentation
match: {Modality: CT}
input: {kind: volume, orientation: RAS, spacing: [1, 1, 1]}
model: {artifact: model}
postprocess:
  segments:
    - {label: nodule, code: [SCT, "27925004", Nodule], threshold: 0.6, min_volume_mm3: 10}
outputs: [{seg: {type: fractional}}, {sr: {}}]
"""


def _load(tmp_path, text: str, task: str = "segmentation"):
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "manifest.json").write_text(json.dumps({"task": task, "classes": CLASSES}))
    path = tmp_path / "p.yaml"
    path.write_text(textwrap.dedent(text))
    return load_pipeline_files([path], set())


def test_a_segmentation_pipeline_loads_and_round_trips(tmp_path):
    [pipeline] = _load(tmp_path, SEGMENTATION)
    assert pipeline.task == "segmentation"
    [spec] = pipeline.postprocess.segments
    assert spec.category == ("SCT", "49755003", "Morphologically abnormal structure")
    assert (spec.threshold, spec.min_volume_mm3) == (0.6, 10)
    assert pipeline.outputs[0].seg is not None and pipeline.outputs[0].seg.type == "fractional"
    [again] = _load(tmp_path, yaml.safe_dump(pipeline.model_dump(mode="json", exclude_none=True)))
    assert again.model_dump() == pipeline.model_dump()


MISTAKES = [
    (
        SEGMENTATION.replace("input: {kind: volume, orientation: RAS, spacing: [1, 1, 1]}", "input: {kind: slice}"),
        ["3:1: task: segmentation outlines in 3D: set input.kind: volume"],
    ),
    (
        SEGMENTATION.replace("label: nodule", "label: mass"),
        ["9:8: postprocess.segments.0.label: 'mass' is not a class of the model (classes: ['background', 'nodule'])"],
    ),
    (
        SEGMENTATION.replace("label: nodule", "label: background"),
        ["9:8: postprocess.segments.0.label: 'background' is the background (the first class) of a softmax model"],
    ),
    (
        SEGMENTATION.replace("  segments:\n", "  findings:\n").replace(", threshold: 0.6, min_volume_mm3: 10", ""),
        [
            "8:3: postprocess.findings: findings are for task: classification",
            "7:1: postprocess.segments: a segmentation pipeline lists at least one segment",
        ],
    ),
    (
        SEGMENTATION.replace("min_volume_mm3: 10", "min_volume_mm3: 10, grow_threshold: 0.7"),
        [
            "9:92: postprocess.segments.0.grow_threshold: 0.7 is above threshold 0.6: "
            "a lesion grows into less probable voxels"
        ],
    ),
    (
        SEGMENTATION.replace(
            "min_volume_mm3: 10",
            "min_volume_mm3: 10, min_mean_probability: 0.8,\n"
            "       outline: {min_value: -450, alone: {min_mean_probability: 0.8}}",
        ),
        [
            "10:43: postprocess.segments.0.outline.alone.min_mean_probability: 0.8 is not below the "
            "segment's min_mean_probability 0.8: a lesion alone is reported at a lower score"
        ],
    ),
    (
        SEGMENTATION.replace(
            "min_volume_mm3: 10", "min_volume_mm3: 10,\n       outline: {min_value: -450, apart: {reach_mm: 4}}"
        ),
        ["10:35: postprocess.segments.0.outline.apart.max_attached: Field required"],
    ),
    (
        SEGMENTATION.replace("\noutputs", '\n    - {label: nodule, code: [SCT, "27925004", Nodule]}\noutputs'),
        ["10:8: postprocess.segments.1.label: segment 'nodule' is listed twice"],
    ),
    (
        SEGMENTATION.replace("{sr: {}}", "{kos: {}}"),
        ["10:38: outputs.1: kos: key images are for task: classification; a segmentation pipeline writes seg and sr"],
    ),
    (
        SEGMENTATION.replace("{sr: {}}", "{sr: {}, seg: {}}"),
        ["10:38: outputs.1: each output names exactly one of: sr, kos, seg"],
    ),
    (
        SEGMENTATION.replace("task: segmentation", "task: classification"),
        [
            "10:11: outputs.0: seg: masks come from a segmentation model: set task: segmentation",
        ],
    ),
    (
        SEGMENTATION.replace("task: segmentation\n", "").replace("{seg: {type: fractional}}, ", ""),
        [
            "6:1: postprocess.findings: a classification pipeline lists at least one finding",
            "7:3: postprocess.segments: segments are for task: segmentation",
        ],
    ),
    (
        SEGMENTATION.replace("[{seg: {type: fractional}}, {sr: {}}]", "[{sr: {}}]"),
        ["10:11: outputs.0: sr: its lesions point at their segments: add an output seg: {}"],
    ),
    (
        SEGMENTATION.replace("{sr: {}}", "{seg: {}}"),
        ["10:1: outputs: a segmentation pipeline writes one seg"],
    ),
]


@pytest.mark.parametrize(("text", "expected"), MISTAKES, ids=[m[1][0].split(": ")[1] for m in MISTAKES])
def test_mistakes_are_reported_at_their_key(tmp_path, text, expected):
    with pytest.raises(PipelineError) as error:
        _load(tmp_path, text)
    assert [line.replace(f"{tmp_path / 'p.yaml'}:", "") for line in str(error.value).splitlines()] == expected


def test_a_classifier_behind_a_segmentation_pipeline_is_refused(tmp_path):
    with pytest.raises(PipelineError) as error:
        _load(tmp_path, SEGMENTATION, task="classification")
    assert str(error.value) == (
        f"{tmp_path / 'p.yaml'}:6:9: model.artifact: the model is for task: classification, "
        "the pipeline's task is segmentation"
    )
