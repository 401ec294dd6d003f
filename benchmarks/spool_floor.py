"""Would a spool of preallocated files make a received instance durable sooner?

The spool writes each instance to a new file, renames it and flushes with one ``syncfs``
(plugin/spool.py, plugin/durability.py): the new file's inode, blocks and directory entry
go through the file system's journal on every flush. A file whose blocks are already
written and flushed needs only ``fdatasync`` of its data. This measures, on the same 200
CT slices, ms per instance made durable:

- new file, rename, ``syncfs`` (what the spool does; ``benchmarks.ingest``'s floor);
- ``pwrite`` + ``fdatasync`` into a file of the pool, made (zeros written and flushed)
  before the clock starts: the best case, a pool that outlasts the burst;
- the same while a thread keeps the pool at 64 files, as a node receiving for longer than
  its pool lasts would have to;
- the same with the pool's files reserved by ``posix_fallocate`` (no zeros written: the
  blocks stay "unwritten", so the first ``fdatasync`` into them updates the journal too).

Then each file is truncated to its instance's length and renamed, as a spool of such files would.
Interleaved rounds, median.

Run: .venv/bin/python -m benchmarks.spool_floor [--slices 200] [--rounds 3] [--json out.json]
"""

import argparse
import collections
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

from benchmarks.common import ct_series, report, scratch
from benchmarks.ingest import durable_write_floor

POOL = 64  # files the refilling thread keeps ready
SLOT = 1 << 20  # bytes per pool file: a 512x512 CT slice and its header fit


class _Pool:
    """Files of ``SLOT`` bytes, flushed, ready to be written into."""

    def __init__(self, folder: Path, zeros: bool) -> None:
        self.folder, self.zeros = folder, zeros
        self.ready: collections.deque[tuple[Path, int]] = collections.deque()
        self.made = 0
        self.stop = threading.Event()
        folder.mkdir()
        self.directory = os.open(folder, os.O_RDONLY)

    def make(self) -> None:
        self.made += 1
        path = self.folder / f"slot-{self.made}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        if self.zeros:
            os.write(fd, bytes(SLOT))
        else:
            os.posix_fallocate(fd, 0, SLOT)
        os.fsync(fd)
        os.fsync(self.directory)
        self.ready.append((path, fd))

    def refill(self) -> None:
        while not self.stop.is_set():
            if len(self.ready) < POOL:
                self.make()
            else:
                time.sleep(0.001)


def pooled(contents: list[bytes], folder: Path, zeros: bool, refill: bool) -> float:
    """Seconds to make ``contents`` durable one at a time through a pool of files."""
    pool = _Pool(folder, zeros)
    for _ in range(POOL if refill else len(contents)):
        pool.make()
    filler = threading.Thread(target=pool.refill) if refill else None
    if filler:
        filler.start()
    os.sync()
    start = time.perf_counter()
    for index, data in enumerate(contents):
        while not pool.ready:
            time.sleep(0.0001)
        path, fd = pool.ready.popleft()
        os.pwrite(fd, data, 0)
        os.fdatasync(fd)
        os.ftruncate(fd, len(data))
        os.close(fd)
        os.replace(path, folder / f"{index}.dcm")
    seconds = time.perf_counter() - start
    pool.stop.set()
    if filler:
        filler.join()
    for _, fd in pool.ready:
        os.close(fd)
    os.close(pool.directory)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    work = scratch("radpipe-spool-floor-")
    files = ct_series(work / "series", args.slices)
    contents = [f.read_bytes() for f in files]
    ways = {
        "new file, rename, syncfs (the spool)": lambda folder: durable_write_floor(files, folder),
        "pool made beforehand (zeros), fdatasync": lambda folder: pooled(contents, folder, True, False),
        "pool refilled meanwhile (zeros), fdatasync": lambda folder: pooled(contents, folder, True, True),
        "pool refilled meanwhile (fallocate), fdatasync": lambda folder: pooled(contents, folder, False, True),
    }
    timings: dict[str, list[float]] = {name: [] for name in ways}
    for round_number in range(args.rounds):
        for number, (name, way) in enumerate(ways.items()):
            folder = work / f"{round_number}-{number}"
            timings[name].append(way(folder))
            shutil.rmtree(folder)
    timed = timings.items()
    report(
        {
            "instances": len(files),
            "load_average_1_min": os.getloadavg()[0],
            **{f"{name} (ms per instance)": round(statistics.median(v) / len(files) * 1000, 3) for name, v in timed},
        },
        args.json,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
