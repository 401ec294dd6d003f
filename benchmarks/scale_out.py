"""Scale-out on PostgreSQL (issue 14): several `radpipe serve` processes on this machine
sharing one PostgreSQL journal and one storage folder, beside the single SQLite node.

1. ingest: ``--senders`` concurrent storescu associations (TCP_NODELAY=1), each a new
   series of ``--slices`` 512x512 slices, sent to (a) one receive-only node on SQLite,
   (b) 1, 2, 3 receive-only nodes (``node.roles: [receive]``) on one PostgreSQL, the
   associations spread round-robin over them (association i to receiver i mod n);
   instances/s from the first association's start to the last one's end. Every node of
   a run starts fresh (empty storage folder, new database) and every instance is checked
   journaled after the send.
2. jobs: a backlog of ``--backlog`` series of ``--backlog-slices`` slices for the demo
   pipeline (pipelines/lung-nodule-demo.yaml alone; no destination, so the SRs stay in the
   results folder) is received by a receive-only node, which then stops; once the quiet
   period is over, it is drained by (a) one SQLite node with every role, (b) 1 or 2 infer
   nodes (``node.roles: [infer]``) on one PostgreSQL, started and warm (their /metrics
   answers once the model is loaded) before an ``assemble,dispatch`` node starts and
   closes every series at once. Jobs/s from the journal: the first job's ``started_at``
   (its claim) to the last job's ``finished_at`` (committed after its SR is written); the
   SR files in the results folder are counted too, and each infer node's jobs (its
   ``radpipe_jobs_total{status="done"}``).

Each measurement is repeated ``--rounds`` times, the modes interleaved in every round;
the table shows the median. PostgreSQL is tests/postgres.py's server (the Debian package,
``initdb`` in a temp folder as ``nobody`` when run as root, ``pg_ctl`` on a free loopback
port, stopped by PID): its settings are the tests' (``fsync=off``, see the README).

Run: .venv/bin/python -m benchmarks.scale_out [--rounds 3] [--slices 100] [--backlog 24]
     [--json out.json]
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml

from benchmarks.common import REPO, ct_series, free_port, node_config, pipeline_folder, serve, storescu, wait_for_echo
from plugin.journal import Journal
from tests.postgres import PostgresServer

PIPELINE = REPO / "pipelines" / "lung-nodule-demo.yaml"


class Nodes:
    """The node processes of one run: all sharing ``run/data`` and one journal."""

    def __init__(self, run: Path, pipelines: Path, journal_url: str | None) -> None:
        self.run = run
        self.pipelines = pipelines
        self.journal_url = journal_url
        self.processes: list[subprocess.Popen] = []

    @property
    def journal_location(self) -> Path | str:
        return self.journal_url or self.run / "data" / "journal.sqlite"

    def start(self, name: str, roles: list[str], port: int = 0, metrics_port: int = 0) -> subprocess.Popen:
        port = port or free_port()
        sections: dict = {"node": {"port": port, "id": name, "roles": roles}}
        if self.journal_url:
            sections["journal"] = {"url": self.journal_url}
        config = node_config(self.run, port, self.pipelines, metrics_port, **sections)
        folder = self.run / name
        folder.mkdir(parents=True)
        process = serve(folder, config, folder / "node.log")
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)
        self.processes.clear()


def wait_for_metrics(port: int, process: subprocess.Popen, timeout: float = 180) -> None:
    """Until the node's /metrics answers: an infer node serves it once its model is warm."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2):
                return
        except OSError:
            if process.poll() is not None:
                raise RuntimeError(f"a node exited ({process.returncode}) before it served /metrics") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing serves /metrics on port {port}") from None
            time.sleep(0.2)


def jobs_done(port: int) -> int:
    """The node's ``radpipe_jobs_total{status="done"}``, from its /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in lines
                     if line.startswith("radpipe_jobs_total{") and 'status="done"' in line))  # fmt: skip


def send(ports: list[int], shares: list[list[Path]]) -> tuple[float, float]:
    """One storescu association per share, all at once, share i to ``ports[i % len(ports)]``:
    (first association's start, last one's end), perf_counter seconds."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(shares)) as pool:
        for future in [pool.submit(storescu, ports[i % len(ports)], share) for i, share in enumerate(shares)]:
            future.result()  # storescu failing raises here
    return start, time.perf_counter()


def journaled_instances(location: Path | str) -> int:
    journal = Journal(location, node_id="benchmark")
    try:
        return sum(series.count for series in journal.received_series())
    finally:
        journal.close()


