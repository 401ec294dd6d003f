"""Retention: delivered studies are purged after ``storage.retention_days``.

A study is purged only when every instance was batched, every job finished and every
result was delivered (a pending or dead-lettered delivery keeps the whole study), and
nothing arrived for it within the retention period. Spool files, results and journal
rows go together.
"""

import logging
import shutil
import time
from pathlib import Path

from plugin.journal import Journal
from plugin.spool import Spool, is_valid_uid
from plugin.worker import Worker

log = logging.getLogger(__name__)


class Retention(Worker):
    interval = 600.0

    def __init__(self, journal: Journal, spool: Spool, results_dir: Path, retention_days: float) -> None:
        super().__init__("retention")
        self._journal = journal
        self._spool = spool
        self._results_dir = results_dir
        self._seconds = retention_days * 86400

    def step(self) -> bool:
        if self._seconds > 0:
            self.purge(time.time() - self._seconds)
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
