"""The runner's lanes (``runner.concurrent_jobs``): with two, two series' jobs run at the
same time, and each series still gets exactly its own result."""

from itertools import combinations

import pytest
import yaml

from tests.conftest import series_findings, storescu, wait_for, with_new_uids, write_pipeline


@pytest.mark.parametrize("lanes", [1, 2])
def test_jobs_run_side_by_side_on_two_lanes_only(start_node, tmp_path, demo_study, dcmtk, lanes):
    pipeline = write_pipeline(tmp_path / "pipelines")
    data = yaml.safe_load(pipeline.read_text())
    data["model"]["batch_size"] = 8  # 24 slices: no short batch for a lane to fill with the next series
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))
    node = start_node(runner={"concurrent_jobs": lanes})
    series = [with_new_uids(demo_study["Demo chest CT, nodules"], tmp_path / str(i)) for i in range(4)]
    assert storescu(node.port, *[f for s in series for f in s]).returncode == 0

    def finished():
        jobs = node.journal.jobs()
        return len(jobs) == 4 and all(j.status == "done" for j in jobs) and jobs

    jobs = wait_for(finished, what="four jobs done")
    side_by_side = [
        (a.id, b.id) for a, b in combinations(jobs, 2) if a.started_at < b.finished_at and b.started_at < a.finished_at
    ]
    assert bool(side_by_side) == (lanes == 2), side_by_side

    probabilities = [finding.probability for finding in series_findings(node.results_dir, series)]
    assert max(probabilities) - min(probabilities) < 1e-5  # the same pixels: the same score, on any lane
