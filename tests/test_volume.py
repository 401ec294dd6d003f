"""Volume pipelines (input.kind: volume): geometry read from the headers, resampling that
puts a known point where it belongs (checked against MONAI's Spacing), windows laid out as
MONAI's sliding_window_inference lays them, refusals with a named reason, and a 3D model
through a node whose SR says exactly what the model says on the same volume."""

import numpy as np
import pydicom
import pytest
import torch
import yaml
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms import Spacing
from pydicom.uid import KeyObjectSelectionDocumentStorage
from torch import nn

from plugin.demo.phantom import PIXEL_SPACING_MM
from plugin.demo.series import SLICE_THICKNESS_MM
from plugin.models.architectures import densenet3d
from plugin.models.artifact import save_artifact
from plugin.outputs.sr import read_measurement_report
from plugin.pipeline import PipelineError, load_pipeline, load_pipeline_files
from plugin.preprocess import PreprocessStep, preprocess_volume
from plugin.volume import Grid, Resampling, VolumeError, infer_volume, segment_volume, series_grid
from tests.conftest import results, storescu, wait_for, with_new_uids

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])  # MONAI's world is RAS, DICOM's LPS
PARAMS = {"in_channels": 1, "num_classes": 2}
ARCHITECTURE = {"id": "densenet3d", "params": PARAMS}


def _grid(shape, columns, origin) -> Grid:
    """A grid whose affine has ``columns`` (direction x spacing of d, h, w) and ``origin``."""
    affine = np.eye(4)
    affine[:3, :3] = np.column_stack(columns)
    affine[:3, 3] = origin
    return Grid(shape, affine)


def resample(volume, grid, orientation, spacing) -> tuple[torch.Tensor, Grid]:
    resampling = Resampling(grid, orientation, spacing)
    return resampling(volume), resampling.target


def _axial(shape) -> Grid:
    """The grid of an axial series as the loader stacks it: slices feet to head (SPL)."""
    return _grid(shape, [[0, 0, 2.5], [0, 0.7, 0], [0.7, 0, 0]], [-55.0, -55.0, -30.0])


# --- resampling -----------------------------------------------------------------------------------


@pytest.mark.parametrize("spacing", [(1.1, 0.7, 1.9), (2.0, 1.0, 0.5), (3.0, 3.0, 3.0)])
def test_resampling_agrees_with_monai_spacing(spacing):
    """On a grid whose axes run R, S, A (a flipped, permuted one), MONAI's Spacing gives the
    same voxels and the same affine."""
    volume = torch.from_numpy(np.random.default_rng(0).random((7, 9, 11), dtype=np.float32))
    grid = _grid((7, 9, 11), [[-1.5, 0, 0], [0, 0, 2.0], [0, -0.8, 0]], [10.0, -20.0, 30.0])
    assert grid.orientation == "RSA"
    got, target = resample(volume, grid, None, spacing)

    reference = Spacing(pixdim=spacing, mode="bilinear", padding_mode="border")(
        MetaTensor(volume[None].clone(), affine=torch.from_numpy(LPS_TO_RAS @ grid.affine))
    )
    assert got.shape == reference.shape[1:]
    np.testing.assert_allclose(got.numpy(), reference.as_tensor()[0].numpy(), atol=1e-6)
    np.testing.assert_allclose(target.affine, LPS_TO_RAS @ reference.affine.numpy(), atol=1e-9)
    assert target.spacing == pytest.approx(spacing)


@pytest.mark.parametrize(
    ("orientation", "expected"),
    [
        ("SPL", lambda v: v),
        ("IPL", lambda v: v.flip(0)),  # slices head to feet
        ("SAR", lambda v: v.flip(1, 2)),
        ("LPS", lambda v: v.permute(2, 1, 0)),
        ("RAS", lambda v: v.permute(2, 1, 0).flip(0, 1)),
        ("PSL", lambda v: v.permute(1, 0, 2)),
    ],
)
def test_orientation_permutes_and_flips_axes(orientation, expected):
    volume = torch.arange(4 * 5 * 6, dtype=torch.float32).reshape(4, 5, 6)
    grid = _axial((4, 5, 6))
    got, target = resample(volume, grid, orientation, None)
    assert torch.equal(got, expected(volume))
    assert target.orientation == orientation
    # every voxel is where it was in the patient: the corners map to the same points
    corners = np.array([[i, j, k] for i in (0, 3) for j in (0, 4) for k in (0, 5)], float)
    before = grid.to_patient(corners)
    after = target.to_index(before).round().astype(int)
    for point, index in zip(corners.astype(int), after, strict=True):
        assert volume[tuple(point)] == got[tuple(index)]


