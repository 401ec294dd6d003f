"""Peak memory of `radpipe serve` for a 2 GB study: 8 CT series of 500 slices of 512x512
(4000 instances, about 2.1 GB) in one study, received and run through the demo pipeline
until every series' SR is written.

The node serves one pipeline, the demo classifier by default (the goal was set for it),
or ``--pipeline FILE`` (e.g. the segmentation demo, whose 3D jobs hold a whole series).
Reports the node's resident memory once started with its model warm (the runtime and the
model), its peak (VmHWM) at the end, and the difference: what receiving and processing
the study added. The goal is a peak under 1 GB plus the model.

Run: .venv/bin/python -m benchmarks.memory [--series 8] [--slices 500] [--pipeline FILE] [--json out.json]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import (
    REPO,
    free_port,
    node_config,
    pipeline_folder,
    report,
    scratch,
    serve,
    storescu,
    wait_for_echo,
    wait_for_log,
)
from plugin.demo.phantom import make_volume
from plugin.demo.series import write_ct_series

STUDY_UID = "1.2.826.0.1.3680043.8.498.2000"


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmRSS", "VmHWM")}


def study(out_dir: Path, series: int, slices: int) -> list[Path]:
    files = []
    for number in range(1, series + 1):
        volume, _ = make_volume(np.random.default_rng(number), slices, n_nodules=1)
        files += write_ct_series(
            out_dir / str(number),
            volume,
            study_uid=STUDY_UID,
            series_number=number,
            series_description=f"2 GB study, series {number}",
            seed=number,
        )
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--pipeline", type=Path, default=REPO / "pipelines" / "lung-nodule-demo.yaml")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = scratch("radpipe-memory-")
    files = study(work / "study", args.series, args.slices)
    size = sum(f.stat().st_size for f in files)
    port = free_port()
    pipelines = work / "pipelines"
    pipeline = pipeline_folder(pipelines, args.pipeline)
    node = serve(work, node_config(work, port, pipelines), work / "node.log")
    try:
        wait_for_echo(port)
        wait_for_log(work / "node.log", " ready: ")  # listening comes first, then the model
        started = memory_kib(node.pid)
        os.sync()
        receive_seconds = storescu(port, files)
        results = work / "data" / "results" / STUDY_UID
        outputs = len(pipeline["outputs"])  # one result file per output and series
        while len(list(results.glob("*.dcm"))) < args.series * outputs:
            time.sleep(0.5)
        finished = memory_kib(node.pid)
    finally:
        node.terminate()
        node.wait(60)
    figures = {
        "pipeline": args.pipeline.name,
        "instances": len(files),
        "study_gigabytes": round(size / 1e9, 2),
        "receive_seconds": round(receive_seconds, 1),
        "rss_started_mib": round(started["VmRSS"] / 1024),
        "peak_rss_mib": round(finished["VmHWM"] / 1024),
        "peak_above_started_mib": round((finished["VmHWM"] - started["VmRSS"]) / 1024),
    }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
