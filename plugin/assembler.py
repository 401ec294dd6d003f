"""The assembler: decides when a series is complete and hands it to the router.

A series with pending (not yet batched) instances is complete when no instance arrived
for the longest ``quiet_seconds`` among the pipelines that match it, or when the
shortest ``max_wait_seconds`` since its first pending instance has passed. Completion
closes the pending instances into a batch and queues one job per matching pipeline
(with at least ``min_instances``), or journals the batch as unrouted. Instances that
arrive later make the series pending again, which starts a new run on the whole series.
"""

import logging
import time

import pydicom

from plugin.journal import JobSpec, Journal, PendingSeries
from plugin.metrics import Metrics
from plugin.pipeline import Completion, Pipeline
from plugin.router import Router
from plugin.worker import Worker

log = logging.getLogger(__name__)

DEFAULT_COMPLETION = Completion()


class Assembler(Worker):
    interval = 0.1

    def __init__(self, journal: Journal, router: Router, metrics: Metrics) -> None:
        super().__init__("assembler")
        self._journal = journal
        self._router = router
        self._metrics = metrics

    def step(self) -> bool:
        now = time.time()
        for series in self._journal.pending_series():
            matches = self._matching(series)
            if self._is_complete(series, matches, now):
                self._close(series, matches, now)
        return False

    def _matching(self, series: PendingSeries) -> list[Pipeline]:
        try:
            header = pydicom.dcmread(series.first_path, stop_before_pixels=True)
        except Exception as e:  # the spool holds only what decoded on receipt; still, never stall
            log.error("series %s: cannot read %s for routing: %s", series.series_instance_uid, series.first_path, e)
            return []
        return self._router.matching(header)

    @staticmethod
    def _is_complete(series: PendingSeries, matches: list[Pipeline], now: float) -> bool:
        rules = [p.completion for p in matches] or [DEFAULT_COMPLETION]
        quiet = max(r.quiet_seconds for r in rules)
        max_wait = min(r.max_wait_seconds for r in rules)
        return now - series.last_received >= quiet or now - series.first_received >= max_wait

    def _close(self, series: PendingSeries, matches: list[Pipeline], now: float) -> None:
        jobs = [
            JobSpec(p.name, p.version, p.sha256, p.priority)
            for p in matches
            if series.count >= p.completion.min_instances
        ]
        batch_id = self._journal.create_batch(series, jobs)
        self._metrics.studies_completed.inc()
        for pipeline in matches:
            self._metrics.stage_seconds.labels("wait", pipeline.name).observe(now - series.first_received)
        log.info(
            "series %s complete: %d instance(s), batch %d, %s",
            series.series_instance_uid,
            series.count,
            batch_id,
            f"jobs for {', '.join(j.pipeline for j in jobs)}" if jobs else "unrouted",
        )
