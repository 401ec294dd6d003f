"""DICOM SEG and the volumetric TID 1500 SR of a segmentation: valid (dciodvfy), decoding to
exactly the masks and probabilities slice by slice, the SR's lesions pointing at the SEG's
segments, deterministic UIDs, an all-empty result valid and reported Absent, and the SEG
compressed."""

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom import Dataset
from pydicom.uid import Comprehensive3DSRStorage, EnhancedSRStorage, SegmentationStorage

from plugin.demo.phantom import PIXEL_SPACING_MM
from plugin.demo.series import SLICE_THICKNESS_MM, write_ct_series
from plugin.outputs.seg import segmentation_object
from plugin.outputs.sr import (
    AlgorithmIdentity,
    read_measurement_report,
    read_volumetric_measurement_report,
    volumetric_measurement_report,
)
from plugin.pipeline import SegmentSpec
from plugin.segment import Lesion, Segmentation
from tests.conftest import dciodvfy_errors

ALGORITHM = AlgorithmIdentity("seg-unit", "1", "a" * 64, "b" * 64, "fp32", "cpu")
SEGMENTS = [
    SegmentSpec(label="nodule", code=("SCT", "27925004", "Nodule")),
    SegmentSpec(label="mass", code=("SCT", "4147007", "Mass")),  # never found: an empty segment
]
SLICES, SIZE = 20, 512
VOXEL_MM3 = PIXEL_SPACING_MM * PIXEL_SPACING_MM * SLICE_THICKNESS_MM


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> list[Dataset]:
    """A 20-slice CT series' headers, read as the runner reads them (no pixels)."""
    volume = np.full((SLICES, SIZE, SIZE), -1000, np.int16)
    paths = write_ct_series(
        tmp_path_factory.mktemp("ct"), volume, study_uid="1.2.826.0.1.3680043.8.498.1", series_number=1,
        series_description="seg unit", seed=3,
    )  # fmt: skip
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def _patient_grid(sources: list[Dataset]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """LPS coordinates (mm) of every voxel, [D, H, W] each."""
    x0, y0, _ = (float(v) for v in sources[0].ImagePositionPatient)
    z = np.array([float(s.ImagePositionPatient[2]) for s in sources])
    axis = np.arange(SIZE) * PIXEL_SPACING_MM
    return np.meshgrid(z, y0 + axis, x0 + axis, indexing="ij")


def _segmentation(sources: list[Dataset], spheres: list[tuple[tuple[float, float, float], float]]) -> Segmentation:
    """Segment 1 holds one lesion per sphere ((x, y, z) mm, radius mm), largest first;
    segment 2 is empty. Probabilities: 0.9 inside, 0.2 on a one-voxel rim, 0 elsewhere."""
    z, y, x = _patient_grid(sources)
    masks = np.zeros((len(SEGMENTS), SLICES, SIZE, SIZE), bool)
    probabilities = np.zeros(masks.shape, np.uint8)
    lesions = []
    for number, ((cx, cy, cz), radius) in enumerate(sorted(spheres, key=lambda s: -s[1]), start=1):
        distance = np.sqrt((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2)
        inside = distance <= radius
        masks[0] |= inside
        probabilities[0][inside] = round(0.9 * 255)
        probabilities[0][(distance > radius) & (distance <= radius + PIXEL_SPACING_MM)] = round(0.2 * 255)
        lesions.append(
            Lesion(
                label="nodule",
                segment_number=1,
                number=number,
                volume_mm3=float(inside.sum() * VOXEL_MM3),
                diameter_mm=2 * radius,
                centroid=(float(x[inside].mean()), float(y[inside].mean()), float(z[inside].mean())),
                mean_probability=0.9,
                max_probability=0.9,
                slices=tuple(int(i) for i in np.flatnonzero(inside.any(axis=(1, 2)))),
            )
        )
    return Segmentation(segments=SEGMENTS, masks=masks, probabilities=probabilities, lesions=lesions)


TWO_NODULES = [((-60.0, -40.0, 5.0), 9.0), ((50.0, 30.0, -10.0), 5.0)]


def _written(dataset: Dataset, path: Path) -> Path:
    dataset.save_as(path, enforce_file_format=True)
    return path


def test_binary_seg_decodes_to_the_masks_and_the_sr_points_at_its_segments(sources, tmp_path, dcmtk):
    segmentation = _segmentation(sources, TWO_NODULES)
    seg = segmentation_object(sources, segmentation, ALGORITHM, "binary")
    seg_path = _written(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(seg_path) == []
    read = hd.seg.segread(seg_path)
    assert read.SegmentationType == "BINARY" and read.file_meta.TransferSyntaxUID == pydicom.uid.JPEG2000Lossless
    assert [d.segment_label for d in read.SegmentSequence] == ["nodule", "mass"]  # the empty one described too
    assert read.get_segment_description(2).segmented_property_type.value == "4147007"
    assert read.get_segment_description(1).segmented_property_category.value == "49755003"
    [identification] = read.get_segment_description(1).algorithm_identification
    assert identification.AlgorithmName == "seg-unit" and identification.AlgorithmVersion == ALGORITHM.version
    decoded = read.get_pixels_by_source_instance(
        [str(s.SOPInstanceUID) for s in sources], assert_missing_frames_are_empty=True
    )  # [slices, rows, columns, segments], matched to the sources by SOP Instance UID
    assert np.array_equal(np.moveaxis(decoded, -1, 0), segmentation.masks)
    assert {str(r.ReferencedSOPInstanceUID) for r in read.ReferencedSeriesSequence[0].ReferencedInstanceSequence} == {
        str(s.SOPInstanceUID) for s in sources
    }

    sr = volumetric_measurement_report(sources, segmentation, seg, ALGORITHM)
    sr_path = _written(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_path) == []
    assert sr.SOPClassUID == Comprehensive3DSRStorage
    lesions = read_volumetric_measurement_report(pydicom.dcmread(sr_path))
    assert [(lesion.identifier, lesion.segment_number) for lesion in lesions] == [("nodule 1", 1), ("nodule 2", 1)]
    for reported, truth in zip(lesions, segmentation.lesions, strict=True):
        assert reported.segmentation_sop_instance_uid == seg.SOPInstanceUID
        assert reported.finding.value == "27925004"
        assert reported.volume_mm3 == pytest.approx(truth.volume_mm3, abs=1e-3)
        assert reported.diameter_mm == pytest.approx(truth.diameter_mm)
        assert (reported.mean_probability, reported.max_probability) == (0.9, 0.9)
        assert reported.centroid == pytest.approx(truth.centroid, abs=1e-3)
        assert reported.source_sop_instance_uids == tuple(sources[i].SOPInstanceUID for i in truth.slices)
    [absent] = read_measurement_report(pydicom.dcmread(sr_path))  # the mass: looked for, not found
    assert (absent.finding.value, absent.present, absent.probability) == ("4147007", False, 0.0)


def test_fractional_seg_keeps_every_probability(sources, tmp_path, dcmtk):
    segmentation = _segmentation(sources, TWO_NODULES)
    seg_path = _written(segmentation_object(sources, segmentation, ALGORITHM, "fractional"), tmp_path / "seg.dcm")
    assert dciodvfy_errors(seg_path) == []
    read = hd.seg.segread(seg_path)
    assert (read.SegmentationType, read.SegmentationFractionalType, read.MaximumFractionalValue) == (
        "FRACTIONAL", "PROBABILITY", 255,
    )  # fmt: skip
    decoded = read.get_pixels_by_source_instance(
        [str(s.SOPInstanceUID) for s in sources], assert_missing_frames_are_empty=True, rescale_fractional=False
    )
    assert np.array_equal(np.moveaxis(decoded, -1, 0), segmentation.probabilities)


@pytest.mark.parametrize("kind", ["binary", "fractional"])
def test_seg_is_compressed(sources, kind, record_property):
    """Mostly empty frames: the compressed SEG is far smaller than the same one native."""
    seg = segmentation_object(sources, _segmentation(sources, TWO_NODULES), ALGORITHM, kind)
    compressed = io.BytesIO()
    seg.save_as(compressed, enforce_file_format=True)
    seg.decompress()
    native = io.BytesIO()
    seg.save_as(native, enforce_file_format=True)
    sizes = {"frames": int(seg.NumberOfFrames), "compressed": compressed.tell(), "native": native.tell()}
    record_property(f"{kind}_seg_bytes", sizes)
    print(f"{kind} SEG of {SLICES}x{SIZE}x{SIZE}: {sizes}")
    assert sizes["compressed"] < sizes["native"] / 10


def test_same_input_same_uids(sources):
    segmentation = _segmentation(sources, TWO_NODULES)
    first, again = (segmentation_object(sources, segmentation, ALGORITHM) for _ in range(2))
    assert (first.SeriesInstanceUID, first.SOPInstanceUID) == (again.SeriesInstanceUID, again.SOPInstanceUID)
    reports = [volumetric_measurement_report(sources, segmentation, seg, ALGORITHM) for seg in (first, again)]
    assert reports[0].SOPInstanceUID == reports[1].SOPInstanceUID
    uids = [[lesion.tracking_uid for lesion in read_volumetric_measurement_report(r)] for r in reports]
    assert uids[0] == uids[1] and len(set(uids[0])) == 2
    other = AlgorithmIdentity("seg-unit", "2", "a" * 64, "b" * 64, "fp32", "cpu")
    assert segmentation_object(sources, segmentation, other).SOPInstanceUID != first.SOPInstanceUID
    assert len({first.SeriesNumber, reports[0].SeriesNumber}) == 2


@pytest.mark.parametrize("kind", ["binary", "fractional"])
def test_nothing_found_is_a_valid_seg_and_an_sr_saying_absent(sources, tmp_path, kind, dcmtk):
    empty = _segmentation(sources, [])
    seg = segmentation_object(sources, empty, ALGORITHM, kind)
    seg_path = _written(seg, tmp_path / "seg.dcm")
    assert dciodvfy_errors(seg_path) == []
    read = hd.seg.segread(seg_path)
    assert len(read.SegmentSequence) == 2
    decoded = read.get_pixels_by_source_instance([str(s.SOPInstanceUID) for s in sources], rescale_fractional=False)
    assert not decoded.any() and decoded.shape == (SLICES, SIZE, SIZE, 2)
    sr_path = _written(volumetric_measurement_report(sources, empty, seg, ALGORITHM), tmp_path / "sr.dcm")
    assert dciodvfy_errors(sr_path) == []
    assert read_volumetric_measurement_report(pydicom.dcmread(sr_path)) == []
    reported = read_measurement_report(pydicom.dcmread(sr_path))
    assert [(f.finding.value, f.present) for f in reported] == [("27925004", False), ("4147007", False)]


def test_enhanced_sr_keeps_the_lesions_without_their_centroids(sources, tmp_path, dcmtk):
    segmentation = _segmentation(sources, TWO_NODULES)
    seg = segmentation_object(sources, segmentation, ALGORITHM)
    sr = volumetric_measurement_report(sources, segmentation, seg, ALGORITHM, sop_class="enhanced")
    assert sr.SOPClassUID == EnhancedSRStorage
    assert dciodvfy_errors(_written(sr, tmp_path / "sr.dcm")) == []
    lesions = read_volumetric_measurement_report(sr)
    assert [lesion.identifier for lesion in lesions] == ["nodule 1", "nodule 2"]
    assert all(lesion.centroid is None and lesion.segment_number == 1 for lesion in lesions)
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert SegmentationStorage in {i.ReferencedSOPClassUID for s in evidence for i in s.ReferencedSOPSequence}
