"""The segmentation demo on a 300-slice series: one synthetic CT series of 300 slices of
512x512 (0.7 x 0.7 x 2.5 mm, about 160 MB) with three nodules, sent to `radpipe serve` with
pipelines/lung-nodule-seg-demo.yaml (its quiet period shortened): the node's memory, the
time from the last instance's acknowledgement to the SEG and the SR in the results
folder, and its stage times (infer = the sliding-window UNet, write = segment + SEG + SR).

Then the SEG itself: its size as written (BINARY, JPEG 2000 Lossless), and the time
`plugin.outputs.seg.segmentation_object` takes to encode the node's masks for the 300
slices as BINARY and as FRACTIONAL (the masks as probabilities 0 or 255, so the same
frames), median of 3.

Run: .venv/bin/python -m benchmarks.segmentation [--slices 300] [--json out.json]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
import pydicom

from benchmarks.common import REPO, pipeline_folder, report, scratch
from benchmarks.volume import QUIET_SECONDS, serve_and_send
from plugin.demo.phantom import render_volume
from plugin.demo.series import SLICE_THICKNESS_MM, write_ct_series
from plugin.outputs.seg import segmentation_object
from plugin.outputs.sr import AlgorithmIdentity
from plugin.pipeline import load_pipeline
from plugin.segment import Segmentation

PIPELINE = REPO / "pipelines" / "lung-nodule-seg-demo.yaml"
NAME = "lung-nodule-seg-demo"
KINDS: tuple[Literal["binary", "fractional"], ...] = ("binary", "fractional")


def series(directory: Path, slices: int) -> list[Path]:
    volume = render_volume(np.random.default_rng(3), slices, 3, SLICE_THICKNESS_MM)
    return write_ct_series(
        directory, volume.hu, study_uid="1.2.826.0.1.3680043.8.498.3", series_number=1, series_description="bench"
    )


def unsent(pipeline: dict) -> None:
    """The benchmark's quiet period, and no destinations: the results stay on disk."""
    pipeline["completion"]["quiet_seconds"] = QUIET_SECONDS
    pipeline["destinations"] = []


def encoding(files: list[Path], seg_path: Path) -> dict:
    """Encode the written SEG's masks again, BINARY and FRACTIONAL, timed."""
    headers = sorted(
        (pydicom.dcmread(f, stop_before_pixels=True) for f in files), key=lambda h: float(h.ImagePositionPatient[2])
    )
    written = hd.seg.segread(seg_path)
    decoded = written.get_pixels_by_source_instance([str(h.SOPInstanceUID) for h in headers])
    masks = np.moveaxis(decoded, -1, 0) > 0
    segments = load_pipeline(PIPELINE).postprocess.segments
    found = Segmentation(segments, masks, masks.astype(np.uint8) * 255, [])
    algorithm = AlgorithmIdentity(NAME, "1", "0" * 64, "0" * 64, "fp32", "cpu")
    figures: dict = {"seg_frames_written": int(written.NumberOfFrames)}
    for kind in KINDS:
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            seg = segmentation_object(headers, found, algorithm, kind)
            seconds.append(time.perf_counter() - start)
        figures[f"seg_{kind}_encode_seconds"] = round(statistics.median(seconds), 2)
        figures[f"seg_{kind}_transfer_syntax"] = seg.file_meta.TransferSyntaxUID.name
        buffer = pydicom.filebase.DicomBytesIO()
        seg.save_as(buffer, enforce_file_format=True)
        figures[f"seg_{kind}_kilobytes"] = round(len(buffer.getvalue()) / 1e3)
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    work = scratch("radpipe-segmentation-")
    files = series(work / "series", args.slices)
    pipeline_folder(work / "node" / "pipelines", PIPELINE, unsent)
    figures: dict = {
        "slices": len(files),
        "series_megabytes": round(sum(f.stat().st_size for f in files) / 1e6),
        **serve_and_send(work / "node", files, NAME, 2),
    }
    [seg_path] = [
        p
        for p in (work / "node" / "data" / "results").glob("*/*.dcm")
        if pydicom.dcmread(p, stop_before_pixels=True).Modality == "SEG"
    ]
    figures["seg_written_kilobytes"] = round(seg_path.stat().st_size / 1e3)
    figures.update(encoding(files, seg_path))
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
