"""Round trip through a real PACS: Orthanc sends a study to radpipe, radpipe's SR (and SEG)
comes back into the same study in Orthanc. Orthanc (Debian package) starts once per session."""

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest

from plugin.app import Node
from plugin.demo.series import write_synthetic_study
from plugin.outputs.sr import read_measurement_report, read_volumetric_measurement_report
from tests.conftest import REPO, free_port, wait_for, write_pipeline
from tests.orthanc import Orthanc, stop_packaged_service

RADPIPE_AET = "RADPIPE"
NODULE = ("27925004", "SCT")
SEG_DEMO = REPO / "pipelines" / "lung-nodule-seg-demo.yaml"


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    """Orthanc on free loopback ports; it knows radpipe as modality ``radpipe`` on a port
    reserved here, on which the test then starts the node."""
    stop_packaged_service()
    radpipe_port = free_port()
    server = Orthanc(
        tmp_path_factory.mktemp("orthanc"),
        http_port=free_port(),
        dicom_port=free_port(),
        aet="ORTHANC",
        modalities={"radpipe": {"AET": RADPIPE_AET, "Host": "127.0.0.1", "Port": radpipe_port}},
    )
    server.start()
    yield server
    server.stop()


def start_radpipe_for(orthanc: Orthanc, start_node: Callable[..., Node]) -> Node:
    """A node on the port Orthanc knows it by, sending its results to Orthanc."""
    return start_node(
        node={"port": orthanc.modalities["radpipe"]["Port"], "ae_title": RADPIPE_AET},
        destinations={"orthanc": {"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}},
    )


def test_orthanc_echoes_radpipe(orthanc: Orthanc, start_node: Callable[..., Node]) -> None:
    start_radpipe_for(orthanc, start_node)
    assert orthanc.post("/modalities/radpipe/echo", {}) == {}


def test_study_sent_by_orthanc_comes_back_with_an_sr_per_series(
    orthanc: Orthanc, start_node: Callable[..., Node], demo_study: dict[str, list[Path]]
) -> None:
    node = start_radpipe_for(orthanc, start_node)
    sop_uids = {
        description: {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
        for description, paths in demo_study.items()
    }
    answers = [orthanc.upload(p) for paths in demo_study.values() for p in paths]
    [study_id] = {a["ParentStudy"] for a in answers}
    before = {i["ID"] for i in orthanc.get(f"/studies/{study_id}/instances")}

    job = orthanc.post("/modalities/radpipe/store", {"Resources": [study_id], "Synchronous": True})
    assert job.get("FailedInstancesCount", 0) == 0, job
    assert job["InstancesCount"] == sum(map(len, demo_study.values()))

    def new_srs() -> list[dict]:
        instances = orthanc.get(f"/studies/{study_id}/instances")
        return [i for i in instances if i["ID"] not in before]

    srs = wait_for(lambda: len(new_srs()) == len(demo_study) and new_srs(), timeout=90, what="both SRs in Orthanc")
    reports: dict[str, list] = {}
    for instance in srs:
        dataset = pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{instance['ID']}/file")))
        assert dataset.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
        [finding] = read_measurement_report(dataset)
        [description] = [d for d, uids in sop_uids.items() if uids & set(finding.source_sop_instance_uids)]
        reports[description] = [finding, dataset]
    assert set(reports) == set(demo_study)

    for description, (finding, dataset) in reports.items():
        assert (finding.finding.value, finding.finding.scheme_designator) == NODULE
        assert 0.0 <= finding.probability <= 1.0
        assert finding.present == (finding.probability >= 0.5)
        # Every image of its series, and only those, is referenced.
        assert set(finding.source_sop_instance_uids) == sop_uids[description]
        assert finding.algorithm_name == "lung-nodule-demo"
        assert str(dataset.StudyInstanceUID) == str(pydicom.dcmread(demo_study[description][0]).StudyInstanceUID)
        # What Orthanc holds is what radpipe wrote (the model's verdicts are tested in test_node).
        written = pydicom.dcmread(node.results_dir / str(dataset.StudyInstanceUID) / f"{dataset.SOPInstanceUID}.dcm")
        assert read_measurement_report(written) == [finding]

    # radpipe knows Orthanc accepted each result (the journal counts a delivery only on success).
    def deliveries() -> list:
        return [d for j in node.journal.jobs() for d in node.journal.deliveries(j.id)]

    wait_for(lambda: all(d.status == "delivered" for d in deliveries()), timeout=30, what="deliveries journaled")
    assert sorted(d.destination for d in deliveries()) == ["orthanc", "orthanc"]


def test_a_segmentation_comes_back_as_a_seg_and_an_sr_whose_references_resolve(
    orthanc: Orthanc, start_node: Callable[..., Node], tmp_path: Path
) -> None:
    """The segmentation demo on a series sent by Orthanc: the SEG and the SR land in the
    series' study, and each lesion's referenced segment is a segment of that SEG."""
    [series, _] = write_synthetic_study(tmp_path / "study", seed=11, n_slices=40)
    write_pipeline(tmp_path / "pipelines", SEG_DEMO)
    start_radpipe_for(orthanc, start_node)
    answers = [orthanc.upload(p) for p in series.paths]
    [study_id] = {a["ParentStudy"] for a in answers}
    before = {i["ID"] for i in orthanc.get(f"/studies/{study_id}/instances")}
    job = orthanc.post("/modalities/radpipe/store", {"Resources": [study_id], "Synchronous": True})
    assert job.get("FailedInstancesCount", 0) == 0, job

    def new_instances() -> list[dict]:
        return [i for i in orthanc.get(f"/studies/{study_id}/instances") if i["ID"] not in before]

    arrived = wait_for(lambda: len(new_instances()) == 2 and new_instances(), timeout=120, what="SEG and SR in Orthanc")
    by_class = {}
    for instance in arrived:
        dataset = pydicom.dcmread(io.BytesIO(orthanc.request("GET", f"/instances/{instance['ID']}/file")))
        by_class[str(dataset.SOPClassUID)] = dataset
    seg, sr = by_class[pydicom.uid.SegmentationStorage], by_class[pydicom.uid.Comprehensive3DSRStorage]
    lesions = read_volumetric_measurement_report(sr)
    assert lesions, "the demo model outlines the series' nodules"
    segment_numbers = {int(s.SegmentNumber) for s in seg.SegmentSequence}
    for lesion in lesions:
        assert lesion.segmentation_sop_instance_uid == str(seg.SOPInstanceUID)
        assert lesion.segment_number in segment_numbers
    # Orthanc finds the referenced SEG by its UID, in the same study
    [found] = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": str(seg.SOPInstanceUID)}})
    assert orthanc.get(f"/instances/{found}")["ParentSeries"] in orthanc.get(f"/studies/{study_id}")["Series"]
