"""Where one association's time goes, per instance: the node's receive path stage by stage
(wall and CPU time of the association thread), beside what the sender itself takes.

Each round sends one CT series with dcmtk storescu over one association to dcmtk
storescp; to ``radpipe serve`` with its C-STORE handler's work replaced by nothing (in that
process only; what radpipe's acceptor costs in Python before any check, write or flush);
and to ``radpipe serve`` (no pipelines), whose C-STORE path is timed from inside:
the process runs with the node's functions wrapped in timers (:data:`TIMED`; only in that
process, as ``benchmarks.ingest`` replaces the flush), which it writes out as it exits.
storescu's own CPU time per instance (``getrusage`` of the finished children) is what any
receiver's exchange waits for at least: reading each file and sending it.

Run: .venv/bin/python -m benchmarks.receive_stages [--slices 200] [--rounds 3] [--json out.json]
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

import yaml

from benchmarks.common import ct_series, free_port, node_config, scratch
from benchmarks.ingest import measure, storescp

# (module, object or "", function, stage): the association thread's calls, outermost first.
TIMED = [
    ("plugin.acceptor", "", "read_pdu", "reading PDUs"),
    ("plugin.acceptor", "Association", "_answer", "answering a C-STORE (all below, the response sent)"),
    ("plugin.node", "", "_parse", "parse to Pixel Data"),
    ("plugin.node", "", "header_values", "journaled attributes"),
    ("plugin.node", "", "journal_entry", "journal entry (JSON)"),
    ("plugin.spool", "Spool", "free_bytes", "free-space check"),
    ("plugin.journal", "Journal", "queued_jobs", "queue-cap check"),
    ("plugin.journal", "Journal", "instance", "duplicate check"),
    ("plugin.spool", "Spool", "store", "spool file: create, write, rename"),
    ("plugin.journal", "Journal", "record_instance", "journal row"),
    ("plugin.durability", "GroupSync", "sync", "group sync (syncfs)"),
]
NO_HANDLER = """
import sys
from plugin import node
node._store = lambda request, storage: None
from plugin.cli import main
sys.exit(main())
"""
TIMED_NODE = """
import atexit, importlib, json, sys, time
TIMED, OUT = json.loads(sys.argv.pop(1)), sys.argv.pop(1)
totals = {}
def timed(function, stage):
    def call(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            entry = totals.setdefault(stage, [0, 0.0, 0.0])
            entry[0] += 1
            entry[1] += time.perf_counter() - wall
            entry[2] += time.thread_time() - cpu
    return call
for module, owner, name, stage in TIMED:
    target = importlib.import_module(module)
    target = getattr(target, owner) if owner else target
    setattr(target, name, timed(getattr(target, name), stage))
atexit.register(lambda: open(OUT, "w").write(json.dumps(totals)))
from plugin.cli import main
sys.exit(main())
"""


def serve_args(folder: Path, port: int) -> list[str]:
    """``serve --config FILE`` for a node on ``port`` keeping its data in ``folder`` (made), no pipelines."""
    folder.mkdir()
    (folder / "radpipe.yaml").write_text(yaml.safe_dump(node_config(folder, port, folder / "no-pipelines")))
    return ["serve", "--config", str(folder / "radpipe.yaml")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3, help="the table shows the median")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = scratch("radpipe-receive-stages-")
    files = ct_series(work / "series", args.slices)
    n = len(files)
    rows: dict[str, list[float]] = {}

    def add(key: str, value: float) -> None:
        rows.setdefault(key, []).append(value)

    for round_number in range(args.rounds):
        port, received = free_port(), work / f"storescp-{round_number}"
        received.mkdir()
        wall, sender, _ = measure(storescp(received, port), port, [files], work / "storescp.log", None)
        add("dcmtk storescp: wall", wall / n * 1000)
        add("  storescu's CPU time, sending to storescp", sender / n * 1000)

        port = free_port()
        command = [sys.executable, "-c", NO_HANDLER, *serve_args(work / f"no-handler-{round_number}", port)]
        wall, sender, _ = measure(command, port, [files], work / "no-handler.log", " ready: ")
        add("radpipe's acceptor, the handler doing nothing: wall", wall / n * 1000)
        add("  storescu's CPU time, sending to it", sender / n * 1000)

        port, stages = free_port(), work / f"stages-{round_number}.json"
        serve = serve_args(work / f"radpipe-{round_number}", port)
        command = [sys.executable, "-c", TIMED_NODE, json.dumps(TIMED), str(stages), *serve]
        wall, sender, _ = measure(command, port, [files], work / "radpipe.log", " ready: ")
        add("radpipe: wall", wall / n * 1000)
        add("  storescu's CPU time, sending to radpipe", sender / n * 1000)
        timed = json.loads(stages.read_text())
        for *_, stage in TIMED:
            _, seconds, cpu = timed.get(stage, (0, 0.0, 0.0))
            add(f"  {stage}: wall", seconds / n * 1000)
            add(f"  {stage}: CPU", cpu / n * 1000)

    figures = {key: round(statistics.median(values), 3) for key, values in rows.items()}
    print(f"{n} CT slices over one association, ms per instance, median of {args.rounds} rounds")
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value:>7}")
    if args.json:
        every = {key: [round(v, 3) for v in values] for key, values in rows.items()}
        args.json.write_text(json.dumps({"instances": n, "median": figures, "rounds": every}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