def test_a_known_point_lands_where_it_belongs():
    """A smooth blob centred on a known patient point, on an axial 2.5 x 0.7 x 0.7 mm grid,
    resampled to RAS at 1 mm and then cropped, padded and resized by 3D steps: its centre,
    read through the final grid, is the same patient point."""
    point = np.array([12.3, -20.7, -4.1])  # LPS mm
    grid = _axial((24, 160, 160))
    d, h, w = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
    positions = grid.to_patient(np.stack([d.ravel(), h.ravel(), w.ravel()], 1)).reshape(*grid.shape, 3)
    blob = np.exp(-(((positions - point) ** 2).sum(-1)) / (2 * 4.0**2)).astype(np.float32)

    resampled, target = resample(torch.from_numpy(blob), grid, "RAS", (1.0, 1.0, 1.0))
    assert target.orientation == "RAS" and target.spacing == pytest.approx((1.0, 1.0, 1.0))
    steps = [PreprocessStep.model_validate({"crop_or_pad": [100, 90, 80]}), PreprocessStep(resize=[50, 45, 40])]
    image, final = preprocess_volume(steps, resampled[None, None], target)
    assert final.shape == (50, 45, 40) == image.shape[2:]

    for volume, on in ((resampled, target), (image[0, 0], final)):
        weights = volume.double().numpy()
        centre = (np.indices(weights.shape).reshape(3, -1) * weights.ravel()).sum(axis=1) / weights.sum()
        np.testing.assert_allclose(on.to_patient(centre[None])[0], point, atol=0.3)


# --- geometry from the headers --------------------------------------------------------------------


@pytest.fixture
def headers(demo_study) -> list[pydicom.Dataset]:
    """The positive demo series' headers, sorted along the normal as the loader sorts them."""
    found = [pydicom.dcmread(p, stop_before_pixels=True) for p in demo_study["Demo chest CT, nodules"]]
    return sorted(found, key=lambda h: float(h.ImagePositionPatient[2]))


def test_the_grid_of_a_series_maps_each_slice_to_its_position(headers):
    grid = series_grid(headers)
    assert grid.shape == (24, 512, 512)
    assert grid.orientation == "SPL"
    assert grid.spacing == pytest.approx((SLICE_THICKNESS_MM, PIXEL_SPACING_MM, PIXEL_SPACING_MM))
    firsts = grid.to_patient(np.array([[i, 0, 0] for i in range(24)], float))
    np.testing.assert_allclose(firsts, [[float(v) for v in h.ImagePositionPatient] for h in headers], atol=1e-6)
    corner = grid.to_patient(np.array([[0.0, 511, 511]]))[0]  # last row, last column: +y, +x
    np.testing.assert_allclose(corner[:2], np.array(headers[0].ImagePositionPatient[:2], float) + 511 * 0.7)


def _tilt(headers):
    for i, h in enumerate(headers):  # 15 degrees: each slice 0.67 mm further forward
        x, y, z = h.ImagePositionPatient
        h.ImagePositionPatient = [x, round(float(y) - i * 0.67, 3), z]
    return headers


def _set(index, keyword, value):
    def change(headers):
        setattr(headers[index], keyword, value)
        return headers

    return change


@pytest.mark.parametrize(
    ("change", "reason", "detail"),
    [
        (lambda h: h[:11] + h[12:], "uneven_spacing", "gaps between slices range from 2.5 to 5 mm"),
        (_tilt, "gantry_tilt", "slice 24 of 24 lies 15.41 mm across the slice plane from slice 1 (15.0 degrees"),
        (
            _set(5, "ImageOrientationPatient", [1, 0, 0, 0, 0.8, -0.6]),
            "mixed_orientations",
            "slice 6 of 24 is oriented [1, 0, 0, 0, 0.8, -0.6], slice 1 [1, 0, 0, 0, 1, 0]",
        ),
        (_set(3, "PixelSpacing", [0.8, 0.8]), "mixed_pixel_grids", "slice 4 of 24 has 512x512 pixels of [0.8, 0.8] mm"),
        (_set(7, "ImagePositionPatient", None), "no_geometry", "an image lacks a usable ImagePositionPatient"),
        (lambda h: h[:1], "too_few_slices", "a volume needs at least 2 slices; the series has 1"),
        (_set(0, "NumberOfFrames", 2), "multiframe", "a volume is built from single-frame images; one has 2 frames"),
    ],
)
def test_a_series_that_fills_no_grid_is_refused_with_a_named_reason(headers, change, reason, detail):
    with pytest.raises(VolumeError) as error:
        series_grid(change(headers))
    assert error.value.reason == reason
    assert str(error.value).startswith(detail) and "\n" not in str(error.value)


