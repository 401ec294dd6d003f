"""The runner's rate with one lane against two (``runner.concurrent_jobs``), nothing else running.

A node that runs no pipeline receives ``--series`` CT series of ``--slices`` slices (2
storescu); then each round gives the demo pipeline a fresh journal holding those
instances, one job per series, and lets 1 or 2 :class:`~plugin.runner.Runner` lanes
(sharing a :class:`~plugin.runner.Lanes`, as ``radpipe serve`` makes them) run every job:
images per second from the first claim to the last result written, median of the
interleaved rounds. Nothing is sent on; the model is the demo's (fp32) or ``--artifact``.

Run: .venv/bin/python -m benchmarks.lanes [--series 20] [--slices 100] [--rounds 3]
     [--artifact DIR] [--json out.json]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry

from benchmarks.common import ct_series, report, scratch
from benchmarks.end_to_end import PIPELINE, pipelines, send_concurrently, start, stop
from plugin.cli import GIL_SWITCH_SECONDS
from plugin.journal import InstanceRecord, Journal
from plugin.metrics import Metrics
from plugin.models.pool import ModelPool
from plugin.outputs.conformance import load_tables
from plugin.pipeline import Pipeline, load_pipeline
from plugin.prepare import Preparer
from plugin.quarantine import Quarantine
from plugin.replay import queued_locally
from plugin.router import Router
from plugin.runner import Lanes, Runner


def runner_rate(out: Path, records: list[InstanceRecord], pipeline: Pipeline, pool: ModelPool, lanes: int) -> float:
    """Images/s of ``lanes`` lanes running one job per series of ``records``."""
    journal = queued_locally(pipeline, records, out / "journal.sqlite")
    metrics, router, shared = Metrics(CollectorRegistry()), Router([pipeline]), Lanes()
    quarantine = Quarantine(out / "quarantine")
    runners = [
        Runner(journal, router, pool, out / "results", [], quarantine, metrics, Preparer(0), shared)
        for _ in range(lanes)
    ]
    start_time = time.perf_counter()
    for runner in runners:
        runner.start()
    while (depths := journal.queue_depths())["jobs"] or depths["running"]:
        time.sleep(0.05)
    seconds = time.perf_counter() - start_time
    for runner in runners:
        runner.stop()
    if failed := [job for job in journal.jobs() if job.status != "done"]:
        raise RuntimeError(f"{len(failed)} job(s) not done: {failed[0]}")
    journal.close()
    return len(records) / seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=20)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--artifact", type=Path, help="the model artifact to run instead of the demo's")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sys.setswitchinterval(GIL_SWITCH_SECONDS)  # as radpipe serve sets it

    work = scratch("radpipe-lanes-")
    series = [ct_series(work / f"series-{i}", args.slices, seed=i + 1) for i in range(args.series)]
    (work / "ingest").mkdir()
    node, port, _ = start(work / "ingest", pipelines(work, args.artifact, matching=False), 0)
    try:
        send_concurrently(port, series, 2)
    finally:
        stop(node)
    node_journal = Journal(work / "ingest" / "data" / "journal.sqlite")
    records = node_journal.received_instances()
    node_journal.close()
    pipeline = load_pipeline(pipelines(work, args.artifact, matching=True) / PIPELINE.name)
    pool = ModelPool(Metrics(CollectorRegistry()))
    pool.get(pipeline)  # loaded (and, int8, compiled) before the first round, as a started node has it
    load_tables()  # and highdicom's tables read

    rates: dict[int, list[float]] = {1: [], 2: []}
    for index in range(args.rounds):
        for lanes in (1, 2):
            out = work / f"round-{index}-{lanes}"
            out.mkdir()
            rates[lanes].append(round(runner_rate(out, records, pipeline, pool, lanes), 1))
    figures = {
        "series": args.series,
        "slices_per_series": args.slices,
        "artifact": str(args.artifact or pipeline.model.artifact),
        "one_lane_images_per_second": rates[1],
        "two_lanes_images_per_second": rates[2],
        "two_lanes_to_one_median": round(statistics.median(rates[2]) / statistics.median(rates[1]), 2),
    }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
