"""The spool: received instances as files, written so that a crash never leaves a
half-written file under its final name.

Layout: ``<storage>/spool/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm``.
A write goes to a temporary name beside the target and is renamed into place. The node
then journals it and flushes both with one group sync (``durability.GroupSync``) before
it answers success (invariant 1). Results and quarantined files, which nobody waits
for, are written with :func:`write_durably` (fsync of file and directory) instead.
"""

import os
import re
import shutil
import uuid
from pathlib import Path

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def is_valid_uid(uid: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters; also safe as a file name."""
    return len(uid) <= 64 and _UID.match(uid) is not None


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(target: Path, data: bytes, fsync: bool) -> None:
    """Write ``data`` to ``target`` so that ``target`` is never seen half-written: temporary
    file, rename. With ``fsync``, also flush the file and every directory that changed,
    so that after a crash ``target`` is either absent or complete."""
    folder = target.parent
    if not folder.is_dir():
        folder.mkdir(parents=True, exist_ok=True)
        if fsync:
            _fsync_directory(folder.parent)  # the new directory's own entry must survive too
            _fsync_directory(folder.parent.parent)
    temporary = folder / f".{target.name}.{uuid.uuid4().hex}.part"
    with temporary.open("wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(temporary, target)
    if fsync:
        _fsync_directory(folder)


def write_durably(target: Path, data: bytes) -> None:
    write_atomically(target, data, fsync=True)


class Spool:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def store(self, study_uid: str, series_uid: str, sop_uid: str, data: bytes) -> Path:
        """Write one instance (DICOM file bytes) atomically, not yet flushed; return its path."""
        for uid in (study_uid, series_uid, sop_uid):
            if not is_valid_uid(uid):
                raise ValueError(f"invalid UID {uid!r}")
        target = self.root / study_uid / series_uid / f"{sop_uid}.dcm"
        write_atomically(target, data, fsync=False)
        return target

    def remove_study(self, study_uid: str) -> None:
        if is_valid_uid(study_uid):
            shutil.rmtree(self.root / study_uid, ignore_errors=True)
