"""The dispatcher: the durable outbox. Sends each written result to its destinations
with C-STORE.

A delivery counts only when the destination answered success. A failed attempt is
journaled with the time of the next one (exponential backoff), so retries survive a
restart and one unreachable destination never holds up the others. After
``give_up_after_seconds`` (or ``tries`` attempts) the delivery is dead-lettered.
"""

import logging
import ssl
import time
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.status import code_to_category

from plugin.config import Destination, DispatchSection, TLSConfig
from plugin.journal import Delivery, Journal
from plugin.logs import log_context
from plugin.metrics import Metrics, StageTimer
from plugin.worker import Worker

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """The destination could not be reached or did not answer success."""


def client_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """TLS towards a destination: verify it against ``ca`` (system roots without one),
    and present ``cert``/``key`` when given (mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None)
    context.check_hostname = False  # DICOM peers are known by address and AE title, not host name
    if tls.cert is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def send_c_store(path: Path, destination: Destination, calling_ae: str, timeout: float = 30.0) -> None:
    """Send one DICOM file; return only when the destination answered Success or Warning."""
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID])
    tls_args = (client_ssl_context(destination.tls), None) if destination.tls is not None else None
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if not assoc.is_established:
        raise DeliveryError(
            f"association to {destination.ae_title}@{destination.host}:{destination.port} "
            "rejected, aborted or never connected"
        )
    try:
        status = assoc.send_c_store(dataset)
    finally:
        assoc.release()
    if "Status" not in status:
        raise DeliveryError("no response to C-STORE (timeout or aborted association)")
    if code_to_category(status.Status) not in ("Success", "Warning"):
        raise DeliveryError(f"C-STORE answered 0x{status.Status:04X}")


class Dispatcher(Worker):
    interval = 0.2

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
        self._destinations = destinations
        self._calling_ae = calling_ae
        self._policy = policy
        self._metrics = metrics

    def step(self) -> bool:
        for delivery in self._journal.due_deliveries(time.time()):
            if self.stopping.is_set():
                break
            with log_context(f"job-{delivery.job_id}/{delivery.destination}"):
                self._attempt(delivery)
        return False

    def _retry_at(self, delivery: Delivery, now: float) -> float | None:
        """When to try again, or None when the delivery should be dead-lettered."""
        attempts = delivery.attempts + 1
        first = delivery.first_attempt_at or now
        policy = self._policy
        if (policy.tries is not None and attempts >= policy.tries) or now - first >= policy.give_up_after_seconds:
            return None
        return now + min(policy.max_backoff_seconds, policy.backoff_seconds * 2 ** (attempts - 1))

    def _attempt(self, delivery: Delivery) -> None:
        name = delivery.destination
        destination = self._destinations.get(name)
        timer = StageTimer()
        try:
            if destination is None:
                raise DeliveryError(f"destination {name!r} is not configured")
            with timer.stage("dispatch"):
                send_c_store(Path(delivery.result_path), destination, self._calling_ae)
        except (DeliveryError, OSError, ssl.SSLError) as e:
            self._metrics.dispatch_failures.labels(name).inc()
            retry_at = self._retry_at(delivery, time.time())
            self._journal.record_attempt(delivery.result_id, name, str(e), retry_at)
            if retry_at is None:
                log.error(
                    "job %d -> %s: dead-lettered after %d tries: %s", delivery.job_id, name, delivery.attempts + 1, e
                )
            else:
                log.warning(
                    "job %d -> %s: try %d failed (%s); next in %.0f s",
                    delivery.job_id,
                    name,
                    delivery.attempts + 1,
                    e,
                    retry_at - time.time(),
                )
            return
        self._journal.record_attempt(delivery.result_id, name, None)
        self._metrics.results_delivered.labels(name).inc()
        timer.observe(self._metrics, delivery.pipeline)
        log.info("job %d -> %s: delivered", delivery.job_id, name)
