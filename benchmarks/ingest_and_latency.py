"""Receive rate and result latency of a real `radpipe serve` with the demo pipeline.

Sends one synthetic CT series (default 200 slices of 512x512, about 100 MB) with dcmtk
storescu (TCP_NODELAY=1) over loopback and reports:
- instances/s received (storescu's wall time; every instance durable before success);
- time from the last instance's success to the SR in the results folder, and that minus
  the pipeline's quiet period (what the node itself adds).

Run: .venv/bin/python -m benchmarks.ingest_and_latency [--slices 200] [--json out.json]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.common import ENV, REPO, ct_series, free_port, storescu, wait_for_echo
from plugin.pipeline import load_pipeline


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="radpipe-bench-"))
    files = ct_series(work / "series", args.slices)
    size_mb = sum(f.stat().st_size for f in files) / 1e6
    port = free_port()
    config = {
        "node": {"port": port},
        "metrics": {"port": 0},
        "storage": {"dir": str(work / "data")},
        "pipelines": {"dir": str(REPO / "pipelines")},
    }
    (work / "radpipe.yaml").write_text(yaml.safe_dump(config))
    quiet = load_pipeline(REPO / "pipelines" / "lung-nodule-demo.yaml").completion.quiet_seconds
    node = subprocess.Popen(
        [sys.executable, "-m", "plugin", "serve", "--config", str(work / "radpipe.yaml")],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_echo(port)
        receive_seconds = storescu(port, files)
        sent = time.perf_counter()
        results = work / "data" / "results"
        while not list(results.glob("*/*.dcm")):
            time.sleep(0.01)
        written = time.perf_counter()
    finally:
        node.terminate()
        node.wait(30)
    figures = {
        "instances": len(files),
        "megabytes": round(size_mb, 1),
        "receive_seconds": round(receive_seconds, 3),
        "instances_per_second": round(len(files) / receive_seconds, 1),
        "megabytes_per_second": round(size_mb / receive_seconds, 1),
        "last_instance_to_sr_seconds": round(written - sent, 3),
        "quiet_seconds": quiet,
        "beyond_quiet_seconds": round(written - sent - quiet, 3),
    }
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
