"""End to end: CT series through a real `radpipe serve` running the demo pipeline, with
the SRs delivered to a PACS (dcmtk storescp), compared with the raw model in the same run.

1. raw model: the demo artifact on the same preprocessed slices, in batches of the
   pipeline's batch size, with nothing else running: images/s;
2. throughput: 20 series of 100 slices sent by ``--senders`` concurrent storescu
   (TCP_NODELAY=1); instances/s from the first byte sent to the last SR delivered, and
   the same without the last series' quiet period (which no node can skip);
   with the node's time per image by stage, from its metrics (load, preprocess and
   write: the non-model overhead);
3. latency: 24-slice series sent one at a time; from the last instance's success to the
   SR delivered, minus the quiet period: p50 and p95.

With ``--artifact DIR`` the demo pipeline runs that model artifact instead (e.g. the
pruned int8 one), and the same node first receives the same series with the pipeline
matching nothing (Modality MR): its ingest-only rate, against which end to end is set,
and how fast the node receives them with the pipeline against without it. The runner's
own rate (by its metrics: images over the sum of its jobs' stage seconds) is reported
too: a series is complete a quiet period (5 s) after its last instance, so unless
receiving takes longer than that the jobs run once it has ended, and that rate bounds end
to end. With two lanes (``runner.concurrent_jobs``) the jobs' stages overlap, and it is
one lane's rate: the runner takes more.

Run: .venv/bin/python -m benchmarks.end_to_end [--series 20] [--slices 100] [--decode-workers auto]
     [--artifact DIR] [--json out.json]
"""

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pydicom
import torch
from prometheus_client import CollectorRegistry

from benchmarks.common import (
    ENV,
    REPO,
    ct_series,
    free_port,
    node_config,
    pipeline_folder,
    report,
    scratch,
    serve,
    stage_seconds,
    storescu,
    wait_for_echo,
    wait_for_log,
)
from plugin.loader import modality_frames
from plugin.metrics import Metrics
from plugin.models.pool import ModelPool
from plugin.pipeline import Pipeline, load_pipeline
from plugin.preprocess import preprocess

PIPELINE = REPO / "pipelines" / "lung-nodule-demo.yaml"
# The runner's stages besides the model's: reading headers, decoding, preprocessing, writing results.
OVERHEAD = ("load", "preprocess", "write")
# The runner's stages: all but the wait for completion and the dispatcher's send.
RUNNER = (*OVERHEAD, "infer")


def raw_model_rate(pipeline: Pipeline, files: list[Path], images: int) -> float:
    """Images/s of the pipeline's model alone on ``files`` preprocessed (repeated to ``images``)."""
    pool = ModelPool(Metrics(CollectorRegistry()))
    artifact = pool.get(pipeline)
    slices = torch.cat([preprocess(pipeline.preprocess, torch.from_numpy(modality_frames(pydicom.dcmread(f)))[:, None])
                        for f in files])  # fmt: skip
    repeats = -(-images // len(slices))
    batches = slices.repeat(repeats, 1, 1, 1)[:images].split(pipeline.model.batch_size)
    pool.infer(artifact, batches[0])  # warm-up
    start = time.perf_counter()
    for batch in batches:
        pool.infer(artifact, batch)
    return sum(len(b) for b in batches) / (time.perf_counter() - start)


def wait_for_results(folder: Path, count: int, timeout: float = 600) -> float:
    """Wait until ``folder`` holds ``count`` files; return the time it did."""
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(list(folder.iterdir()))} of {count} results after {timeout} s")
        time.sleep(0.005)
    return time.perf_counter()


def send_concurrently(port: int, series: list[list[Path]], senders: int) -> None:
    """Each sender sends its share of the series over one association."""
    shares = [[f for s in series[i::senders] for f in s] for i in range(senders)]
    threads = [threading.Thread(target=storescu, args=(port, share)) for share in shares if share]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


def pipelines(work: Path, artifact: Path | None, matching: bool) -> Path:
    """A folder holding the demo pipeline, with ``artifact`` as its model if given; not
    ``matching``, it takes no series (Modality MR): the node receives and stores only."""

    def edit(pipeline: dict) -> None:
        if artifact:
            pipeline["model"]["artifact"] = str(artifact.absolute())
        if not matching:
            pipeline["match"]["Modality"] = "MR"

    folder = work / ("pipelines" if matching else "pipelines-matching-nothing")
    pipeline_folder(folder, PIPELINE, edit)
    return folder


