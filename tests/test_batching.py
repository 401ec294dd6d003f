"""Batches across series: short series share model calls, and each still gets exactly its
own scores, references and failure, whether images are decoded in the runner's thread or
on worker processes, and is charged its share of the calls' time."""

import time

import pydicom
import pytest
import torch
import yaml
from prometheus_client import CollectorRegistry
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless

from plugin.journal import JobRecord
from plugin.metrics import Metrics
from plugin.models.pool import ModelPool
from plugin.pipeline import load_pipeline
from plugin.runner import Batcher, Lanes, Work
from tests.conftest import DEMO_PIPELINE, series_findings, storescu, wait_for, with_new_uids, write_pipeline


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
    # One lane: with two, each would batch the series it took (tests/test_lanes.py).
    node = start_node(runner={"decode_workers": decode_workers, "concurrent_jobs": 1})
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

    # Identical pixels, different places in the batches: the same score.
    reported = series_findings(node.results_dir, valid)
    probabilities = [finding.probability for finding in reported]
    assert max(probabilities) - min(probabilities) < 1e-5
    assert all(finding.present for finding in reported)


def test_jobs_sharing_a_model_call_are_each_charged_their_share_of_it() -> None:
    """The infer stage's seconds over all jobs add up to the model's time: a call that
    two jobs share is not counted once for each (benchmarks divide them by images)."""
    pipeline = load_pipeline(DEMO_PIPELINE)
    metrics = Metrics(CollectorRegistry())
    pool = ModelPool(metrics)
    artifact = pool.get(pipeline)
    lanes = Lanes()
    batcher = Batcher(pool, artifact, 32, metrics, lanes)
    jobs = [
        Work(JobRecord(n, n, pipeline.name, pipeline.version, pipeline.sha256, 0, "running", None, 0.0, 0.0, None),
             pipeline, artifact, [])
        for n in (1, 2)
    ]  # fmt: skip
    images = torch.rand(24, 1, 128, 128)
    pool.infer(artifact, images[:8])  # warm-up: the first call is not what is measured

    start = time.perf_counter()
    with lanes.working():  # as a runner's lane holds a job
        for work in jobs:
            batcher.add(work, images)  # 24 + 24 images: a call of 32 that both share, then one of 16
        batcher.flush()
    elapsed = time.perf_counter() - start

    assert [sum(len(part) for part in work.logits) for work in jobs] == [24, 24]
    charged = [work.timer.seconds["infer"] for work in jobs]
    assert all(seconds > 0 for seconds in charged)
    assert sum(charged) <= elapsed
