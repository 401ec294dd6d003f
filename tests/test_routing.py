"""Several pipelines on one series, priorities, and a study-level pipeline picking one series."""

import pydicom

from plugin.outputs.sr import read_measurement_report
from tests.conftest import results, storescu, wait_for, write_pipeline


def _done(node, count):
    jobs = node.journal.jobs()
    return len(jobs) == count and all(j.status == "done" for j in jobs) and jobs


def test_every_matching_pipeline_runs_in_priority_order(start_node, tmp_path, demo_study, dcmtk):
    write_pipeline(tmp_path / "pipelines", name="routine", priority=0)
    write_pipeline(tmp_path / "pipelines", name="urgent", priority=50)
    node = start_node()
    assert storescu(node.port, *demo_study["Demo chest CT, nodules"]).returncode == 0
    jobs = wait_for(lambda: _done(node, 2), what="two jobs")
    assert sorted(jobs, key=lambda j: j.started_at)[0].pipeline == "urgent"
    names = {read_measurement_report(pydicom.dcmread(p))[0].algorithm_name for p in results(node.results_dir)}
    assert names == {"routine", "urgent"}


def test_study_level_pipeline_runs_once_on_the_selected_series(start_node, tmp_path, demo_study, dcmtk):
    write_pipeline(
        tmp_path / "pipelines",
        name="study-demo",
        completion={"level": "study", "quiet_seconds": 1},
        input={"series": {"SeriesDescription": {"regex": "no nodules"}}},
    )
    node = start_node()
    for paths in demo_study.values():
        assert storescu(node.port, *paths).returncode == 0
    wait_for(lambda: _done(node, 1), what="one study job")
    [sr_path] = results(node.results_dir)
    [finding] = read_measurement_report(pydicom.dcmread(sr_path))
    chosen = {str(pydicom.dcmread(p).SOPInstanceUID) for p in demo_study["Demo chest CT, no nodules"]}
    assert set(finding.source_sop_instance_uids) == chosen