def ingest_run(work: Path, series: list[list[Path]], receivers: int, journal_url: str | None) -> float:
    """Seconds to receive ``series``, one association each, on ``receivers`` receive-only nodes."""
    run = Path(tempfile.mkdtemp(prefix="ingest-", dir=work))
    nodes = Nodes(run, work / "no-pipelines", journal_url)
    ports = [free_port() for _ in range(receivers)]
    try:
        for index, port in enumerate(ports):
            nodes.start(f"receiver-{index + 1}", ["receive"], port)
        for port in ports:
            wait_for_echo(port, timeout=180)
        os.sync()  # the generated series must not be flushed on the nodes' account
        start, end = send(ports, series)
    finally:
        nodes.stop()
    expected = sum(map(len, series))
    if (got := journaled_instances(nodes.journal_location)) != expected:
        raise RuntimeError(f"{got} of {expected} instances journaled")
    shutil.rmtree(run)
    return end - start


def jobs_run(work: Path, backlog: list[list[Path]], pipelines: Path, infer_nodes: int, server: PostgresServer | None,
             senders: int, quiet: float) -> dict:  # fmt: skip
    """Receive ``backlog``, then drain it: one SQLite node (``server`` None) or
    ``infer_nodes`` infer nodes on PostgreSQL. The journal's first claim and last finish."""
    run = Path(tempfile.mkdtemp(prefix="jobs-", dir=work))
    nodes = Nodes(run, pipelines, server.create_database() if server else None)
    try:
        port = free_port()
        nodes.start("receiver", ["receive"], port)
        wait_for_echo(port, timeout=180)
        _, sent = send([port], [[f for s in backlog[i::senders] for f in s] for i in range(senders)])
        nodes.stop()  # the backlog is journaled: no series closed (no assembler), no job yet
        # Every series is past its quiet period when the assembler starts: it closes them all at once.
        if server is None:
            time.sleep(max(0.0, sent + quiet + 0.5 - time.perf_counter()))
            metrics_ports = [free_port()]
            nodes.start("node", ["receive", "assemble", "infer", "dispatch"], metrics_port=metrics_ports[0])
        else:
            metrics_ports = [free_port() for _ in range(infer_nodes)]
            for index, metrics_port in enumerate(metrics_ports):
                nodes.start(f"infer-{index + 1}", ["infer"], metrics_port=metrics_port)
            for process, metrics_port in zip(nodes.processes, metrics_ports, strict=True):
                wait_for_metrics(metrics_port, process)
            time.sleep(max(0.0, sent + quiet + 0.5 - time.perf_counter()))
            nodes.start("assembler", ["assemble", "dispatch"])
        journal = Journal(nodes.journal_location, node_id="benchmark")
        try:
            deadline = time.monotonic() + 120
            while len(done := [j for j in journal.jobs() if j.status == "done"]) < len(backlog):
                if any(p.poll() is not None for p in nodes.processes) or time.monotonic() > deadline:
                    raise RuntimeError(f"{len(done)} of {len(backlog)} jobs done; jobs: {journal.jobs()}")
                time.sleep(0.25)
            jobs = journal.jobs()
            by_node = [jobs_done(metrics_port) for metrics_port in metrics_ports]
        finally:
            journal.close()
    finally:
        nodes.stop()
    if len(jobs) != len(backlog) or any(j.status != "done" for j in jobs):
        raise RuntimeError(f"expected {len(backlog)} done jobs, got {[(j.id, j.status) for j in jobs]}")
    srs = sum(1 for path in (run / "data" / "results").rglob("*") if path.is_file())
    first = min(j.started_at for j in jobs if j.started_at is not None)
    last = max(j.finished_at for j in jobs if j.finished_at is not None)
    shutil.rmtree(run)
    return {"seconds": last - first, "sr_files": srs, "attempts": max(j.attempts for j in jobs), "by_node": by_node}


