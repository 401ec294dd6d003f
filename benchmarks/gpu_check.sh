#!/usr/bin/env bash
# GPU check for a lent GPU machine, under 5 minutes: fp32 eager vs bf16 + channels_last +
# torch.compile (the GPU variant `radpipe optimize` records), at batch 1, 32 and 128, on the
# demo model and, if given, on an optimized (pruned) artifact:
#
#   bash benchmarks/gpu_check.sh [OPTIMIZED_ARTIFACT_DIR]
#
# Prints one table (p50/p95 latency, images/s, max |bf16 - fp32| probability difference).
# Exits 0 with a message when there is no CUDA device, so it is safe to run anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec timeout 290 "$PYTHON" - "$@" <<'PY'
import sys
import time
from pathlib import Path

import torch

if not torch.cuda.is_available():
    print("gpu_check: no CUDA device visible to torch; nothing to measure (this is not a failure).")
    sys.exit(0)

from plugin.accel.bench import fp32_module
from plugin.models.artifact import read_manifest
from plugin.models.serving import serve_gpu

BATCHES = (1, 32, 128)
SECONDS = 4.0  # per variant and batch size: 2 artifacts x 2 variants x 3 sizes x 4 s + compiles < 5 min
cuda = torch.device("cuda")
artifacts = [Path("pipelines/models/lung-nodule-demo"), *map(Path, sys.argv[1:])]


def measure(run, batch):
    x = torch.rand(batch, 1, 128, 128, device=cuda)
    times = []
    with torch.inference_mode():
        for _ in range(5):
            run(x)
        torch.cuda.synchronize()
        deadline = time.perf_counter() + SECONDS
        while len(times) < 10 or (time.perf_counter() < deadline and len(times) < 5000):
            start = time.perf_counter()
            run(x)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
    times.sort()
    p50, p95 = times[len(times) // 2], times[int(len(times) * 0.95)]
    return 1000 * p50, 1000 * p95, batch / p50


print(f"device: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
print(f"{'model':<34} {'variant':<20} {'batch':>5} {'p50 ms':>8} {'p95 ms':>8} {'images/s':>10} {'max dP':>8}")
for directory in artifacts:
    fp32 = fp32_module(directory).to(cuda)  # the (pruned) fp32 weights in a plain module
    manifest = {**read_manifest(directory), "gpu": {"precision": "bf16", "buckets": list(BATCHES)}}
    started = time.perf_counter()
    bf16 = serve_gpu(fp32, manifest, cuda)
    compile_s = time.perf_counter() - started
    probe = torch.rand(128, 1, 128, 128, device=cuda)
    with torch.inference_mode():
        diff = (bf16(probe).softmax(1) - fp32(probe).float().softmax(1)).abs().max().item()
    for name, run in (("fp32 eager", fp32), (f"bf16+compile ({compile_s:.0f}s)", bf16)):
        for batch in BATCHES:
            p50, p95, speed = measure(run, batch)
            shown = f"{diff:.4f}" if name != "fp32 eager" else ""
            print(f"{directory.name:<34} {name:<20} {batch:>5} {p50:>8.3f} {p95:>8.3f} {speed:>10.0f} {shown:>8}", flush=True)
PY
