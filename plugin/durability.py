"""Group sync: making received instances durable with one flush for many writers.

A C-STORE may be answered success only once the instance file, its directory entry and
its journal row are on disk. Flushing each (fsync of file, of directory, SQLite's WAL)
costs three disk flushes per instance. Instead, the handler writes and commits without
flushing, then waits here: one ``syncfs`` of the storage file system flushes all of it,
for every association that is waiting at the same moment (leader-based group commit).
"""

import ctypes
import os
import threading
from pathlib import Path

_libc = ctypes.CDLL(None, use_errno=True)
_syncfs = getattr(_libc, "syncfs", None)


class GroupSync:
    def __init__(self, directory: Path) -> None:
        self._fd = os.open(directory, os.O_RDONLY)
        self._condition = threading.Condition()
        self._issued = 0  # tickets handed out: one per caller of sync()
        self._synced = 0  # every ticket up to this one is on disk
        self._syncing = False

    def _flush(self) -> None:
        if _syncfs is None:  # not Linux: flush everything (correct, slower)
            os.sync()
        elif _syncfs(self._fd) != 0:
            error = ctypes.get_errno()
            raise OSError(error, f"syncfs failed: {os.strerror(error)}")

    def sync(self) -> None:
        """Return once everything written before this call is durable."""
        with self._condition:
            self._issued += 1
            ticket = self._issued
            while self._synced < ticket:
                if self._syncing:
                    self._condition.wait()
                    continue
                # Lead: one flush covers every ticket issued so far.
                self._syncing, target, flushed = True, self._issued, False
                self._condition.release()
                try:
                    self._flush()
                    flushed = True
                finally:
                    self._condition.acquire()
                    self._syncing = False
                    if flushed:
                        self._synced = max(self._synced, target)
                    self._condition.notify_all()

    def close(self) -> None:
        os.close(self._fd)