def test_a_volume_too_large_is_refused_before_it_is_allocated(headers):
    for h in headers:
        h.Rows = h.Columns = 4096
    with pytest.raises(VolumeError) as error:
        Resampling(series_grid(headers), None, None)
    assert (error.value.reason, str(error.value)) == (
        "volume_too_large",
        "the stacked volume would be 24x4096x4096 voxels, more than the 268,435,456 a node holds",
    )
    with pytest.raises(VolumeError, match=r"^the resampled volume would be 1151x512x512 voxels"):
        Resampling(_axial((24, 512, 512)), None, (0.05, 0.7, 0.7))


# --- sliding window -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "roi", "overlap"),
    [
        ((20, 33, 47), (8, 16, 16), 0.25),
        ((5, 33, 47), (8, 16, 16), 0.5),  # shorter than the window: padded on both sides
        ((30, 40, 50), (7, 9, 11), 0.0),
        ((9, 64, 70), (12, 32, 32), 0.7),
    ],
)
def test_windows_are_the_windows_of_monai_sliding_window_inference(shape, roi, overlap):
    image = torch.rand((1, 1, *shape))
    seen: list[tuple[slice, ...]] = []

    def record(batch, coordinates):
        seen.extend(tuple(c[2:]) for c in coordinates)
        return batch

    sliding_window_inference(image, roi, 3, record, overlap=overlap, with_coord=True)
    pad = [max(r - n, 0) // 2 for n, r in zip(shape, roi, strict=True)]
    monai_centres = [[(s.start + s.stop - 1) / 2 - p for s, p in zip(c, pad, strict=True)] for c in seen]

    calls = []

    def model(batch):
        calls.append(len(batch))
        return batch.mean(dim=(2, 3, 4))

    logits, centres = infer_volume(model, image, roi, overlap, 3)
    np.testing.assert_array_equal(centres, monai_centres)
    assert len(logits) == len(seen) and max(calls) == 3


def test_sliding_window_equals_direct_inference():
    torch.manual_seed(0)
    model = densenet3d(**PARAMS).eval()
    image = torch.rand((1, 1, 16, 40, 48))
    with torch.inference_mode():
        direct = model(image)
        whole, centres = infer_volume(model, image, roi=(16, 40, 48), overlap=0.25, batch=2)
        windows, window_centres = infer_volume(model, image, roi=(16, 32, 32), overlap=0.5, batch=2)
        crops = torch.cat([model(image[:, :, 0:16, h : h + 32, w : w + 32]) for h in (0, 8) for w in (0, 16)])
    torch.testing.assert_close(whole, direct, rtol=0, atol=1e-6)
    assert centres.tolist() == [[7.5, 19.5, 23.5]]
    torch.testing.assert_close(windows, crops, rtol=0, atol=1e-6)
    assert window_centres.tolist() == [[7.5, h + 15.5, w + 15.5] for h in (0, 8) for w in (0, 16)]


def test_a_per_voxel_output_is_stitched_from_windows_onto_the_image_voxels():
    """A voxel-wise model gives each voxel the same value in every window that covers it,
    so the stitched output equals the whole volume's, a volume smaller than the window
    included (MONAI pads it and crops the output back)."""
    torch.manual_seed(0)
    model = nn.Conv3d(1, 2, 1).eval()

    def predict(batch: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():  # as the model pool runs it
            return model(batch)

    for shape in [(16, 40, 48), (10, 20, 24)]:
        image = torch.rand((1, 1, *shape))
        stitched = segment_volume(predict, image, roi=(12, 32, 32), overlap=0.5, batch=3)
        torch.testing.assert_close(stitched, predict(image), rtol=0, atol=1e-6)
    torch.testing.assert_close(segment_volume(predict, image), predict(image), rtol=0, atol=0)


def test_a_model_without_per_voxel_output_is_refused_for_segmentation():
    torch.manual_seed(0)
    model = densenet3d(**PARAMS).eval()
    with torch.inference_mode(), pytest.raises(ValueError) as refused:
        segment_volume(model, torch.rand((1, 1, 16, 32, 32)))
    assert str(refused.value) == (
        "a segmentation model must give one value per voxel of its input [16, 32, 32] "
        "([batch, classes, depth, height, width]); this one gave [1, 2]"
    )


# --- pipeline files -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory) -> tuple:
    """A 3D classifier trained for a few steps to call brighter volumes "nodule" (so that its
    score moves with what it sees), saved as a radpipe artifact; the module it was saved
    from is what the node's scores are checked against."""
    torch.manual_seed(3)
    model = densenet3d(**PARAMS)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(40):  # mean intensities around those of lung-windowed chest CT windows
        brightness = 0.3 + 0.5 * torch.rand(8)
        inputs = (brightness[:, None, None, None, None] + 0.2 * torch.randn((8, 1, 8, 32, 32))).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(model(inputs), (brightness > 0.55).long())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    directory = tmp_path_factory.mktemp("artifact") / "volume-model"
    manifest = {
        "architecture": ARCHITECTURE,
        "input": {"kind": "volume", "channels": 1},
        "classes": ["normal", "nodule"],
    }
    save_artifact(directory, model, manifest)
    return directory, model


VOLUME_HEAD = """\
name: p
version: 1
match: {Modality: CT}
input:
  kind: volume
"""
TAIL = """\
model: {artifact: ARTIFACT}
postprocess:
  findings: [{label: nodule, code: [SCT, "27925004", Nodule]}]
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            VOLUME_HEAD + "preprocess:\n  - window: {preset: lung}\n  - resize: [128, 128]\n" + TAIL,
            "8:5: preprocess.1: resize: [height, width] works on each slice; a volume (input.kind: volume) "
            "needs [depth, height, width]",
        ),
        (
            "name: p\nversion: 1\nmatch: {Modality: CT}\npreprocess:\n  - crop_or_pad: [16, 128, 128]\n" + TAIL,
            "5:5: preprocess.0: crop_or_pad: [depth, height, width] is for volumes: set input.kind: volume",
        ),
        (
            "name: p\nversion: 1\nmatch: {Modality: CT}\ninput:\n  spacing: [1, 1, 1]\n" + TAIL,
            "5:3: input.spacing: spacing is for volumes: set input.kind: volume",
        ),
        (
            VOLUME_HEAD + "  orientation: RAL\n" + TAIL,
            "6:3: input.orientation: 'RAL' is not an orientation code: one letter per axis from R/L, A/P, S/I, "
            "each pair once (e.g. RAS, LPS, SPL)",
        ),
        (
            VOLUME_HEAD + "  spacing: [1, 0, 1]\n" + TAIL,
            "6:16: input.spacing.1: Input should be greater than 0",
        ),
        (
            VOLUME_HEAD + "  sliding_window: {roi_size: [64, 64]}\n" + TAIL,
            "6:20: input.sliding_window.roi_size.2: Field required",  # [depth, height, width]
        ),
        (
            VOLUME_HEAD + "  sliding_window: {roi_size: [16, 64, 64], overlap: 1}\n" + TAIL,
            "6:44: input.sliding_window.overlap: Input should be less than 1",
        ),
        (
            VOLUME_HEAD + TAIL + "outputs: [{sr: {}}, {kos: {when: positive}}]\n",
            "9:21: outputs.1: kos: a volume scored whole has no key image; with input.sliding_window the key "
            "image is the slice through the centre of the highest-scoring window",
        ),
    ],
)
def test_pipeline_mistakes_are_reported_at_their_line_and_column(tmp_path, artifact, text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(text.replace("ARTIFACT", str(artifact[0])))
    with pytest.raises(PipelineError) as error:
        load_pipeline_files([path], set())
    assert [line.replace(f"{path}:", "") for line in str(error.value).splitlines()] == [expected]


# --- through a node -------------------------------------------------------------------------------

WHOLE = """\
name: volume-whole
version: 1
match: {Modality: CT}
completion: {quiet_seconds: 1}
input: {kind: volume, orientation: RAS, spacing: [2.8, 2.8, 5.0]}
preprocess:
  - window: {preset: lung}
  - crop_or_pad: [96, 96, 16]
model: {artifact: ARTIFACT}
postprocess:
  findings: [{label: nodule, code: [SCT, "27925004", Nodule], threshold: 0.5}]
destinations: []
"""
WINDOWS = """\
name: volume-windows
version: 1
match: {Modality: CT}
completion: {quiet_seconds: 1}
input:
  kind: volume
  orientation: SPL
  spacing: [5.0, 2.8, 2.8]
  sliding_window: {roi_size: [8, 64, 64], overlap: 0.25, sw_batch_size: 4}
preprocess:
  - window: {preset: lung}
model: {artifact: ARTIFACT}
postprocess:
  aggregate: max
  findings: [{label: nodule, code: [SCT, "27925004", Nodule], threshold: 0.5}]
outputs: [{sr: {}}, {kos: {when: always}}]
destinations: []
"""


def _independent_volume(paths) -> tuple[torch.Tensor, Grid, list[float]]:
    """The series in HU, stacked feet to head by plain pydicom, and its grid from what the
    phantom writer is known to write (not from the headers): the node's stacking and
    geometry are checked against these."""
    datasets = sorted((pydicom.dcmread(p) for p in paths), key=lambda ds: float(ds.ImagePositionPatient[2]))
    volume = np.stack([ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for ds in datasets])
    n = len(datasets)
    half = (512 - 1) / 2 * PIXEL_SPACING_MM
    grid = _grid(
        (n, 512, 512),
        [[0, 0, SLICE_THICKNESS_MM], [0, PIXEL_SPACING_MM, 0], [PIXEL_SPACING_MM, 0, 0]],
        [-half, -half, -(n - 1) / 2 * SLICE_THICKNESS_MM],
    )
    return torch.from_numpy(volume.astype(np.float32)), grid, [str(ds.SOPInstanceUID) for ds in datasets]


def test_a_series_through_a_node_gets_the_models_own_scores(start_node, tmp_path, artifact, demo_study, dcmtk, caplog):
    directory, model = artifact
    pipelines = tmp_path / "pipelines"
    pipelines.mkdir()
    for text in (WHOLE, WINDOWS):
        (pipelines / f"{yaml.safe_load(text)['name']}.yaml").write_text(text.replace("ARTIFACT", str(directory)))
    series = demo_study["Demo chest CT, nodules"]
    gapped = with_new_uids(series, tmp_path / "gapped")
    del gapped[11]  # a slice missing: uneven spacing
    node = start_node()
    assert storescu(node.port, *series, *gapped).returncode == 0

    def finished():
        jobs = node.journal.jobs()
        return len(jobs) == 4 and all(j.status in ("done", "failed") for j in jobs) and jobs

    jobs = wait_for(finished, what="four jobs")
    failed = [j for j in jobs if j.status == "failed"]
    assert len(failed) == 2, [j.error for j in jobs]
    for job in failed:
        assert job.error == (
            "uneven_spacing: gaps between slices range from 2.5 to 5 mm along the normal "
            "(allowed: 10% off an even spacing)"
        )
    assert sum("failed: uneven_spacing: gaps between slices" in r.getMessage() for r in caplog.records) == 2

    volume, grid, uids = _independent_volume(series)
    reports, key_images = {}, []
    for path in results(node.results_dir):
        ds = pydicom.dcmread(path)
        if ds.SOPClassUID == KeyObjectSelectionDocumentStorage:
            key_images += [
                item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                for item in ds.ContentSequence
                if "ReferencedSOPSequence" in item
            ]
            continue
        [finding] = read_measurement_report(ds)
        reports[finding.algorithm_name] = finding
    assert set(reports) == {"volume-whole", "volume-windows"}

    for name, text in (("volume-whole", WHOLE), ("volume-windows", WINDOWS)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text.replace("ARTIFACT", str(directory)))
        pipeline = load_pipeline(path)
        selection = pipeline.input
        resampled, target = resample(volume, grid, selection.orientation, selection.spacing)
        image, on = preprocess_volume(pipeline.preprocess, resampled[None, None], target)
        window = selection.sliding_window
        with torch.inference_mode():
            if window is None:
                logits, centres = model(image), None
            else:
                logits, centres = infer_volume(model, image, window.roi_size, window.overlap, window.sw_batch_size)
        probabilities = torch.softmax(logits, 1)[:, 1]
        assert reports[name].probability == pytest.approx(float(probabilities.max()), abs=1e-4)
        assert sorted(reports[name].source_sop_instance_uids) == sorted(uids)
        if centres is not None:
            assert len(probabilities) == 18 and float(probabilities.max() - probabilities.min()) > 0.05
            z = on.to_patient(centres[int(probabilities.argmax())][None])[0, 2]
            nearest = int(np.argmin([abs(grid.to_patient(np.array([[i, 0, 0.0]]))[0, 2] - z) for i in range(24)]))
            assert key_images == [uids[nearest]]
