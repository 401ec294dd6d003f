"""Shared by the benchmarks: a synthetic CT series on disk, free ports, starting and
waiting for a node, and printing the figures."""

import atexit
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml

from plugin.demo.phantom import make_volume
from plugin.demo.series import write_ct_series

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk waits ~40 ms per message for a delayed ACK without it


def scratch(prefix: str) -> Path:
    """A work folder, removed when the benchmark exits: its series and spools are GBs."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, work, True)
    return work


def pipeline_folder(folder: Path, source: Path, edit: Callable[[dict], None] | None = None) -> dict:
    """``folder`` (made) holding a copy of the pipeline file ``source`` and nothing else
    (pipelines/ holds two demos that match the same series), its model artifact by absolute
    path (a pipeline names it relative to its own file), changed by ``edit`` if given;
    returns the pipeline as written."""
    pipeline = yaml.safe_load(source.read_text())
    pipeline["model"]["artifact"] = str((source.parent / pipeline["model"]["artifact"]).resolve())
    if edit is not None:
        edit(pipeline)
    folder.mkdir(parents=True)
    (folder / source.name).write_text(yaml.safe_dump(pipeline, sort_keys=False))
    return pipeline


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ct_series(out_dir: Path, slices: int, seed: int = 1) -> list[Path]:
    """``slices`` synthetic 512x512 CT slices (about 0.5 MB each) with one nodule."""
    volume, _ = make_volume(np.random.default_rng(seed), slices, n_nodules=1)
    return write_ct_series(
        out_dir,
        volume,
        study_uid=f"1.2.826.0.1.3680043.8.498.{seed}",
        series_number=seed,
        series_description="benchmark chest CT",
        seed=seed,
    )


def cpu_seconds(pid: int) -> float:
    """The CPU seconds (user + system, all threads) that process ``pid`` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def wait_for_echo(port: int, called_ae: str = "RADPIPE", timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while (
        subprocess.run(["echoscu", "-aec", called_ae, "127.0.0.1", str(port)], env=ENV, capture_output=True).returncode
        != 0
    ):
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing answers C-ECHO on port {port}")
        time.sleep(0.1)


def storescu(port: int, files: list[Path], called_ae: str = "RADPIPE") -> float:
    """Send ``files`` over one association; return the wall time in seconds."""
    start = time.perf_counter()
    subprocess.run(["storescu", "-aec", called_ae, "127.0.0.1", str(port), *map(str, files)], env=ENV, check=True)
    return time.perf_counter() - start


def node_config(work: Path, port: int, pipelines: Path, metrics_port: int = 0, **sections: dict) -> dict:
    """A benchmark node's config: C-STORE on ``port``, data under ``work/data``, pipelines
    from ``pipelines``, metrics on ``metrics_port`` (0: any free port), plus ``sections``."""
    return {
        "node": {"port": port},
        "metrics": {"port": metrics_port},
        "storage": {"dir": str(work / "data")},
        "pipelines": {"dir": str(pipelines)},
        **sections,
    }


def stage_seconds(metrics_port: int, name: str) -> dict[str, float]:
    """The node's ``radpipe_stage_seconds`` sums for pipeline ``name``, by stage."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    stages = {}
    for line in text.splitlines():
        if line.startswith("radpipe_stage_seconds_sum{") and f'pipeline="{name}"' in line:
            stage = line.split('stage="', 1)[1].split('"', 1)[0]
            stages[stage] = float(line.rsplit(" ", 1)[1])
    return stages


def serve(work: Path, config: dict, log: Path | None = None) -> subprocess.Popen:
    """``radpipe serve`` with ``config`` (written to ``work/radpipe.yaml``), output discarded
    or, given ``log``, written there."""
    (work / "radpipe.yaml").write_text(yaml.safe_dump(config))
    with open(log or os.devnull, "wb") as output:
        return subprocess.Popen(
            [sys.executable, "-m", "plugin", "serve", "--config", str(work / "radpipe.yaml")],
            env=ENV,
            stdout=output,
            stderr=subprocess.STDOUT,
        )


def wait_for_log(log: Path, text: str, timeout: float = 600) -> None:
    """Wait until a line of ``log`` holds ``text`` (a node listens before it has loaded its
    pipelines and models: a steady-state figure waits for its "node ... ready:" line)."""
    deadline = time.monotonic() + timeout
    while not (log.exists() and text in log.read_text(errors="replace")):
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {text!r} in {log} after {timeout} s")
        time.sleep(0.1)


def report(figures: dict, json_path: Path | None) -> None:
    """Print ``figures`` one per line and, if asked, write them to ``json_path``."""
    width = max(map(len, figures))
    for key, value in figures.items():
        print(f"{key:<{width}}  {value}")
    if json_path:
        json_path.write_text(json.dumps(figures, indent=2) + "\n")
