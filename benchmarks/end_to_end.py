"""End to end: CT series through a real `radpipe serve` running the demo pipeline, with
the SRs delivered to a PACS (dcmtk storescp), compared with the raw model in the same run.

1. raw model: the demo artifact on the same preprocessed slices, in batches of the
   pipeline's batch size, in this process while the nodes are idle: images/s, before
   each round (each round's ratio is against the raw rate measured just before it);
2. throughput: 20 series of 100 slices sent by ``--senders`` concurrent storescu
   (TCP_NODELAY=1); instances/s from the first byte sent to the last SR delivered, and
   the same without the last series' quiet period (which no node can skip);
   with the node's time per image by stage, from its metrics (load, preprocess and
   write: the non-model overhead);
3. latency: 24-slice series sent one at a time; from the last instance's success to the
   SR delivered, minus the quiet period: p50 and p95.

With ``--artifact DIR`` the demo pipeline runs that model artifact instead (e.g. the
pruned int8 one), and a second node, the same but for its pipeline matching nothing
(Modality MR), first receives the same series: its ingest-only rate, against which end to
end is set, and how fast the node receives them with the pipeline against without it.
``--rounds N`` repeats the throughput measurement N times on the same two nodes (both
started before the first round), each round a new set of series sent to the ingest-only
node and then to the node with the pipeline; figures are medians over the rounds (each
round's ratio sets end to end against the ingest-only round just before it), with each
round's figures beside them. The runner's own rate (by its metrics: images over the sum
of its jobs' stage seconds) is reported too: a series is complete a quiet period (5 s)
after its last instance, so unless receiving takes longer than that the jobs run once it
has ended, and that rate bounds end to end. With two lanes (``runner.concurrent_jobs``)
the jobs' stages overlap, and it is one lane's rate: the runner takes more.

What the cores allow: each round, the CPU seconds (user + system, all threads) of the node,
the senders and the PACS, per instance; the rate at which that work would keep every core
busy bounds end to end, and is set against the raw model (whose own CPU per image is
measured with it). The ingest-only node's CPU per instance is what receiving alone costs.

Run: .venv/bin/python -m benchmarks.end_to_end [--series 20] [--slices 100] [--decode-workers auto]
     [--artifact DIR] [--rounds 1] [--json out.json]
"""

import argparse
import os
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
import torch
from prometheus_client import CollectorRegistry

