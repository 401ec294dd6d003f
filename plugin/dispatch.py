"""The dispatcher: sends each written result to its destinations with C-STORE.

A delivery counts only when the destination answered success. Each pending delivery is
tried ``tries`` times with exponential backoff; then it is journaled as failed.
"""

import logging
from pathlib import Path

import pydicom
from pynetdicom import AE
from pynetdicom.status import code_to_category

from plugin.config import Destination
from plugin.journal import Delivery, Journal
from plugin.logs import log_context
from plugin.metrics import Metrics, StageTimer
from plugin.worker import Worker

log = logging.getLogger(__name__)


class DeliveryError(Exception):
    """The destination could not be reached or did not answer success."""


def send_c_store(path: Path, destination: Destination, calling_ae: str, timeout: float = 30.0) -> None:
    """Send one DICOM file; return only when the destination answered Success or Warning."""
    dataset = pydicom.dcmread(path)
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.add_requested_context(dataset.SOPClassUID, [dataset.file_meta.TransferSyntaxUID])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
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
    def __init__(
        self,
        journal: Journal,
        destinations: dict[str, Destination],
        calling_ae: str,
        metrics: Metrics,
        tries: int = 3,
        backoff_seconds: float = 1.0,
    ) -> None:
        super().__init__("dispatcher")
        self._journal = journal
        self._destinations = destinations
        self._calling_ae = calling_ae
        self._metrics = metrics
        self._tries = tries
        self._backoff = backoff_seconds

    def step(self) -> bool:
        for delivery in self._journal.pending_deliveries():
            if self.stopping.is_set():
                break
            with log_context(f"job-{delivery.job_id}/{delivery.destination}"):
                self._deliver(delivery)
        return False

    def _deliver(self, delivery: Delivery) -> None:
        name = delivery.destination
        destination = self._destinations.get(name)
        error = f"destination {name!r} is not configured"
        attempts = 0
        timer = StageTimer()
        while destination is not None and attempts < self._tries and not self.stopping.is_set():
            attempts += 1
            try:
                with timer.stage("dispatch"):
                    send_c_store(Path(delivery.result_path), destination, self._calling_ae)
            except (DeliveryError, OSError) as e:
                error = str(e)
                self._metrics.dispatch_failures.labels(name).inc()
                log.warning("job %d -> %s: try %d/%d failed: %s", delivery.job_id, name, attempts, self._tries, e)
                self.stopping.wait(self._backoff * 2 ** (attempts - 1))
                continue
            self._journal.record_delivery(delivery.result_id, name, attempts, None)
            self._metrics.results_delivered.labels(name).inc()
            timer.observe(self._metrics, delivery.pipeline)
            log.info("job %d -> %s: delivered", delivery.job_id, name)
            return
        if self.stopping.is_set():
            return  # still pending: retried after restart
        self._journal.record_delivery(delivery.result_id, name, attempts, error)
        log.error("job %d -> %s: giving up after %d tries: %s", delivery.job_id, name, attempts, error)
