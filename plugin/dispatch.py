"""The dispatcher: the durable outbox. Sends each written result to its destinations
with C-STORE (``scu.py``) or, to a DICOMweb destination, STOW-RS (``stow.py``).

Each destination has its own sender thread, so one that is slow, hung or down delays
no other. A sender takes the results due to its destination, sends them over one
association, and releases it; timeouts bound every try. A delivery counts only when
the destination answered success. A failed try is journaled with the time of the next
one (exponential backoff), so retries survive a restart; after ``give_up_after_seconds``
(or ``tries`` attempts) the delivery is dead-lettered. A delivery is dead-lettered at
once when its destination is no longer configured, or answered that the same file can
never succeed (a permanent :class:`DeliveryError`, e.g. HTTP 415).

A sender's round is leased to its node (``Journal.due_deliveries``): nodes sharing a
journal never send the same delivery at once. A try whose lease was lost meanwhile (it
expired and another node took the delivery) is not journaled; what was not tried when a
round ends early is handed back at once.
"""

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Protocol

from plugin.config import Destination, DispatchSection
from plugin.journal import Delivery, Journal
from plugin.logs import log_context
from plugin.metrics import Metrics
from plugin.scu import DeliveryError, DicomFile, StoreSCU, Timeouts
from plugin.stow import StowClient
from plugin.worker import Worker

log = logging.getLogger(__name__)

# Results per association: no more than the presentation contexts one association request
# can offer (scu.MAX_CONTEXTS), and few enough that the journal's priority order is read
# again while a backlog drains.
ROUND = 64

# Failures that are about the destination, the network or the file: logged without a traceback.
EXPECTED = (DeliveryError, OSError)


class Connection(Protocol):
    """A DICOM association (C-STORE) or an HTTP connection (STOW-RS) carrying one round."""

    @property
    def is_established(self) -> bool: ...

    def store(self, file: DicomFile) -> None: ...

    def __enter__(self) -> "Connection": ...

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None: ...


class Transport(Protocol):
    """Opens a :class:`Connection` to one destination for a round of files."""

    def associate(self, files: Sequence[DicomFile]) -> Connection: ...


def transport(destination: Destination, calling_ae: str, timeouts: Timeouts) -> Transport:
    """STOW-RS for a destination given by ``url``, C-STORE for one given by AE title and address."""
    if destination.url is not None:
        return StowClient(destination, timeouts)
    return StoreSCU(destination, calling_ae, timeouts)


class Outbox:
    """Records the outcome of each try in the journal, the metrics and the log, and
    decides from the retry policy when a failed delivery is tried again."""

    def __init__(self, journal: Journal, policy: DispatchSection, metrics: Metrics) -> None:
        self._journal = journal
        self._policy = policy
        self._metrics = metrics

    def delivered(self, delivery: Delivery, seconds: float) -> None:
        """The destination answered success, ``seconds`` after its round asked for the association."""
        with log_context(f"job-{delivery.job_id}/{delivery.destination}", delivery.study_instance_uid):
            if not self._journal.record_attempt(delivery.result_id, delivery.destination, None):
                log.warning("%s: delivered, but its lease was lost: not journaled", delivery.name)
                return
            self._metrics.results_delivered.labels(delivery.destination).inc()
            self._metrics.stage_seconds.labels("dispatch", delivery.pipeline).observe(seconds)
            log.info("%s: delivered", delivery.name)

    def failed(self, delivery: Delivery, error: Exception, retry: bool = True) -> None:
        """Journal a failed try: tried again after its backoff, or dead-lettered."""
        now = time.time()
        retry &= not (isinstance(error, DeliveryError) and error.permanent)
        retry_at = self._retry_at(delivery, now) if retry else None
        expected = isinstance(error, EXPECTED)
        reason = str(error) if isinstance(error, DeliveryError) else f"{type(error).__name__}: {error}"
        tries = delivery.attempts + 1
        with log_context(f"job-{delivery.job_id}/{delivery.destination}", delivery.study_instance_uid):
            if not self._journal.record_attempt(delivery.result_id, delivery.destination, reason, retry_at):
                log.warning("%s: try failed (%s), but its lease was lost: not journaled", delivery.name, reason)
                return
            self._metrics.dispatch_failures.labels(delivery.destination).inc()
            if retry_at is None:
                log.error(
                    "%s: dead-lettered after %d tries: %s",
                    delivery.name,
                    tries,
                    reason,
                    exc_info=None if expected else error,
                )
            else:
                log.warning(
                    "%s: try %d failed (%s); next in %.0f s",
                    delivery.name,
                    tries,
                    reason,
                    retry_at - now,
                    exc_info=None if expected else error,
                )

    def _retry_at(self, delivery: Delivery, now: float) -> float | None:
        """When to try again, or None when the delivery should be dead-lettered."""
        attempts = delivery.attempts + 1
        first = delivery.first_attempt_at or now
        policy = self._policy
        if (policy.tries is not None and attempts >= policy.tries) or now - first >= policy.give_up_after_seconds:
            return None
        return now + min(policy.max_backoff_seconds, policy.backoff_seconds * 2 ** (attempts - 1))


