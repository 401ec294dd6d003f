"""The segmentation demo in a node: a synthetic study whose nodules the phantom drew, sent
with storescu; back come a SEG and a TID 1500 SR per series, checked against the truth
and by dciodvfy."""

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from prometheus_client import CollectorRegistry
from scipy import ndimage

from plugin.app import Node
from plugin.config import NodeConfig
from plugin.demo.series import SyntheticSeries, write_synthetic_study
from plugin.outputs.sr import read_measurement_report, read_volumetric_measurement_report
from tests.conftest import REPO, dciodvfy_errors, node_config, results, storescu, wait_for, write_pipeline

SEG_DEMO = REPO / "pipelines" / "lung-nodule-seg-demo.yaml"
NODULE = "27925004"
SLICES = 40


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> list[SyntheticSeries]:
    """A series with nodules and one without (vessels seen end-on), 40 slices each."""
    return write_synthetic_study(tmp_path_factory.mktemp("study"), seed=11, n_slices=SLICES)


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory, study: list[SyntheticSeries]) -> dict[str, list[Path]]:
    """What a node serving the segmentation demo writes for the study, by series description."""
    work = tmp_path_factory.mktemp("node")
    write_pipeline(work / "pipelines", SEG_DEMO)
    node = Node(NodeConfig.model_validate(node_config(work)), CollectorRegistry())
    node.start()
    try:
        sent = storescu(node.config.node.port, *(p for series in study for p in series.paths))
        assert sent.returncode == 0, sent.stderr
        wait_for(lambda: len(results(node.results_dir)) == 4, timeout=180, what="a SEG and an SR per series")
    finally:
        node.stop()
    by_series: dict[str, list[Path]] = {}
    for path in results(node.results_dir):
        dataset = pydicom.dcmread(path, stop_before_pixels=True)
        referenced = {str(r.ReferencedSOPInstanceUID) for r in _referenced_images(dataset)}
        [series] = [s for s in study if referenced & {_uid(p) for p in s.paths}]
        by_series.setdefault(series.description, []).append(path)
    return by_series


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _referenced_images(dataset: pydicom.Dataset) -> list[pydicom.Dataset]:
    if "ReferencedSeriesSequence" in dataset:  # SEG
        return list(dataset.ReferencedSeriesSequence[0].ReferencedInstanceSequence)
    return [i for s in dataset.CurrentRequestedProcedureEvidenceSequence for r in s.ReferencedSeriesSequence
            for i in r.ReferencedSOPSequence]  # fmt: skip


def _split(paths: list[Path]) -> tuple[Path, Path]:
    [seg] = [p for p in paths if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"]
    [sr] = [p for p in paths if p != seg]
    return seg, sr


def test_the_seg_outlines_the_drawn_nodules_and_the_sr_measures_them(study, written):
    positive = study[0]
    seg_path, sr_path = _split(written[positive.description])
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []

    seg = hd.seg.segread(seg_path)
    uids = [_uid(p) for p in positive.paths]  # paths[i] holds volume.mask[i]
    masks = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)[..., 0] > 0
    truth = positive.volume.mask > 0
    dice = 2 * (masks & truth).sum() / (masks.sum() + truth.sum())
    print(f"Dice of the SEG with the phantom's nodules: {dice:.3f}")
    assert dice >= 0.8

    lesions = read_volumetric_measurement_report(pydicom.dcmread(sr_path))
    assert {lesion.segmentation_sop_instance_uid for lesion in lesions} == {str(seg.SOPInstanceUID)}
    assert {lesion.segment_number for lesion in lesions} == {1}
    assert len(lesions) == _components(masks)  # one measurement group per outlined lesion
    for nodule in positive.nodules():
        nearest = min(lesions, key=lambda lesion: np.linalg.norm(np.subtract(lesion.centroid, nodule.centroid)))
        error = nearest.volume_mm3 / nodule.volume_mm3 - 1
        print(f"nodule {nodule.diameter_mm:.1f} mm: {nearest.volume_mm3:.0f} mm3 against {nodule.volume_mm3:.0f} drawn")
        assert np.linalg.norm(np.subtract(nearest.centroid, nodule.centroid)) < nodule.diameter_mm / 4
        assert abs(error) <= 0.15  # issue 13's bound for nodules of 5 mm and more
        assert abs(nearest.diameter_mm - nodule.diameter_mm) <= 0.25 * nodule.diameter_mm


def test_a_series_without_nodules_gets_an_sr_of_what_its_seg_outlines(study, written):
    negative = study[1]
    seg_path, sr_path = _split(written[negative.description])
    assert dciodvfy_errors(seg_path) == [] and dciodvfy_errors(sr_path) == []
    report = pydicom.dcmread(sr_path)
    seg = hd.seg.segread(seg_path)
    masks = seg.get_pixels_by_source_instance([_uid(p) for p in negative.paths])[..., 0] > 0
    # the model alone outlines 3 places here (two vessel ends, one branching in the slice
    # plane): the pipeline's lesion filters (min_mean_probability, min_compactness) drop them
    assert read_volumetric_measurement_report(report) == []
    assert not masks.any()
    [absent] = read_measurement_report(report)  # an SR that says so
    assert (absent.finding.value, absent.present) == (NODULE, False)


def _components(masks: np.ndarray) -> int:
    return int(ndimage.label(masks, structure=np.ones((3, 3, 3)))[1])
