"""Editing pipeline files under a running node changes what happens to the next study."""

import pydicom
import yaml

from plugin.outputs.sr import read_measurement_report
from tests.conftest import PYDICOM_FILES, results, storescu, wait_for, with_new_uids, write_pipeline


def _reloads(node, result):
    return node.metrics.registry.get_sample_value("radpipe_config_reloads_total", {"result": result})


def _after_reload(node, result, before):
    # Typically ~0.4 s (0.3 s debounce); the bound is generous so a loaded CI machine cannot flake.
    wait_for(lambda: _reloads(node, result) > before, timeout=15, what=f"a reload ({result})")


def _closed(node, path):
    record = node.journal.instance(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    return record is not None and record.batch_id is not None and record


def test_new_pipeline_file_starts_routing_and_deleting_it_stops(start_node, tmp_path, dcmtk):
    node = start_node()
    mr = with_new_uids([PYDICOM_FILES / "MR_small.dcm"], tmp_path / "mr1")
    assert storescu(node.port, *mr).returncode == 0
    record = wait_for(lambda: _closed(node, mr[0]), what="MR series closed")
    assert node.journal.batch_routing(record.batch_id) == "unrouted"

    before = _reloads(node, "ok")
    added = write_pipeline(tmp_path / "pipelines", name="mr-demo", match={"Modality": "MR"})
    _after_reload(node, "ok", before)
    mr = with_new_uids([PYDICOM_FILES / "MR_small.dcm"], tmp_path / "mr2")
    assert storescu(node.port, *mr).returncode == 0
    record = wait_for(lambda: _closed(node, mr[0]), what="MR series closed")
    assert node.journal.batch_routing(record.batch_id) == "routed"
    wait_for(lambda: results(node.results_dir), what="the MR pipeline's SR")

    before = _reloads(node, "ok")
    added.unlink()
    _after_reload(node, "ok", before)
    mr = with_new_uids([PYDICOM_FILES / "MR_small.dcm"], tmp_path / "mr3")
    assert storescu(node.port, *mr).returncode == 0
    record = wait_for(lambda: _closed(node, mr[0]), what="MR series closed")
    assert node.journal.batch_routing(record.batch_id) == "unrouted"


def test_changed_threshold_changes_the_verdict(start_node, tmp_path, demo_study, dcmtk):
    node = start_node()
    positive = demo_study["Demo chest CT, nodules"]
    assert storescu(node.port, *positive).returncode == 0
    [first] = wait_for(lambda: results(node.results_dir), what="first SR")
    [finding] = read_measurement_report(pydicom.dcmread(first))
    assert finding.probability < 1.0
    # A threshold on the other side of this probability flips the verdict for the same pixels.
    threshold = (finding.probability + 1) / 2 if finding.present else finding.probability / 2

    before = _reloads(node, "ok")
    path = tmp_path / "pipelines" / "lung-nodule-demo.yaml"
    data = yaml.safe_load(path.read_text())
    data["version"] = 2
    data["postprocess"]["findings"][0]["threshold"] = threshold
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    _after_reload(node, "ok", before)

    assert storescu(node.port, *with_new_uids(positive, tmp_path / "again")).returncode == 0
    second = wait_for(lambda: [p for p in results(node.results_dir) if p != first], what="second SR")
    [again] = read_measurement_report(pydicom.dcmread(second[0]))
    assert again.probability == finding.probability
    assert again.present != finding.present
    assert again.algorithm_version.startswith("2 ")
    assert [j.pipeline_version for j in node.journal.jobs()] == ["1", "2"]


def test_invalid_edit_keeps_the_last_good_pipelines(start_node, tmp_path, demo_study, dcmtk, caplog):
    node = start_node()
    path = tmp_path / "pipelines" / "lung-nodule-demo.yaml"
    before = _reloads(node, "error")
    path.write_text(path.read_text().replace("Modality: CT", "Modalty: CT"))
    _after_reload(node, "error", before)
    assert f"{path}:4:3: match.Modalty: unknown DICOM keyword 'Modalty'" in caplog.text
    assert [p.name for p in node.router.pipelines] == ["lung-nodule-demo"]

    series = demo_study["Demo chest CT, no nodules"][:4]
    assert storescu(node.port, *series).returncode == 0
    wait_for(lambda: results(node.results_dir), what="an SR from the last good pipeline")