class DestinationSender(Worker):
    """Sends the results due to one destination: each round, one association for all of
    them (up to ``ROUND``)."""

    def __init__(self, name: str, scu: Transport, journal: Journal, outbox: Outbox) -> None:
        super().__init__(f"dispatch-{name}")
        self.destination = name
        self._scu = scu
        self._journal = journal
        self._outbox = outbox

    def step(self) -> bool:
        due = self._journal.due_deliveries(time.time(), self.destination, ROUND)
        try:
            files: list[tuple[Delivery, DicomFile]] = []
            for delivery in due:
                try:
                    files.append((delivery, DicomFile.read(Path(delivery.result_path))))
                except Exception as e:  # whatever it is, it is this delivery's failed try
                    self._outbox.failed(delivery, e)
            if files:
                self._send(files)
        finally:
            self._journal.release_deliveries(due)  # those tried are no longer held: skipped
        return len(due) == ROUND

    def _send(self, files: Sequence[tuple[Delivery, DicomFile]]) -> None:
        start = time.perf_counter()
        try:
            association = self._scu.associate([file for _, file in files])
        except Exception as e:  # no association: each result of the round failed this try
            for delivery, _ in files:
                self._outbox.failed(delivery, e)
            return
        with association:
            for delivery, file in files:
                if self.stopping.is_set():
                    return  # the rest stay due and are sent on the next start
                try:
                    association.store(file)
                except Exception as e:  # this result's failed try; the others go on
                    self._outbox.failed(delivery, e)
                    if not association.is_established:
                        return  # it took the association down: the rest go in the next round
                else:
                    self._outbox.delivered(delivery, time.perf_counter() - start)


class Dispatcher(Worker):
    """Owns one sender per configured destination (``senders``, started and stopped
    with the node's workers) and wakes them when results are written. Its own loop
    dead-letters deliveries to destinations the config no longer has."""

    interval = 5.0

    def __init__(
        self,
        journal: Journal,
        destinations: dict[str, Destination],
        calling_ae: str,
        policy: DispatchSection,
        metrics: Metrics,
    ) -> None:
        super().__init__("dispatcher")
        self._journal = journal
        self._outbox = Outbox(journal, policy, metrics)
        timeouts = Timeouts(
            connect=policy.connect_timeout_seconds,
            acse=policy.acse_timeout_seconds,
            dimse=policy.dimse_timeout_seconds,
            network=policy.network_timeout_seconds,
        )
        self.senders = [
            DestinationSender(name, transport(destination, calling_ae, timeouts), journal, self._outbox)
            for name, destination in destinations.items()
        ]

    def wake(self) -> None:
        for sender in self.senders:
            sender.wake()

    def step(self) -> bool:
        configured = [sender.destination for sender in self.senders]
        elsewhere = self._journal.deliveries_elsewhere(configured)
        try:
            for delivery in elsewhere:
                error = DeliveryError(f"destination {delivery.destination!r} is not configured")
                self._outbox.failed(delivery, error, retry=False)
        finally:
            self._journal.release_deliveries(elsewhere)
        return False
