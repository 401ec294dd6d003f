"""Parse once (invariant 7): what the journaled header saves the runner, per image.

On one generated 512x512 CT series, in one process, in interleaved rounds (median):

- receipt: the C-STORE handler's parse of a received instance up to Pixel Data, its
  checks and its journal entry (``node._parse``, ``header_values``, ``check_pixel_module``,
  ``journal_entry``);
- the runner's headers in order (``loader.read_images``): from the journal entries, and
  from the files as for a row without one (an earlier radpipe's);
- decoding each image in modality units (``loader.decoded_frames``): its Pixel Data value
  read at the journaled offset, and the whole file parsed and decoded;
- a job's load as the runner does it: the headers in order from the journal, then each
  image decoded (each job builds its headers anew, so pydicom converts every value it
  reads of them once more; the decode steps above reuse headers converted already).

Run: OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.parse_once [--slices 100] [--rounds 5] [--json out.json]
"""

import argparse
import dataclasses
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian

from benchmarks.common import ct_series, report, scratch
from plugin.attributes import header_values, journal_entry
from plugin.journal import InstanceRecord
from plugin.loader import decoded_frames, read_images
from plugin.node import _parse, check_pixel_module


def receipt(data: bytes) -> str | None:
    """What the C-STORE handler does with a received instance before it writes it. Its
    data set starts after the preamble, "DICM" and the File Meta Information, whose group
    length (the first element, 12 bytes) says how long it is."""
    start = 132 + 12 + struct.unpack_from("<I", data, 140)[0]
    dataset, pixels = _parse(data, start, ExplicitVRLittleEndian)
    values = header_values(dataset)
    check_pixel_module(values, pixels, False, 2**31)
    return journal_entry(values, dataset, pixels, ExplicitVRLittleEndian)


def ms_per_image(work: Callable[[], object], images: int) -> float:
    start = time.perf_counter()
    work()
    return (time.perf_counter() - start) / images * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE  # as the node reads

    files = ct_series(scratch("radpipe-parse-once-"), args.slices)
    contents = [f.read_bytes() for f in files]
    records = [
        InstanceRecord("", "", "", "", str(f), len(data), "BENCH", 0.0, None, receipt(data))
        for f, data in zip(files, contents, strict=True)
    ]
    from_files = [dataclasses.replace(r, attributes=None) for r in records]
    journaled, unjournaled = read_images(records), read_images(from_files)
    steps = {
        "receipt: parse to Pixel Data, checks, journal entry": lambda: [receipt(data) for data in contents],
        "runner headers in order: from the journal": lambda: read_images(records),
        "runner headers in order: from the files": lambda: read_images(from_files),
        "decode: Pixel Data read at the journaled offset": lambda: [decoded_frames(s) for s in journaled],
        "decode: whole file parsed and decoded": lambda: [decoded_frames(s) for s in unjournaled],
        "a job's load: headers in order, then each image decoded": lambda: [
            decoded_frames(s) for s in read_images(records)
        ],
    }
    timings: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            timings[name].append(ms_per_image(step, len(files)))
    figures = {
        "slices": len(files),
        "rounds": args.rounds,
        "load_average_1_min": os.getloadavg()[0],
        **{f"{name} (ms per image)": round(statistics.median(values), 3) for name, values in timings.items()},
    }
    report(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
