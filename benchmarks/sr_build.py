"""Building and writing the TID 1500 SR of a 500-slice series (issue 15 goal: building
at most 0.2 ms per referenced image).

Makes a synthetic 512x512 CT series (``benchmarks.common.ct_series``), reads its headers
as the runner does (no pixels), and times, in this process:

- the demo classification pipeline's SR (``measurement_report``, as ``plugin/runner.py``
  calls it: the pipeline's findings, one group referencing every image);
- the segmentation demo's SR (``volumetric_measurement_report``) with three lesions (each
  group references the slices its lesion lies on) and with nothing found (one Absent group
  referencing every image), against a SEG built from the three lesions' masks;
- for each: building it (the first build in the process, after highdicom's module tables
  are loaded as the runner loads them when it starts, then the median of the rest),
  encoding it as the runner does (``dcmwrite`` into memory), writing it durably
  (``write_durably``: write, fsync, rename), what the dispatcher does to send it
  (pynetdicom reads the file back with ``dcmread`` and encodes it again), and the whole
  send to dcmtk's storescp, as the dispatcher sends it and as the file's own bytes.

Figures are ms per image of the series (the classification SR references each once):
wall time, and for building and encoding also this process's CPU time, which leaves out
waiting for a core when other work shares the machine.

Run: .venv/bin/python -m benchmarks.sr_build [--slices 500] [--repeats 7] [--series DIR] [--json FILE]
(``--series DIR``: keep the generated series there and reuse it on the next run.)
"""

import argparse
import io
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.filewriter import dcmwrite
from pynetdicom import _config
from pynetdicom.dsutils import encode

from benchmarks.common import ENV, REPO, ct_series, free_port, report, wait_for_echo
from plugin.config import Destination
from plugin.models.artifact import model_sha256, read_manifest
from plugin.outputs.conformance import load_tables
from plugin.outputs.seg import segmentation_object
from plugin.outputs.sr import AlgorithmIdentity, measurement_report, volumetric_measurement_report
from plugin.pipeline import Pipeline, load_pipeline
from plugin.postprocess import Finding
from plugin.scu import DicomFile, StoreSCU, Timeouts
from plugin.segment import Lesion, Segmentation
from plugin.spool import write_durably

CLASSIFICATION = REPO / "pipelines" / "lung-nodule-demo.yaml"
SEGMENTATION = REPO / "pipelines" / "lung-nodule-seg-demo.yaml"


def headers(directory: Path, slices: int) -> list[Dataset]:
    """The series' headers in slice order, read as the runner reads them (no pixels);
    generated into ``directory`` unless it holds the series already."""
    paths = sorted(directory.glob("*.dcm"))
    if len(paths) != slices:
        paths = ct_series(directory, slices)
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def algorithm(pipeline: Pipeline) -> AlgorithmIdentity:
    """The identity the runner records for ``pipeline`` and its artifact's weights."""
    model = model_sha256(read_manifest(pipeline.artifact_dir))
    return AlgorithmIdentity(pipeline.name, pipeline.version, pipeline.sha256, model, "fp32", "cpu")


def segmentation(pipeline: Pipeline, sources: list[Dataset], lesions: int) -> Segmentation:
    """``lesions`` nodules of 10 slices each, spread along the series, in one segment."""
    depth, rows, columns = len(sources), int(sources[0].Rows), int(sources[0].Columns)
    masks = np.zeros((1, depth, rows, columns), bool)
    found = []
    for number in range(1, lesions + 1):
        first = number * depth // (lesions + 1)
        masks[0, first : first + 10, 200:220, 100 + 60 * number : 120 + 60 * number] = True
        found.append(
            Lesion(
                label="nodule",
                segment_number=1,
                number=number,
                volume_mm3=1000.0,
                diameter_mm=10.0,
                centroid=(0.0, 0.0, 0.0),
                mean_probability=0.9,
                max_probability=0.95,
                slices=tuple(range(first, first + 10)),
            )
        )
    probabilities = (masks * 230).astype(np.uint8)
    return Segmentation(pipeline.postprocess.segments, masks, probabilities, found)


def timed(function: Callable[[], Any], repeats: int) -> tuple[float, float, float, Any]:
    """(first call s, median of the ``repeats`` after it s, their median CPU time s of
    this process, the last result). The CPU time leaves out waiting for a core that
    other work on the machine holds."""
    seconds, cpu = [], []
    for _ in range(repeats + 1):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = function()
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return seconds[0], statistics.median(seconds[1:]), statistics.median(cpu[1:]), result


