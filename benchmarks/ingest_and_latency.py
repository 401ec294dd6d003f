"""Receive rate and result latency of a real `radpipe serve`, driven by dcmtk's storescu.

Sends one synthetic CT series (default 200 slices of 512x512, about 100 MB) with storescu
(TCP_NODELAY=1) over loopback and reports:
- instances/s received (storescu's wall time; every instance fsync'd and journaled before success);
- time from the last instance's success to the SR in the results folder, and that minus the
  pipeline's quiet period (what the node itself adds).

Run: .venv/bin/python benchmarks/ingest_and_latency.py [--slices 200] [--json out.json]
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from plugin.demo.phantom import make_volume
from plugin.demo.series import write_ct_series
from plugin.pipeline import load_pipeline

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="radpipe-bench-"))
    volume, _ = make_volume(np.random.default_rng(1), args.slices, n_nodules=1)
    files = write_ct_series(
        work / "series",
        volume,
        study_uid="1.2.826.0.1.3680043.8.498.1",
        series_number=1,
        series_description="benchmark chest CT",
        seed=1,
    )
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
    env = {**os.environ, "TCP_NODELAY": "1"}
    node = subprocess.Popen(
        [sys.executable, "-m", "plugin", "serve", "--config", str(work / "radpipe.yaml")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        while subprocess.run(["echoscu", "-aec", "RADPIPE", "127.0.0.1", str(port)], env=env).returncode != 0:
            time.sleep(0.2)
        start = time.perf_counter()
        subprocess.run(["storescu", "-aec", "RADPIPE", "127.0.0.1", str(port), *map(str, files)], env=env, check=True)
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
        "receive_seconds": round(sent - start, 3),
        "instances_per_second": round(len(files) / (sent - start), 1),
        "megabytes_per_second": round(size_mb / (sent - start), 1),
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
