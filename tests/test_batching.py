"""Batches across series: short series share model calls, and each still gets exactly its
own scores, references and failure, whether images are decoded in the runner's thread or
on worker processes. And inference ahead: a series is inferred while it waits out its
quiet period, and its job calls the model no more."""

import pydicom
import pytest
import yaml
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from plugin.outputs.sr import read_measurement_report
from tests.conftest import results, storescu, wait_for, with_new_uids, write_pipeline


def _break_pixel_data(path) -> None:
    """Keep the header, replace the pixels by a JPEG 2000 codestream no decoder accepts."""
    ds = pydicom.dcmread(path)
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(2000)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.save_as(path, enforce_file_format=True)


@pytest.mark.parametrize("decode_workers", [0, 2], ids=["in-thread", "worker-processes"])
def test_series_share_batches_and_keep_their_own_results(start_node, tmp_path, demo_study, dcmtk, decode_workers):
    pipeline = write_pipeline(tmp_path / "pipelines")
    data = yaml.safe_load(pipeline.read_text())
    data["model"]["batch_window_ms"] = 3000  # the series close within this of each other
    pipeline.write_text(yaml.safe_dump(data, sort_keys=False))
    # Without inference ahead, which would infer the series as they arrive, one by one.
    node = start_node(runner={"decode_workers": decode_workers, "infer_ahead": False})
    nodules = demo_study["Demo chest CT, nodules"]
    valid = [with_new_uids(nodules, tmp_path / str(i)) for i in range(3)]
    broken = with_new_uids(nodules, tmp_path / "broken")
    for path in broken:
        _break_pixel_data(path)

    # -xv: propose JPEG 2000 beside the uncompressed syntaxes, so the broken files go as they are.
    files = [*valid[0], *broken, *valid[1], *valid[2]]
    assert storescu(node.port, *files, options=("-xv",)).returncode == 0

    def finished():
        jobs = node.journal.jobs()
        return len(jobs) == 4 and all(j.status in ("done", "failed") for j in jobs) and jobs

    jobs = wait_for(finished, what="four jobs")
    assert sorted(j.status for j in jobs) == ["done", "done", "done", "failed"]
    [failed] = [j for j in jobs if j.status == "failed"]
    assert "cannot decode pixel data" in failed.error

    # 3 x 24 images at batch size 32: calls of 32, 32 and 8 when batches cross series;
    # 24, 24 and 24 if they stopped at each series' end.
    sample = node.metrics.registry.get_sample_value
    assert sample("radpipe_inference_batch_size_count") == 3
    assert sample("radpipe_inference_batch_size_sum") == 72
    assert sample("radpipe_inference_batch_size_bucket", {"le": "8.0"}) == 1

    reports = {}
    for path in results(node.results_dir):
        [finding] = read_measurement_report(pydicom.dcmread(path))
        reports[frozenset(finding.source_sop_instance_uids)] = finding
    expected = [frozenset(str(pydicom.dcmread(p).SOPInstanceUID) for p in series) for series in valid]
    assert set(reports) == set(expected)
    # Identical pixels, different places in the batches: the same score.
    probabilities = [reports[uids].probability for uids in expected]
    assert max(probabilities) - min(probabilities) < 1e-5
    assert all(reports[uids].present for uids in expected)


def _probability(results_dir) -> float:
    [path] = results(results_dir)
    [finding] = read_measurement_report(pydicom.dcmread(path))
    return finding.probability


def test_series_inferred_ahead_while_it_waits_out_its_quiet_period(start_node, tmp_path, demo_study, dcmtk):
    completion = {"level": "series", "quiet_seconds": 10, "max_wait_seconds": 600, "min_instances": 1}
    write_pipeline(tmp_path / "pipelines", completion=completion)
    node = start_node()
    nodules = demo_study["Demo chest CT, nodules"]
    broken = with_new_uids(nodules, tmp_path / "broken")
    for path in broken[:3]:
        _break_pixel_data(path)
    assert storescu(node.port, *nodules, *broken, options=("-xv",)).returncode == 0

    # Every decodable image inferred (24 + 21) while both series wait to complete.
    sample = node.metrics.registry.get_sample_value
    wait_for(lambda: sample("radpipe_inference_batch_size_sum") == 45, what="both series inferred ahead")
    assert node.journal.jobs() == []

    def finished():
        jobs = node.journal.jobs()
        return len(jobs) == 2 and all(j.status in ("done", "failed") for j in jobs) and jobs

    jobs = wait_for(finished, what="two jobs")
    assert sorted(j.status for j in jobs) == ["done", "failed"]
    [failed] = [j for j in jobs if j.status == "failed"]
    assert "cannot decode pixel data" in failed.error  # as without inference ahead
    # The valid series' job took its logits: no model call since, and its stages were counted once.
    assert sample("radpipe_inference_batch_size_sum") == 45
    labels = {"stage": "infer", "pipeline": "lung-nodule-demo"}
    assert sample("radpipe_stage_seconds_count", labels) == 1
    assert sample("radpipe_stage_seconds_sum", labels) > 0

    # The same series on a node that infers in the job: the same score.
    other = start_node(storage={"dir": str(tmp_path / "other")}, runner={"infer_ahead": False})
    assert storescu(other.port, *nodules).returncode == 0
    wait_for(lambda: [j for j in other.journal.jobs() if j.status == "done"], what="the job without ahead")
    assert abs(_probability(node.results_dir) - _probability(other.results_dir)) < 1e-5
