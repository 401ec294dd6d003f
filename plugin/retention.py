"""Retention: delivered studies are purged after ``storage.retention_days``, and files no
journal row names are removed once they are ``ORPHAN_GRACE_SECONDS`` old.

A study is purged only when every instance was batched, every job finished and every
result was delivered (a pending or dead-lettered delivery keeps the whole study), and
nothing arrived for it within the retention period. Spool files, results and journal
rows go together.

Orphans are what a failure leaves in the (shared) storage: an instance file whose row was
never committed (the journal unreachable, answered 0xA700; the node killed between file
and row), a temporary file of a write cut short, a result of a job whose node died before
its finish. Every node sweeps the spool and results folders on its own: removing a file
is idempotent, and a file is removed only if it is still the one found old (see
:func:`remove_unchanged`), so a sweep never takes an instance being received again.
Temporary files and results are deleted (a result is made again by its job's re-run); an
instance file goes to the quarantine (``orphan``), never deleted: a storage folder put
under another journal (a node switched to a new PostgreSQL, a journal file lost) holds
nothing that journal names, and its instances must survive that mistake.
A file is journaled when a row has its name's SOP Instance UID, whatever path the row
holds: a node that sees the shared folder under another path removes nothing of it.
"""

import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from stat import S_ISREG

from plugin.journal import Journal
from plugin.quarantine import Quarantine
from plugin.spool import Spool, is_valid_uid
from plugin.worker import Worker

log = logging.getLogger(__name__)

# A file without a row is garbage once this old (by its inode's change time, which a
# rename sets too): a receipt journals its file within seconds, a job its results within
# its lease, so an hour leaves any write in flight alone.
ORPHAN_GRACE_SECONDS = 3600.0
# Files looked up in the journal per query.
SWEEP_CHUNK = 500


def remove_unchanged(path: Path, seen: os.stat_result, keep_in: Quarantine | None = None) -> bool:
    """Remove ``path`` if it is still the file ``seen`` (same inode); True if it was.
    ``keep_in``: move it into that quarantine instead of deleting it.

    The file is first renamed aside, atomically: a receipt that wrote the same path again
    since (a new file, renamed into place) has its file put back. The aside name's change
    time is now, so no other node's sweep takes it within the grace period."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.orphan")
    try:
        path.rename(aside)
    except FileNotFoundError:  # another node swept it first
        return False
    if aside.lstat().st_ino != seen.st_ino:
        aside.rename(path)
        return False
    if keep_in is None:
        aside.unlink()
    else:
        keep_in.keep_file(aside, "orphan", "no journal row names it", "retention", path.stem, move=True)
    return True


class Retention(Worker):
    interval = 600.0

    def __init__(
        self,
        journal: Journal,
        spool: Spool,
        results_dir: Path,
        retention_days: float,
        quarantine: Quarantine,
        orphan_grace_seconds: float = ORPHAN_GRACE_SECONDS,
    ) -> None:
        super().__init__("retention")
        self._journal = journal
        self._spool = spool
        self._quarantine = quarantine
        self._results_dir = results_dir
        self._seconds = retention_days * 86400
        self._grace = orphan_grace_seconds

    def step(self) -> bool:
        now = time.time()
        if self._seconds > 0:
            self.purge(now - self._seconds)
        self.sweep(now - self._grace)
        return False

    def purge(self, older_than: float) -> list[str]:
        studies = self._journal.purgeable_studies(older_than)
        for study_uid in studies:
            self._journal.forget_study(study_uid)  # journal first: a crash leaves files, never dangling rows
            self._spool.remove_study(study_uid)
            if is_valid_uid(study_uid):
                shutil.rmtree(self._results_dir / study_uid, ignore_errors=True)
        if studies:
            log.info("retention: purged %d delivered stud%s", len(studies), "y" if len(studies) == 1 else "ies")
        return studies

    def _files_before(self, older_than: float) -> Iterator[tuple[Path, os.stat_result]]:
        """Every file of the spool and results folders last changed before ``older_than``."""
        for root in (self._spool.root, self._results_dir):
            for path in root.rglob("*"):
                try:
                    stat = path.lstat()
                except FileNotFoundError:  # removed while listed
                    continue
                if S_ISREG(stat.st_mode) and stat.st_ctime < older_than:
                    yield path, stat

    def sweep(self, older_than: float) -> list[Path]:
        """Take out every file of the spool and results folders that no journal row names
        and that was last changed before ``older_than`` (instances into the quarantine,
        the rest deleted); the files taken out."""
        removed = []
        files = self._files_before(older_than)
        while chunk := list(islice(files, SWEEP_CHUNK)):
            journaled = self._journal.journaled_uids([path.stem for path, _ in chunk])
            removed += [
                path
                for path, seen in chunk
                if path.stem not in journaled and remove_unchanged(path, seen, self._kept_in(path))
            ]
        if removed:
            log.info("retention: took out %d file(s) no journal row names", len(removed))
        return removed

    def _kept_in(self, path: Path) -> Quarantine | None:
        """Where an orphan is kept: an instance (a spool file with its UID's name) in the
        quarantine; a temporary file or a result nowhere."""
        return self._quarantine if path.suffix == ".dcm" and path.is_relative_to(self._spool.root) else None
