"""The assembler: decides when a series (or a study) is complete and queues its jobs.

Every poll, pending (not yet batched) instances are grouped by study and series, and each
series is matched against the loaded pipelines on the header of its first instance.

- A study with no matching study-level pipeline completes series by series: a series is
  complete when no instance arrived for the longest ``quiet_seconds`` among its matching
  pipelines, when the shortest ``max_wait_seconds`` since its first pending instance has
  passed, or when it holds the count its ``expected_count_tag`` announces.
- If any series of a study matches a study-level pipeline, the study's pending series
  complete together, by the same rules applied to the whole study.

Completion closes the instances into batches and queues one job per matching pipeline
(with at least ``min_instances``), or journals the batch as unrouted. Instances arriving
later make the series pending again: a new run on the whole series (or study), the
batch's next ``generation``, whose SR supersedes the previous one.

Several nodes sharing a PostgreSQL journal each run an assembler. Their timers are the
journal's rows, not process memory: the quiet period and the maximum wait are measured
from the instances' journaled ``received_at``, whichever node received them. They may
all judge a series complete at once; :meth:`Journal.create_batches` lets exactly one of
them close it (it re-checks, under a lock on the study, that what it was asked to close
is still pending) and the others skip it.
"""

import logging
import time
from collections.abc import Sequence

import pydicom
from pydicom import Dataset

from plugin.journal import JobSpec, Journal, PendingSeries
from plugin.logs import log_context
from plugin.metrics import Metrics
from plugin.pipeline import Completion, Pipeline
from plugin.router import Router
from plugin.worker import Worker

log = logging.getLogger(__name__)

DEFAULT_COMPLETION = Completion()


def _expected_count(rules: Sequence[Completion], header: Dataset | None) -> int | None:
    for rule in rules:
        if rule.expected_count_tag and header is not None:
            value = header.get(rule.expected_count_tag)
            try:
                return int(value) if value not in (None, "") else None
            except (TypeError, ValueError):
                return None
    return None


def is_complete(
    rules: Sequence[Completion], first: float, last: float, count: int, header: Dataset | None, now: float
) -> bool:
    rules = rules or [DEFAULT_COMPLETION]
    expected = _expected_count(rules, header)
    if expected is not None and count >= expected:
        return True
    quiet = max(r.quiet_seconds for r in rules)
    max_wait = min(r.max_wait_seconds for r in rules)
    return now - last >= quiet or now - first >= max_wait


class Assembler(Worker):
    interval = 0.05  # how late a series may be closed after its quiet period (result latency)

    def __init__(self, journal: Journal, router: Router, metrics: Metrics) -> None:
        super().__init__("assembler")
        self._journal = journal
        self._router = router
        self._metrics = metrics
        self._headers: dict[str, tuple[str, Dataset | None]] = {}

    def _header(self, series: PendingSeries) -> Dataset | None:
        """The header of the series' first pending instance, read once per series."""
        cached = self._headers.get(series.series_instance_uid)
        if cached is not None and cached[0] == series.first_path:
            return cached[1]
        try:
            header: Dataset | None = pydicom.dcmread(series.first_path, stop_before_pixels=True)
        except Exception as e:  # stored files decoded on receipt; still, never stall the assembler
            log.error("series %s: cannot read %s for routing: %s", series.series_instance_uid, series.first_path, e)
            header = None
        self._headers[series.series_instance_uid] = (series.first_path, header)
        return header

    def step(self) -> bool:
        """Close every series or study that is complete; True if any was (jobs are queued)."""
        now = time.time()
        closed = False
        studies: dict[str, list[PendingSeries]] = {}
        for series in self._journal.pending_series():
            studies.setdefault(series.study_instance_uid, []).append(series)
        # Headers of series no longer pending (closed here or by another node) are dropped.
        still = {series.series_instance_uid for study in studies.values() for series in study}
        self._headers = {uid: header for uid, header in self._headers.items() if uid in still}
        for study_uid, pending in studies.items():
            with log_context(study_uid=study_uid):
                closed |= self._step_study(study_uid, pending, now)
        return closed

    def _step_study(self, study_uid: str, pending: list[PendingSeries], now: float) -> bool:
        """Close the study's complete series, or the whole study; True if any was."""
        plans = []
        for series in pending:
            header = self._header(series)
            plans.append((series, header, self._router.matching(header) if header is not None else []))
        study_level = {p.name: p for _, _, matches in plans for p in matches if p.completion.level == "study"}
        if study_level:
            rules = [p.completion for _, _, matches in plans for p in matches]
            first = min(s.first_received for s in pending)
            last = max(s.last_received for s in pending)
            count = sum(s.count for s in pending)
            if not is_complete(rules, first, last, count, plans[0][1], now):
                return False
            return self._close(study_uid, plans, list(study_level.values()), now)
        closed = False
        for plan in plans:
            series, header, matches = plan
            rules = [p.completion for p in matches]
            if is_complete(rules, series.first_received, series.last_received, series.count, header, now):
                closed |= self._close(study_uid, [plan], [], now)
        return closed

    def _close(
        self,
        study_uid: str,
        plans: list[tuple[PendingSeries, Dataset | None, list[Pipeline]]],
        study_pipelines: list[Pipeline],
        now: float,
    ) -> bool:
        """Close the planned series (and study); False if another node closed them first."""

        def spec(p: Pipeline) -> JobSpec:
            return JobSpec(p.name, p.version, p.sha256, p.priority)

        series_jobs = [
            (
                series,
                [
                    spec(p)
                    for p in matches
                    if p.completion.level == "series" and series.count >= p.completion.min_instances
                ],
            )
            for series, _, matches in plans
        ]
        total = sum(series.count for series, _, _ in plans)
        study_jobs = [spec(p) for p in study_pipelines if total >= p.completion.min_instances]
        batches = self._journal.create_batches(study_uid, series_jobs, study_jobs)
        if not batches:
            log.debug("study %s: closed by another node first", study_uid)
            return False
        self._metrics.studies_completed.inc()
        first = min(series.first_received for series, _, _ in plans)
        for pipeline in {p.name: p for _, _, matches in plans for p in matches}.values():
            self._metrics.stage_seconds.labels("wait", pipeline.name).observe(now - first)
        for (series, jobs), batch in zip(series_jobs, batches, strict=False):  # the study batch comes last
            names = [j.pipeline for j in jobs]
            log.info(
                "series %s complete (generation %d): %d instance(s), %s",
                series.series_instance_uid,
                batch.generation,
                series.count,
                f"jobs for {', '.join(names)}" if names else "unrouted",
            )
        if study_jobs:
            log.info(
                "study %s complete (generation %d): jobs for %s",
                study_uid,
                batches[-1].generation,
                ", ".join(j.pipeline for j in study_jobs),
            )
        return True
