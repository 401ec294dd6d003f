"""First SR after a restart with an int8 artifact (issue 15 goal: within 5 s of the quiet period).

Serves the demo pipeline with an optimized int8 artifact (made by ``radpipe optimize
pipelines/lung-nodule-demo-fast.yaml`` as pipelines/README.md shows), as ``radpipe serve``
in a subprocess: starts the node, sends one series as soon as it answers C-ECHO, and times
process start -> first SR written, minus the pipeline's quiet period. Cold: the node's
compile cache (``<storage>/compiled``) is empty, so the int8 program is compiled; warm: the
same node restarted with the cache it wrote. The source of the program is read from
``radpipe_model_compile_seconds`` on the node's metrics endpoint; when the node listened
and when its model was loaded, from the timestamps of its log lines (``--logs DIR`` keeps
each round's log).

Run: .venv/bin/python -m benchmarks.cold_start --artifact PATH [--warm-rounds 3] [--json FILE] [--logs DIR]
"""

import argparse
import os
import re
import shutil
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import yaml

from benchmarks.common import REPO, ct_series, free_port, node_config, report, serve, storescu, wait_for_echo

PIPELINE = "lung-nodule-demo.yaml"


def compile_sources(metrics_port: int) -> dict[str, float]:
    """``radpipe_model_compile_seconds`` count and sum per source, from the node's /metrics."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    # every sample carries the node's id beside its own labels
    found = re.findall(r'radpipe_model_compile_seconds_(count|sum)\{[^}]*source="(\w+)"[^}]*\} (\S+)', text)
    return {f"{source}_{kind}": float(value) for kind, source, value in found}


def logged_at(log: Path, message: str, since: float) -> float | None:
    """Seconds from ``since`` (epoch) to the first log line holding ``message``; None if none does."""
    for line in log.read_text(errors="replace").splitlines():
        if message in line:
            stamp = datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            return round(stamp - since, 2)
    return None


def first_sr(work: Path, seed: int, slices: int, quiet: float) -> dict[str, float | dict[str, float] | None]:
    """Start the node on ``work``, send one series, and time its first SR."""
    metrics_port, port = free_port(), free_port()
    config = node_config(work, port, work / "pipelines", metrics_port)
    series = ct_series(work / f"series-{seed}", slices, seed=seed)
    results = work / "data" / "results"
    before = set(results.rglob("*.dcm")) if results.exists() else set()
    log = work / f"node-{seed}.log"
    started = time.time()
    start = time.perf_counter()
    node = serve(work, config, log)
    try:
        wait_for_echo(port, timeout=600)
        ready = time.perf_counter() - start
        storescu(port, series)
        sent = time.perf_counter() - start
        while not (set(results.rglob("*.dcm")) - before if results.exists() else set()):
            if node.poll() is not None:
                raise RuntimeError(f"the node exited ({node.returncode})")
            time.sleep(0.02)
        done = time.perf_counter() - start
        sources = compile_sources(metrics_port)
    finally:
        node.terminate()
        node.wait(60)
    return {
        "start_to_listening_s (log)": logged_at(log, "listening on", started),
        "start_to_echo_s": round(ready, 2),
        "start_to_sent_s": round(sent, 2),
        "start_to_first_sr_s": round(done, 2),
        "start_to_model_loaded_s (log)": logged_at(log, "loaded model", started),
        "beyond_quiet_period_s": round(done - quiet, 2),
        "sent_to_first_sr_beyond_quiet_period_s": round(done - sent - quiet, 2),
        "program": sources,
    }


def _median(values: list) -> float:
    return float(sorted(values)[len(values) // 2])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifact", type=Path, default=REPO / "pipelines/models/lung-nodule-demo-pruned-int8")
    parser.add_argument("--slices", type=int, default=20)
    parser.add_argument("--warm-rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--logs", type=Path, help="folder to keep each round's node log in")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="radpipe-cold-start-"))
    (work / "pipelines" / "models").mkdir(parents=True)
    shutil.copytree(args.artifact, work / "pipelines" / "models" / args.artifact.name)
    pipeline = yaml.safe_load((REPO / "pipelines" / PIPELINE).read_text())
    pipeline["model"]["artifact"] = f"models/{args.artifact.name}"
    (work / "pipelines" / PIPELINE).write_text(yaml.safe_dump(pipeline))
    quiet = float(pipeline["completion"]["quiet_seconds"])
    load_before = [round(x, 2) for x in os.getloadavg()]
    try:
        cold = first_sr(work, 1, args.slices, quiet)
        warm = [first_sr(work, 2 + n, args.slices, quiet) for n in range(args.warm_rounds)]
    finally:
        if args.logs:
            args.logs.mkdir(parents=True, exist_ok=True)
            for log in work.glob("node-*.log"):
                shutil.copy(log, args.logs / log.name)
        shutil.rmtree(work, ignore_errors=True)
    figures = {
        "artifact": args.artifact.name,
        "slices": args.slices,
        "quiet_seconds": quiet,
        "cpus": os.cpu_count(),
        "load_average_1_5_15_min": {"before": load_before, "after": [round(x, 2) for x in os.getloadavg()]},
        "cold (no compile cache)": cold,
        "warm (cache present), per round": warm,
        "warm beyond quiet period, median s": _median([w["beyond_quiet_period_s"] for w in warm]),
        "warm last instance sent -> SR beyond quiet period, median s": _median(
            [w["sent_to_first_sr_beyond_quiet_period_s"] for w in warm]
        ),
    }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
