"""Progress bars for the long steps (fine-tuning, calibration, evaluation): tqdm when it
is installed, else one line per tenth of the work, on stderr either way."""

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, what: str) -> Iterator[T]:
    try:
        from tqdm import tqdm
    except ImportError:
        yield from _simple(items, total, what)
        return
    tqdm.monitor_interval = 0  # no monitor thread: the node and the tests stop every thread they start
    yield from tqdm(items, total=total, desc=what, unit="batch", leave=False, file=sys.stderr)


def _simple(items: Iterable[T], total: int, what: str) -> Iterator[T]:
    started, step = time.monotonic(), max(1, total // 10)
    for done, item in enumerate(items, start=1):
        yield item
        if done % step == 0 or done == total:
            print(f"{what}: {done}/{total} ({time.monotonic() - started:.0f}s)", file=sys.stderr, flush=True)
