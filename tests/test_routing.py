"""Several pipelines on one series, priorities, a study-level pipeline picking one series,
and the shipped demo pipeline keeping to the synthetic studies it was made for."""

import subprocess
import sys

import pydicom

from plugin.outputs.sr import read_measurement_report
from tests.conftest import DEID_HUMANS, PYDICOM_FILES, REPO, results, storescu, wait_for, write_pipeline


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


def test_the_shipped_demo_pipelines_take_only_synthetic_studies(start_node, demo_study, dcmtk):
    brain, ct_small = DEID_HUMANS / "ctbrain1.dcm", PYDICOM_FILES / "CT_small.dcm"  # real CT, SIEMENS and GE
    synthetic = demo_study["Demo chest CT, no nodules"][:2]
    route = subprocess.run(
        [sys.executable, "-m", "plugin", "route", "--explain", str(brain), str(ct_small), str(synthetic[0])],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,  # no config: ./pipelines, the shipped folder
    )
    assert route.returncode == 0, route.stdout + route.stderr
    assert route.stdout.splitlines() == [
        f"{brain}:",
        "  no match  lung-nodule-demo v1: Manufacturer == 'radpipe' failed (actual: SIEMENS)",
        "  no match  lung-nodule-seg-demo v1: Manufacturer == 'radpipe' failed (actual: SIEMENS)",
        f"{ct_small}:",
        "  no match  lung-nodule-demo v1: Manufacturer == 'radpipe' failed (actual: GE MEDICAL SYSTEMS)",
        "  no match  lung-nodule-seg-demo v1: Manufacturer == 'radpipe' failed (actual: GE MEDICAL SYSTEMS)",
        f"{synthetic[0]}:",
        "  match     lung-nodule-demo v1",
        "  match     lung-nodule-seg-demo v1",
    ]

    node = start_node()  # the shipped pipeline, copied
    for files, options in (([brain], ("-xy",)), ([ct_small], ()), (synthetic, ())):
        assert storescu(node.port, *files, options=options).returncode == 0
    for real in (brain, ct_small):
        uid = str(pydicom.dcmread(real, stop_before_pixels=True).SOPInstanceUID)
        batch = wait_for(lambda uid=uid: node.journal.instance(uid).batch_id, what=f"{real.name} assembled")
        assert node.journal.batch_routing(batch) == "unrouted"
    wait_for(lambda: _done(node, 1), what="the synthetic series' job (and no other)")
    [sr] = results(node.results_dir)
    [finding] = read_measurement_report(pydicom.dcmread(sr))
    assert set(finding.source_sop_instance_uids) == {str(pydicom.dcmread(p).SOPInstanceUID) for p in synthetic}