from benchmarks.common import (
    ENV,
    REPO,
    cpu_seconds,
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


def raw_model(pipeline: Pipeline, files: list[Path], images: int) -> Callable[[], tuple[float, float]]:
    """A timing of the pipeline's model alone on ``files`` preprocessed (repeated to
    ``images``), loaded and warmed once: each call runs it again and returns images/s
    and the CPU ms per image (all of its threads)."""
    pool = ModelPool(Metrics(CollectorRegistry()))
    artifact = pool.get(pipeline)
    slices = torch.cat([preprocess(pipeline.preprocess, torch.from_numpy(modality_frames(pydicom.dcmread(f)))[:, None])
                        for f in files])  # fmt: skip
    repeats = -(-images // len(slices))
    batches = slices.repeat(repeats, 1, 1, 1)[:images].split(pipeline.model.batch_size)
    pool.infer(artifact, batches[0])  # warm-up

    def rate() -> tuple[float, float]:
        start, cpu = time.perf_counter(), time.process_time()
        for batch in batches:
            pool.infer(artifact, batch)
        return images / (time.perf_counter() - start), (time.process_time() - cpu) * 1000 / images

    return rate


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
    parser.add_argument("--rounds", type=int, default=1, help="throughput rounds, each with new series")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = scratch("radpipe-e2e-")
    folder = pipelines(work, args.artifact, matching=True)
    pipeline = load_pipeline(folder / PIPELINE.name)
    quiet = pipeline.completion.quiet_seconds
    rounds = [
        [ct_series(work / f"round-{r}" / f"series-{i}", args.slices, seed=1000 * r + i + 1) for i in range(args.series)]
        for r in range(args.rounds)
    ]
    small = [ct_series(work / f"small-{i}", 24, seed=1000 * args.rounds + i) for i in range(args.latency_series)]
    instances = args.series * args.slices
    raw_model_rate = raw_model(pipeline, rounds[0][0], 2000)

    ingest_only = None  # (process, port) of the node whose pipeline matches nothing
    if args.artifact:
        (work / "ingest-only").mkdir()
        process, port, _ = start(work / "ingest-only", pipelines(work, args.artifact, False), args.decode_workers)
        ingest_only = process, port
    pacs_port = free_port()
    pacs_dir = work / "pacs"
    pacs_dir.mkdir()
    pacs = subprocess.Popen(
        ["storescp", "-aet", "PACS", "-od", str(pacs_dir), str(pacs_port)], env=ENV, stderr=subprocess.DEVNULL
    )
    destinations = {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}}
    raw: list[float] = []  # the raw model's images/s, measured again before each round
    raw_cpu: list[float] = []  # and its CPU ms per image
    cpu: dict[str, list[float]] = {"node": [], "senders": [], "pacs": []}  # CPU seconds, by round
    receive_alone: list[float] = []  # seconds the ingest-only node took to receive each round's series
    receive_alone_cpu: list[float] = []  # and its CPU seconds
    receive: list[float] = []  # the same for the node with the pipeline
    totals: list[float] = []  # its first byte to last SR delivered
    try:
        node, node_port, metrics_port = start(work, folder, args.decode_workers, destinations)

        def cpu_used() -> dict[str, float]:
            """CPU seconds so far: the node's, the PACS's, and the reaped children's (the
            storescu senders; the nodes and the PACS are not reaped while they run)."""
            children = resource.getrusage(resource.RUSAGE_CHILDREN)
            senders = children.ru_utime + children.ru_stime
            return {"node": cpu_seconds(node.pid), "senders": senders, "pacs": cpu_seconds(pacs.pid)}

        try:
            wait_for_echo(pacs_port, "PACS")
            for index, series in enumerate(rounds):
                rate, cpu_per_image = raw_model_rate()
                raw.append(rate)
                raw_cpu.append(cpu_per_image)
                if ingest_only is not None:
                    os.sync()  # the generated series must not be flushed on the node's account
                    alone_before = cpu_seconds(ingest_only[0].pid)
                    start_time = time.perf_counter()
                    send_concurrently(ingest_only[1], series, args.senders)
                    receive_alone.append(time.perf_counter() - start_time)
                    receive_alone_cpu.append(cpu_seconds(ingest_only[0].pid) - alone_before)
                os.sync()
                cpu_before = cpu_used()
                start_time = time.perf_counter()
                send_concurrently(node_port, series, args.senders)
                receive.append(time.perf_counter() - start_time)
                totals.append(wait_for_results(pacs_dir, args.series * (index + 1)) - start_time)
                for name, seconds in cpu_used().items():
                    cpu[name].append(seconds - cpu_before[name])
            stages = stage_seconds(metrics_port, pipeline.name)
            latencies = []
            for index, files in enumerate(small):
                acknowledged = time.perf_counter() + storescu(node_port, files)
                results = args.series * args.rounds + index + 1
                latencies.append(wait_for_results(pacs_dir, results) - acknowledged - quiet)
        finally:
            stop(node)
    finally:
        if ingest_only is not None:
            stop(ingest_only[0])
        pacs.terminate()
        pacs.wait(10)

    median = statistics.median
    rates = [instances / (total - quiet) for total in totals]
    to_raw = [rate / raw_rate for rate, raw_rate in zip(rates, raw, strict=True)]
    against_ingest_only = {}
    if receive_alone:
        ratios = [rate * alone / instances for rate, alone in zip(rates, receive_alone, strict=True)]
        speeds = [alone / with_pipeline for alone, with_pipeline in zip(receive_alone, receive, strict=True)]
        against_ingest_only = {
            "ingest_only_instances_per_second": round(instances / median(receive_alone), 1),
            "ingest_only_instances_per_second_by_round": [round(instances / s, 1) for s in receive_alone],
            "ratio_to_ingest_only_without_last_quiet_period": round(median(ratios), 2),
            "ratio_to_ingest_only_without_last_quiet_period_by_round": [round(r, 2) for r in ratios],
            # 1: the series were received as fast with the pipeline matching as without.
            "receive_speed_to_ingest_only": round(median(speeds), 2),
            "ingest_only_node_cpu_ms_per_instance": round(median(receive_alone_cpu) * 1000 / instances, 2),
        }
    images = instances * args.rounds  # the stages' seconds are every round's
    # What the cores allow: each round's CPU per instance of everything that ran (node,
    # senders, PACS), and the rate at which it would keep every core busy, against the raw model.
    cpu_ms = {name: [seconds * 1000 / instances for seconds in by_round] for name, by_round in cpu.items()}
    whole = [sum(parts) for parts in zip(*cpu_ms.values(), strict=True)]
    bound = [(os.cpu_count() or 1) * 1000 / ms for ms in whole]
    figures = {
        "series": args.series,
        "slices_per_series": args.slices,
        "senders": args.senders,
        "decode_workers": args.decode_workers,
        "artifact": str(args.artifact or pipeline.model.artifact),
        "rounds": args.rounds,
        "raw_model_images_per_second": round(median(raw), 1),
        "raw_model_images_per_second_by_round": [round(r, 1) for r in raw],
        "receive_seconds": round(median(receive), 2),
        "first_byte_to_last_sr_seconds": round(median(totals), 2),
        "end_to_end_instances_per_second": round(instances / median(totals), 1),
        "ratio_to_raw_model": round(median([instances / total / r for total, r in zip(totals, raw, strict=True)]), 2),
        "without_last_quiet_period_instances_per_second": round(median(rates), 1),
        "ratio_to_raw_model_without_last_quiet_period": round(median(to_raw), 2),
        "without_last_quiet_period_instances_per_second_by_round": [round(rate, 1) for rate in rates],
        "ratio_to_raw_model_without_last_quiet_period_by_round": [round(r, 2) for r in to_raw],
        **against_ingest_only,
        "cpu_ms_per_instance": {name: round(median(ms), 2) for name, ms in cpu_ms.items()},
        "raw_model_cpu_ms_per_image": round(median(raw_cpu), 2),
        "node_cpu_ms_per_instance_besides_the_model": round(median(cpu_ms["node"]) - median(raw_cpu), 2),
        "cpu_bound_instances_per_second": round(median(bound), 1),
        "cpu_bound_ratio_to_raw_model": round(median([b / r for b, r in zip(bound, raw, strict=True)]), 2),
        "cpu_bound_ratio_to_raw_model_by_round": [round(b / r, 2) for b, r in zip(bound, raw, strict=True)],
        # The node's time per image, by stage (its metrics).
        "runner_ms_per_image": {stage: round(seconds / images * 1000, 2) for stage, seconds in stages.items()},
        "non_model_ms_per_image": round(sum(v for k, v in stages.items() if k in OVERHEAD) / images * 1000, 2),
        # What one of the runner's lanes can take: once the series complete after receiving
        # ends, end to end is bounded by this rate (times the lanes at most), not by the receiving.
        "runner_images_per_second": round(images / sum(v for k, v in stages.items() if k in RUNNER), 1),
        "latency_series_slices": 24,
        "quiet_seconds": quiet,
        "beyond_quiet_p50_seconds": round(median(latencies), 3),
        "beyond_quiet_p95_seconds": round(statistics.quantiles(latencies, n=20, method="inclusive")[-1], 3),
        "beyond_quiet_max_seconds": round(max(latencies), 3),
    }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
