"""Ingest rate: the same CT series sent by dcmtk storescu to three receivers, in one run.

- dcmtk storescp (C++; writes each file, no fsync: it has no option for one);
- a minimal pynetdicom SCP (writes the received bytes, no fsync);
- radpipe (each instance durable: file + journal row flushed before success);
- radpipe with its flush skipped (``GroupSync._flush`` replaced in that process; never a
  mode the node has): what receiving costs radpipe's Python before any disk flush, the
  bound on what making the flush cheaper could reach;
- and, for scale, the durable-write floor: the same files written and flushed one by
  one (temporary file, rename, syncfs) with no network and no DICOM at all. No receiver
  that flushes before it answers success can beat it on this disk.

Then dcmtk storescp and radpipe again, with 4 storescu associations at once, each
sending a series of its own (a quarter of the slices each). Each receiver's CPU time
(user + system, all threads) while it received is given per instance.

Run: .venv/bin/python -m benchmarks.ingest [--slices 200] [--rounds 5] [--json out.json]
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import yaml

from benchmarks.common import (
    ENV,
    cpu_seconds,
    ct_series,
    free_port,
    node_config,
    scratch,
    storescu,
    wait_for_echo,
    wait_for_log,
)
from plugin.durability import GroupSync
from plugin.spool import write_atomically

CONCURRENT = 4
CONCURRENT_RECEIVERS = ("dcmtk storescp", "radpipe")
NO_FLUSH = """
import sys
from plugin import durability
durability.GroupSync._flush = lambda self: None
from plugin.cli import main
sys.exit(main())
"""
MINIMAL_SCP = """
import sys
from pathlib import Path
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification
out = Path(sys.argv[2])
def store(event):
    (out / (event.request.AffectedSOPInstanceUID + ".dcm")).write_bytes(event.encoded_dataset())
    return 0
ae = AE("RADPIPE")
ae.maximum_pdu_size = 0
ae.add_supported_context(Verification)
for cx in AllStoragePresentationContexts:
    ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
ae.start_server(("127.0.0.1", int(sys.argv[1])), evt_handlers=[(evt.EVT_C_STORE, store)])
"""


def storescp(received: Path, port: int | str) -> list[str]:
    """dcmtk storescp on ``port``, writing what it receives into ``received`` (bit-preserving,
    128 kB PDUs): the receiver radpipe is measured against."""
    return ["storescp", "-aet", "RADPIPE", "-pdu", "131072", "+B", "-od", str(received), str(port)]


def receivers(work: Path) -> dict[str, list[str]]:
    config = work / "radpipe.yaml"
    return {
        "dcmtk storescp": storescp(work / "storescp", "{port}"),
        "pynetdicom minimal SCP": [sys.executable, "-c", MINIMAL_SCP, "{port}", str(work / "pynetdicom")],
        "radpipe": [sys.executable, "-m", "plugin", "serve", "--config", str(config)],
        "radpipe, flush skipped": [sys.executable, "-c", NO_FLUSH, "serve", "--config", str(config)],
    }


class Measurement(NamedTuple):
    """One receiver's run: wall seconds, and CPU seconds (user + system, all threads)."""

    seconds: float
    senders_cpu: float  # the storescu processes'
    receiver_cpu: float  # the receiver's, while they sent


def measure(command: list[str], port: int, shares: list[list[Path]], log: Path, ready: str | None) -> Measurement:
    """``shares`` sent, each by its own storescu association, at once, once the receiver
    answers C-ECHO and (``ready``) has logged that line."""
    # Start clean: radpipe's flushes must not pay for what the series generation or an
    # earlier receiver left in the page cache.
    os.sync()
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [part.replace("{port}", str(port)) for part in command], env=ENV, stdout=output, stderr=subprocess.STDOUT
        )
    try:
        wait_for_echo(port)
        if ready:  # radpipe listens first, then loads: receiving is measured once it has
            wait_for_log(log, ready)
        # The receiver is not reaped yet: the children's CPU time is the senders' alone.
        before, receiver = resource.getrusage(resource.RUSAGE_CHILDREN), cpu_seconds(process.pid)
        start = time.perf_counter()
        with ThreadPoolExecutor(len(shares)) as senders:
            list(senders.map(lambda files: storescu(port, files), shares))
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        senders_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        return Measurement(seconds, senders_cpu, cpu_seconds(process.pid) - receiver)
    finally:
        process.terminate()
        process.wait(30)


