"""A 3D model on a 300-slice series: one CT series of 300 slices of 512x512 (0.7 x 0.7 x
2.5 mm, about 160 MB) sent to `radpipe serve` with a volume pipeline (input.kind: volume):
the series is stacked into a volume in HU (300 MB as float32), reoriented to RAS and
resampled to 1.4 x 1.4 x 2.5 mm, windowed, and given to a small 3D DenseNet
(plugin/models/architectures.py densenet3d), once by sliding window and once whole.

For each mode, a node of its own reports its resident memory once started with its model
warm, its peak (VmHWM) after the SR is written, and the time from the last instance's
acknowledgement to the SR in the results folder, beyond the pipeline's quiet period; the
node's own stage timers (load = decode and stack, preprocess = resample and window, infer,
write) come from its metrics.

Run: .venv/bin/python -m benchmarks.volume [--slices 300] [--modes windows whole] [--json out.json]
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from benchmarks.common import (
    ct_series,
    free_port,
    node_config,
    report,
    scratch,
    serve,
    stage_seconds,
    storescu,
    wait_for_echo,
)
from benchmarks.memory import memory_kib
from plugin.models.architectures import densenet3d
from plugin.models.artifact import save_artifact

QUIET_SECONDS = 2.0
PARAMS = {"in_channels": 1, "num_classes": 2}
INPUT = {"kind": "volume", "orientation": "RAS", "spacing": [1.4, 1.4, 2.5]}
MODES = {
    "windows": {**INPUT, "sliding_window": {"roi_size": [96, 96, 96], "overlap": 0.25, "sw_batch_size": 2}},
    "whole": INPUT,
}


def artifact(directory: Path) -> Path:
    """The benchmark's model: densenet3d with seeded weights (its scores do not matter here)."""
    torch.manual_seed(0)
    manifest = {
        "architecture": {"id": "densenet3d", "params": PARAMS},
        "input": {"kind": "volume", "channels": 1},
        "classes": ["normal", "nodule"],
    }
    return save_artifact(directory, densenet3d(**PARAMS), manifest)


def pipeline(directory: Path, model: Path, selection: dict) -> None:
    directory.mkdir(parents=True)
    text = {
        "name": "volume-bench",
        "version": 1,
        "match": {"Modality": "CT"},
        "completion": {"quiet_seconds": QUIET_SECONDS},
        "input": selection,
        "preprocess": [{"window": {"preset": "lung"}}],
        "model": {"artifact": str(model), "device": "cpu"},
        "postprocess": {"findings": [{"label": "nodule", "code": ["SCT", "27925004", "Nodule"]}]},
        "destinations": [],
    }
    (directory / "volume-bench.yaml").write_text(yaml.safe_dump(text, sort_keys=False))


def run(work: Path, files: list[Path], model: Path, mode: str) -> dict:
    pipeline(work / "pipelines", model, MODES[mode])
    return serve_and_send(work, files, "volume-bench", 1)


def serve_and_send(work: Path, files: list[Path], name: str, results: int) -> dict:
    """A node with the pipelines in ``work/pipelines`` gets ``files``: its memory, the time
    from the last instance's acknowledgement to ``results`` result files, and pipeline
    ``name``'s stage times."""
    port, metrics_port = free_port(), free_port()
    config = node_config(work, port, work / "pipelines", metrics_port)
    node = serve(work, config)
    try:
        wait_for_echo(port)
        started = memory_kib(node.pid)
        os.sync()
        storescu(port, files)
        sent = time.perf_counter()
        while len(list((work / "data" / "results").glob("*/*.dcm"))) < results:
            if node.poll() is not None:
                raise RuntimeError("the node exited")
            time.sleep(0.02)
        seconds = time.perf_counter() - sent
        finished = memory_kib(node.pid)
        stages = stage_seconds(metrics_port, name)
        while "write" not in stages:  # the job's stage times are observed just after its results are journaled
            time.sleep(0.05)
            stages = stage_seconds(metrics_port, name)
    finally:
        node.terminate()
        node.wait(60)
    return {
        "rss_started_mib": round(started["VmRSS"] / 1024),
        "peak_rss_mib": round(finished["VmHWM"] / 1024),
        "peak_above_started_mib": round((finished["VmHWM"] - started["VmRSS"]) / 1024),
        "last_instance_to_sr_seconds": round(seconds, 2),
        "beyond_quiet_period_seconds": round(seconds - QUIET_SECONDS, 2),
        **{f"stage_{stage}_seconds": round(value, 2) for stage, value in sorted(stages.items())},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--modes", nargs="+", choices=sorted(MODES), default=list(MODES))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = scratch("radpipe-volume-")
    files = ct_series(work / "series", args.slices)
    model = artifact(work / "model")
    figures: dict = {
        "slices": len(files),
        "series_megabytes": round(sum(f.stat().st_size for f in files) / 1e6),
        "volume_float32_mib": round(len(files) * 512 * 512 * 4 / 2**20),
    }
    for mode in args.modes:
        for key, value in run(work / mode, files, model, mode).items():
            figures[f"{mode}_{key}"] = value
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