def send_seconds(path: Path, repeats: int) -> tuple[float, float]:
    """Median seconds of one C-STORE of ``path`` to dcmtk's storescp (receiving, not
    storing) over an open association: as the dispatcher sends it (``plugin.scu``: the
    file meta read, then pynetdicom decodes the file and encodes it again), and as the
    file's own bytes (pynetdicom's ``STORE_SEND_CHUNKED_DATASET``), interleaved."""
    port = free_port()
    scp = subprocess.Popen(
        ["storescp", "--ignore", "-aet", "PACS", str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    seconds: dict[bool, list[float]] = {False: [], True: []}
    try:
        wait_for_echo(port, "PACS")
        scu = StoreSCU(Destination(ae_title="PACS", host="127.0.0.1", port=port), "RADPIPE", Timeouts(10, 10, 60, 60))
        with scu.associate([DicomFile.read(path)]) as association:
            for _ in range(repeats):
                for raw in (False, True):
                    _config.STORE_SEND_CHUNKED_DATASET = raw
                    start = time.perf_counter()
                    association.store(DicomFile.read(path))
                    seconds[raw].append(time.perf_counter() - start)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
        scp.terminate()
        scp.wait(10)
    return statistics.median(seconds[False]), statistics.median(seconds[True])


def measure(name: str, build: Callable[[], Dataset], images: int, repeats: int, out: Path) -> dict[str, Any]:
    """Build, encode, write durably, read back for sending, and send: ms per image."""
    per_image = 1000 / images
    first, build_s, build_cpu, document = timed(build, repeats)

    def encoded() -> bytes:
        buffer = io.BytesIO()
        dcmwrite(buffer, document, enforce_file_format=True)
        return buffer.getvalue()

    _, encode_s, encode_cpu, data = timed(encoded, repeats)
    path = out / f"{name}.dcm"
    _, write_s, _, _ = timed(lambda: write_durably(path, data), repeats)
    _, reencode_s, _, _ = timed(lambda: encode(pydicom.dcmread(path), False, True, False), repeats)
    send_s, raw_s = send_seconds(path, repeats)
    return {
        f"{name}: build, first in the process (ms/image)": round(first * per_image, 3),
        f"{name}: build (ms/image)": round(build_s * per_image, 3),
        f"{name}: build, CPU time (ms/image)": round(build_cpu * per_image, 3),
        f"{name}: encode, dcmwrite (ms/image)": round(encode_s * per_image, 3),
        f"{name}: encode, CPU time (ms/image)": round(encode_cpu * per_image, 3),
        f"{name}: durable write (ms/image)": round(write_s * per_image, 3),
        f"{name}: dispatcher's read back + re-encode (ms/image)": round(reencode_s * per_image, 3),
        f"{name}: C-STORE to storescp as sent (ms/image)": round(send_s * per_image, 3),
        f"{name}: C-STORE of the file's bytes, not decoded (ms/image)": round(raw_s * per_image, 3),
        f"{name}: file bytes": len(data),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slices", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--series", type=Path, help="keep the generated series here and reuse it")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch)
        sources = headers(args.series or out / "series", args.slices)
        classifier = load_pipeline(CLASSIFICATION)
        findings = [Finding(spec, 0.93, True, 0) for spec in classifier.postprocess.findings]
        identity = algorithm(classifier)
        figures: dict[str, Any] = {"slices": len(sources), "load average (1 min) before": os.getloadavg()[0]}
        start = time.perf_counter()
        load_tables()
        figures["highdicom's module tables, once per process, as the runner starts (ms)"] = round(
            (time.perf_counter() - start) * 1000, 1
        )
        build = partial(measurement_report, sources, findings, identity)
        figures |= measure("classification SR", build, len(sources), args.repeats, out)
        segmenter = load_pipeline(SEGMENTATION)
        seg_identity = algorithm(segmenter)
        three = segmentation(segmenter, sources, 3)
        seg = segmentation_object(sources, three, seg_identity)
        nothing = Segmentation(three.segments, np.zeros_like(three.masks), np.zeros_like(three.probabilities), [])
        for name, result in (("segmentation SR, 3 lesions", three), ("segmentation SR, nothing found", nothing)):
            build = partial(volumetric_measurement_report, sources, result, seg, seg_identity)
            figures |= measure(name, build, len(sources), args.repeats, out)
        figures["load average (1 min) after"] = os.getloadavg()[0]
    report(figures, args.json)


if __name__ == "__main__":
    main()