def durable_write_floor(files: list[Path], folder: Path) -> float:
    """Seconds to write ``files`` durably one at a time, as radpipe's spool does."""
    contents = [f.read_bytes() for f in files]
    folder.mkdir()
    os.sync()
    group_sync = GroupSync(folder)
    start = time.perf_counter()
    for index, data in enumerate(contents):
        write_atomically(folder / f"{index}.dcm", data, fsync=False)
        group_sync.sync()
    seconds = time.perf_counter() - start
    group_sync.close()
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5, help="runs per receiver; the table shows the median")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = scratch("radpipe-ingest-")
    files = ct_series(work / "series", args.slices)
    # 4 associations at once, each with a series of its own (a quarter of the slices).
    concurrent = [ct_series(work / f"series-{n}", args.slices // CONCURRENT, seed=2 + n) for n in range(CONCURRENT)]
    megabytes = sum(f.stat().st_size for f in files) / 1e6
    modes = {"one association": [files], f"{CONCURRENT} associations": concurrent}
    timings: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}  # the receiver's CPU seconds
    for round_number in range(args.rounds):  # interleaved, so a noisy moment hits every receiver
        for mode, shares in modes.items():
            for name, command in receivers(work).items():
                if mode != "one association" and name not in CONCURRENT_RECEIVERS:
                    continue
                port = free_port()
                for folder in ("storescp", "pynetdicom"):
                    (work / folder).mkdir(exist_ok=True)
                # radpipe with no pipelines: this measures receiving only.
                config = node_config(work / f"radpipe-{port}", port, work / "no-pipelines")
                (work / "radpipe.yaml").write_text(yaml.safe_dump(config))
                ready = " ready: " if name.startswith("radpipe") else None
                measured = measure(command, port, shares, work / f"{name}.log", ready)
                timings.setdefault((mode, name), []).append(measured.seconds)
                cpu.setdefault((mode, name), []).append(measured.receiver_cpu)
        floor = durable_write_floor(files, work / f"floor-{round_number}")
        timings.setdefault(("one association", "durable-write floor"), []).append(floor)
    rows = []
    for (mode, name), values in timings.items():
        seconds = statistics.median(values)
        rows.append(
            {
                "associations": mode,
                "receiver": name,
                "seconds": round(seconds, 3),
                "instances_per_second": round(len(files) / seconds, 1),
                "megabytes_per_second": round(megabytes / seconds, 1),
                "all_seconds": [round(v, 3) for v in values],
                "receiver_cpu_ms_per_instance": (
                    round(statistics.median(cpu[mode, name]) * 1000 / len(files), 2) if (mode, name) in cpu else None
                ),
            }
        )
    dcmtk = {row["associations"]: row["instances_per_second"] for row in rows if row["receiver"] == "dcmtk storescp"}
    for row in rows:
        row["ratio_to_dcmtk"] = round(row["instances_per_second"] / dcmtk[row["associations"]], 2)
    print(f"{len(files)} instances, {megabytes:.0f} MB, loopback, median of {args.rounds} interleaved rounds")
    print(f"{'associations':<16} {'receiver':<24} {'s':>7} {'inst/s':>8} {'MB/s':>7} {'x dcmtk':>8} {'CPU ms':>7}")
    for row in rows:
        cpu_ms = row["receiver_cpu_ms_per_instance"] or ""  # none for the floor: no receiver
        print(
            f"{row['associations']:<16} {row['receiver']:<24} {row['seconds']:>7} {row['instances_per_second']:>8} "
            f"{row['megabytes_per_second']:>7} {row['ratio_to_dcmtk']:>8} {cpu_ms:>7}"
        )
    if args.json:
        args.json.write_text(json.dumps({"instances": len(files), "megabytes": megabytes, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
