"""Preprocessing one image at a time (as the runner does) against a whole batch at once.

The demo pipeline's steps (window, antialiased resize 512 -> 128) on 32 decoded 512x512
slices in modality units: each slice alone, then the 32 as one tensor; ms per image,
median of interleaved rounds, one torch thread.

Run: .venv/bin/python -m benchmarks.preprocess_batch [--batch 32] [--rounds 7] [--json out.json]
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import pydicom
import torch

from benchmarks.common import REPO, ct_series, report, scratch
from plugin.loader import modality_frames
from plugin.pipeline import load_pipeline
from plugin.preprocess import preprocess


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps = load_pipeline(REPO / "pipelines" / "lung-nodule-demo.yaml").preprocess
    files = ct_series(scratch("radpipe-preprocess-"), args.batch)
    images = torch.cat([torch.from_numpy(modality_frames(pydicom.dcmread(f)))[:, None] for f in files])
    one_by_one, batched = [], []
    for _ in range(args.rounds):
        start = time.perf_counter()
        for image in images.split(1):
            preprocess(steps, image)
        one_by_one.append((time.perf_counter() - start) / len(images) * 1000)
        start = time.perf_counter()
        preprocess(steps, images)
        batched.append((time.perf_counter() - start) / len(images) * 1000)
    report(
        {
            "images": len(images),
            "load_average_1_min": os.getloadavg()[0],
            "one at a time (ms per image)": round(statistics.median(one_by_one), 3),
            f"batch of {len(images)} (ms per image)": round(statistics.median(batched), 3),
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