def start(work: Path, folder: Path, decode_workers: int | str, destinations: dict | None = None) -> tuple:
    """``radpipe serve`` on ``folder``'s pipeline, once it listens and has loaded its
    model: (process, port, metrics port)."""
    port, metrics_port = free_port(), free_port()
    config = node_config(
        work, port, folder, metrics_port, runner={"decode_workers": decode_workers}, destinations=destinations or {}
    )
    node = serve(work, config, work / "node.log")
    wait_for_echo(port)
    wait_for_log(work / "node.log", " ready: ")
    return node, port, metrics_port


def stop(node: subprocess.Popen) -> None:
    node.terminate()
    node.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--senders", type=int, default=2)
    parser.add_argument("--latency-series", type=int, default=10)
    parser.add_argument("--decode-workers", default="auto", type=lambda v: v if v == "auto" else int(v),
                        help="the node's runner.decode_workers")  # fmt: skip
    parser.add_argument("--artifact", type=Path, help="the model artifact to run instead of the demo's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = scratch("radpipe-e2e-")
    folder = pipelines(work, args.artifact, matching=True)
    pipeline = load_pipeline(folder / PIPELINE.name)
    quiet = pipeline.completion.quiet_seconds
    series = [ct_series(work / f"series-{i}", args.slices, seed=i + 1) for i in range(args.series)]
    small = [ct_series(work / f"small-{i}", 24, seed=1000 + i) for i in range(args.latency_series)]
    instances = sum(map(len, series))
    raw = raw_model_rate(pipeline, series[0], 2000)

    receive_alone = None  # seconds the ingest-only node took to receive the series
    if args.artifact:
        (work / "ingest-only").mkdir()
        node, port, _ = start(work / "ingest-only", pipelines(work, args.artifact, False), args.decode_workers)
        try:
            os.sync()
            start_time = time.perf_counter()
            send_concurrently(port, series, args.senders)
            receive_alone = time.perf_counter() - start_time
        finally:
            stop(node)

    pacs_port = free_port()
    pacs_dir = work / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)], env=ENV, stderr=subprocess.DEVNULL
    )
    destinations = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}}
    node, node_port, metrics_port = start(work, folder, args.decode_workers, destinations)
    try:
        wait_for_echo(pacs_port, "PACS")
        os.sync()  # the generated series must not be flushed on the node's account
        start_time = time.perf_counter()
        send_concurrently(node_port, series, args.senders)
        sent = time.perf_counter()
        delivered = wait_for_results(pacs_dir, len(series))
        total = delivered - start_time
        stages = stage_seconds(metrics_port, pipeline.name)
        latencies = []
        for index, files in enumerate(small):
            acknowledged = time.perf_counter() + storescu(node_port, files)
            latencies.append(wait_for_results(pacs_dir, len(series) + index + 1) - acknowledged - quiet)
    finally:
        stop(node)
        pacs.terminate()
        pacs.wait(10)

    rate = instances / (total - quiet)
    figures = {
        "series": args.series,
        "slices_per_series": args.slices,
        "senders": args.senders,
        "decode_workers": args.decode_workers,
        "artifact": str(args.artifact or pipeline.model.artifact),
        "raw_model_images_per_second": round(raw, 1),
        "receive_seconds": round(sent - start_time, 2),
        "first_byte_to_last_sr_seconds": round(total, 2),
        "end_to_end_instances_per_second": round(instances / total, 1),
        "ratio_to_raw_model": round(instances / total / raw, 2),
        "without_last_quiet_period_instances_per_second": round(rate, 1),
        "ratio_to_raw_model_without_last_quiet_period": round(rate / raw, 2),
        **(
            {
                "ingest_only_instances_per_second": round(instances / receive_alone, 1),
                "ratio_to_ingest_only_without_last_quiet_period": round(rate * receive_alone / instances, 2),
                # 1: the series were received as fast with the pipeline matching as without.
                "receive_speed_to_ingest_only": round(receive_alone / (sent - start_time), 2),
            }
            if receive_alone
            else {}
        ),
        # The node's time per image, by stage (its metrics).
        "runner_ms_per_image": {stage: round(seconds / instances * 1000, 2) for stage, seconds in stages.items()},
        "non_model_ms_per_image": round(sum(v for k, v in stages.items() if k in OVERHEAD) / instances * 1000, 2),
        # What one of the runner's lanes can take: once the series complete after receiving
        # ends, end to end is bounded by this rate (times the lanes at most), not by the receiving.
        "runner_images_per_second": round(instances / sum(v for k, v in stages.items() if k in RUNNER), 1),
        "latency_series_slices": 24,
        "quiet_seconds": quiet,
        "beyond_quiet_p50_seconds": round(statistics.median(latencies), 3),
        "beyond_quiet_p95_seconds": round(statistics.quantiles(latencies, n=20, method="inclusive")[-1], 3),
        "beyond_quiet_max_seconds": round(max(latencies), 3),
    }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
