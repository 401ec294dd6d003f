"""How much of the association threads' time goes to waiting for the GIL, with the node
receiving alone and with the demo pipeline's runner beside it.

Each round starts ``radpipe serve`` (the demo pipeline matching nothing, or matching),
attaches ``py-spy record --native --idle --threads`` to it and sends 10 new series of 100
CT slices with 2 concurrent storescu. The association threads' samples (those with
plugin/acceptor.py on their stack) are then sorted by where they wait. A thread back from a
call made without the GIL (a socket, SQLite, a file) that waits in ``pthread_cond_timedwait``
right under that call is waiting for the GIL (CPython's ``take_gil``, inlined and not named
in these stacks); one that waits there under ``PyThread_acquire_lock`` waits for a Python
lock (the group sync, a queue).

py-spy's native stacks pause the node at each sample: it receives about 4 times slower than
unobserved, so the shares compare the two modes with each other, not with the rates of
``benchmarks.ingest``.

Run: .venv/bin/python -m benchmarks.gil_wait [--rounds 2] [--json out.json]
"""

import argparse
import collections
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import ct_series, report, scratch
from benchmarks.end_to_end import pipelines, send_concurrently, start, stop

PY_SPY = Path(sys.executable).with_name("py-spy")
_WAIT = "pthread_cond_timedwait (libc.so.6)"


def shares(profile: Path) -> dict[str, float]:
    """The association threads' samples in ``profile`` (py-spy's raw format): the share
    waiting for the GIL and for a Python lock."""
    counts: collections.Counter[str] = collections.Counter()
    for line in profile.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if "acceptor.py" not in stack:
            continue
        frames = stack.split(";")
        counts["all"] += int(count)
        if _WAIT in frames:
            waiting_in = frames[frames.index(_WAIT) - 1]
            counts["lock" if "acquire_lock" in waiting_in else "gil"] += int(count)
    return {"gil": counts["gil"] / max(counts["all"], 1), "lock": counts["lock"] / max(counts["all"], 1)}


def observed_round(work: Path, matching: bool) -> dict[str, float]:
    """Receive 10 new series under py-spy: instances/s and the association threads' waits."""
    work.mkdir()
    node, port, _ = start(work, pipelines(work, None, matching), "auto")
    profile = work / "profile.txt"
    command = [str(PY_SPY), "record", "--pid", str(node.pid), "--native", "--idle", "--threads", "-r", "100"]
    command += ["-f", "raw", "-o", str(profile)]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(2)  # attached
    series = [ct_series(work / f"series-{i}", 100) for i in range(10)]
    begin = time.perf_counter()
    send_concurrently(port, series, 2)
    seconds = time.perf_counter() - begin
    spy.send_signal(signal.SIGINT)
    spy.wait(60)
    stop(node)
    return {"instances_per_second": 1000 / seconds, **shares(profile)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not PY_SPY.exists():
        sys.exit(f"{PY_SPY} not found: pip install -e '.[bench]'")
    work = scratch("radpipe-gil-wait-")
    rounds: dict[str, list[dict[str, float]]] = {"receiving alone": [], "runner beside": []}
    for number in range(args.rounds):
        for matching, name in ((False, "receiving alone"), (True, "runner beside")):
            rounds[name].append(observed_round(work / f"{number}-{matching}", matching))
    figures: dict = {"load_average_1_min": os.getloadavg()[0]}
    for name, runs in rounds.items():
        figures[f"{name}: inst/s under py-spy"] = [round(run["instances_per_second"], 1) for run in runs]
        figures[f"{name}: GIL wait, % of samples"] = [round(100 * run["gil"], 1) for run in runs]
        figures[f"{name}: Python lock wait, % of samples"] = [round(100 * run["lock"], 1) for run in runs]
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