def median_row(name: str, values: list[float], count: int, unit: str) -> dict:
    seconds = statistics.median(values)
    return {
        "mode": name,
        "seconds": round(seconds, 3),
        f"{unit}_per_second": round(count / seconds, 1),
        "all_seconds": [round(v, 3) for v in values],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3, help="runs per mode; the table shows the median")
    parser.add_argument("--senders", type=int, default=4, help="concurrent storescu associations")
    parser.add_argument("--slices", type=int, default=100, help="slices of each sender's series (ingest)")
    parser.add_argument("--receivers", type=int, default=3, help="ingest: 1 up to this many PostgreSQL receivers")
    parser.add_argument("--backlog", type=int, default=24, help="series in the jobs backlog")
    parser.add_argument("--backlog-slices", type=int, default=8)
    parser.add_argument("--infer-nodes", type=int, default=2, help="jobs: 1 up to this many infer nodes")
    parser.add_argument("--skip", choices=["ingest", "jobs"], help="leave one part out")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="radpipe-scale-out-"))
    (work / "no-pipelines").mkdir()
    pipelines = work / "pipelines"
    pipeline_folder(pipelines, PIPELINE)
    quiet = yaml.safe_load(PIPELINE.read_text())["completion"]["quiet_seconds"]
    uptime_before = Path("/proc/loadavg").read_text().split()[:3]
    server = PostgresServer()
    ingest: dict[str, list[float]] = {}
    drain: dict[str, list[dict]] = {}
    series: list[list[Path]] = []
    backlog: list[list[Path]] = []
    try:
        server.start()
        if args.skip != "ingest":
            series = [ct_series(work / f"series-{i}", args.slices, seed=i + 1) for i in range(args.senders)]
        if args.skip != "jobs":
            backlog = [ct_series(work / f"backlog-{i}", args.backlog_slices, seed=100 + i) for i in range(args.backlog)]
        for _ in range(args.rounds):  # interleaved, so a noisy moment hits every mode
            if series:
                ingest.setdefault("1 node, SQLite", []).append(ingest_run(work, series, 1, None))
                for receivers in range(1, args.receivers + 1):
                    name = f"{receivers} receiver{'s' * (receivers > 1)}, PostgreSQL"
                    ingest.setdefault(name, []).append(ingest_run(work, series, receivers, server.create_database()))
            if backlog:
                drain.setdefault("1 node, SQLite", []).append(
                    jobs_run(work, backlog, pipelines, 1, None, args.senders, quiet)
                )
                for count in range(1, args.infer_nodes + 1):
                    name = f"{count} infer node{'s' * (count > 1)} + assembler, PostgreSQL"
                    drain.setdefault(name, []).append(
                        jobs_run(work, backlog, pipelines, count, server, args.senders, quiet)
                    )
    except BaseException:
        print(f"failed: the nodes' logs are under {work}", file=sys.stderr)
        raise
    finally:
        server.kill()
    shutil.rmtree(work)
    uptime_after = Path("/proc/loadavg").read_text().split()[:3]

    instances = args.senders * args.slices
    ingest_rows = [median_row(name, values, instances, "instances") for name, values in ingest.items()]
    job_rows = []
    for name, runs in drain.items():
        row = median_row(name, [r["seconds"] for r in runs], args.backlog, "jobs")
        row["sr_files"] = [r["sr_files"] for r in runs]
        row["max_attempts_per_run"] = [
            r["attempts"] for r in runs
        ]  # over 1: a job claimed again after its lease expired
        row["jobs_by_infer_node"] = [r["by_node"] for r in runs]
        job_rows.append(row)
    for rows, key in ((ingest_rows, "instances_per_second"), (job_rows, "jobs_per_second")):
        for row in rows:
            row["ratio_to_sqlite"] = round(row[key] / rows[0][key], 2)

    print(f"load average before {' '.join(uptime_before)}, after {' '.join(uptime_after)}; {os.cpu_count()} cores")
    if ingest_rows:
        print(f"\ningest: {args.senders} associations x {args.slices} slices of 512x512, median of {args.rounds}")
        print(f"{'receivers':<38} {'s':>7} {'inst/s':>8} {'x SQLite':>9}")
        for row in ingest_rows:
            print(f"{row['mode']:<38} {row['seconds']:>7} {row['instances_per_second']:>8} {row['ratio_to_sqlite']:>9}")
    if job_rows:
        print(f"\njobs: backlog of {args.backlog} series x {args.backlog_slices} slices, demo pipeline, "
              f"first claim to last job done, median of {args.rounds}")  # fmt: skip
        print(f"{'drained by':<38} {'s':>7} {'jobs/s':>8} {'x SQLite':>9}")
        for row in job_rows:
            print(f"{row['mode']:<38} {row['seconds']:>7} {row['jobs_per_second']:>8} {row['ratio_to_sqlite']:>9}")
    if args.json:
        figures = {
            "cores": os.cpu_count(),
            "load_average_before": uptime_before,
            "load_average_after": uptime_after,
            "rounds": args.rounds,
            "ingest": {
                "senders": args.senders,
                "slices_per_series": args.slices,
                "instances": instances,
                "rows": ingest_rows,
            },
            "jobs": {
                "series": args.backlog,
                "slices_per_series": args.backlog_slices,
                "pipeline": PIPELINE.name,
                "timed": "journal: first job's started_at to last job's finished_at",
                "rows": job_rows,
            },
        }
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
