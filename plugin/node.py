"""The DICOM node (SCP): C-ECHO, and C-STORE of every storage SOP class in every
transfer syntax, compressed ones included.

The C-STORE handler only checks, stores and journals (invariants 1 and 4); everything
else happens in background workers that read the journal.
"""

import logging
import socket
import ssl
import time
from enum import IntEnum

from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer

from plugin.config import NodeSection, TLSConfig
from plugin.journal import InstanceRecord, Journal
from plugin.logs import association_context
from plugin.metrics import Metrics
from plugin.spool import Spool, is_valid_uid

log = logging.getLogger(__name__)


class StoreStatus(IntEnum):
    """C-STORE response statuses this node answers (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    # Refused: out of resources. Disk below the configured floor or a write failed; the
    # sender keeps the instance and retries later.
    OUT_OF_RESOURCES = 0xA700
    # Error: data set does not match SOP class. Required UIDs missing or malformed.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Error: cannot understand. The data set could not be decoded at all.
    CANNOT_UNDERSTAND = 0xC210


@association_context
def handle_echo(event: Event) -> int:
    return 0x0000


def handle_open(event: Event) -> None:
    """Disable Nagle on every accepted connection: small PDUs (responses) go out at once
    instead of waiting ~40 ms for a delayed ACK."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


@association_context
def handle_store(event: Event, spool: Spool, journal: Journal, metrics: Metrics, min_free_bytes: int) -> int:
    """Store one instance durably, journal it, and only then answer success."""
    calling_ae = event.assoc.requestor.ae_title
    start = time.perf_counter()
    try:
        dataset = event.dataset
        study_uid = str(dataset.get("StudyInstanceUID", ""))
        series_uid = str(dataset.get("SeriesInstanceUID", ""))
    except Exception as e:
        log.error("C-STORE from %s: undecodable data set: %s", calling_ae, e)
        metrics.instances_rejected.labels("undecodable").inc()
        return StoreStatus.CANNOT_UNDERSTAND
    sop_uid = str(event.request.AffectedSOPInstanceUID)
    sop_class_uid = str(event.request.AffectedSOPClassUID)
    bad = [
        name for name, uid in (("Study", study_uid), ("Series", series_uid), ("SOP", sop_uid)) if not is_valid_uid(uid)
    ]
    if bad:
        log.error("C-STORE from %s: missing or invalid %s Instance UID; refused", calling_ae, "/".join(bad))
        metrics.instances_rejected.labels("invalid_uid").inc()
        return StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if spool.free_bytes() < min_free_bytes:
        log.error("C-STORE from %s: spool below its free-space floor; answering out of resources", calling_ae)
        metrics.instances_rejected.labels("out_of_resources").inc()
        return StoreStatus.OUT_OF_RESOURCES
    try:
        data = event.encoded_dataset()
        path, digest = spool.store(study_uid, series_uid, sop_uid, data)
        journal.record_instance(
            InstanceRecord(
                sop_instance_uid=sop_uid,
                sop_class_uid=sop_class_uid,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                path=str(path),
                sha256=digest,
                size=len(data),
                calling_ae=calling_ae,
                received_at=time.time(),
            )
        )
    except OSError as e:
        log.error("C-STORE from %s: cannot store instance %s: %s", calling_ae, sop_uid, e)
        metrics.instances_rejected.labels("storage_error").inc()
        return StoreStatus.OUT_OF_RESOURCES
    metrics.instances_received.labels(calling_ae).inc()
    metrics.stage_seconds.labels("receive", "").observe(time.perf_counter() - start)
    return StoreStatus.SUCCESS


def _server_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    if tls.cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        context.load_verify_locations(tls.ca)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def build_ae(settings: NodeSection) -> AE:
    ae = AE(ae_title=settings.ae_title)
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = 0  # no limit: fewer, larger PDUs
    ae.require_called_aet = True
    if settings.allowed_calling_aets:
        ae.require_calling_aet = settings.allowed_calling_aets
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def start_server(
    settings: NodeSection, spool: Spool, journal: Journal, metrics: Metrics, min_free_bytes: int
) -> ThreadedAssociationServer:
    """Start listening in the background; returns the server (``shutdown()`` stops it)."""
    ae = build_ae(settings)
    handlers = [
        (evt.EVT_CONN_OPEN, handle_open),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [spool, journal, metrics, min_free_bytes]),
    ]
    server = ae.start_server(
        (settings.host, settings.port),
        block=False,
        evt_handlers=handlers,
        ssl_context=_server_ssl_context(settings.tls),
    )
    log.info("DICOM node %s listening on %s:%d", settings.ae_title, *server.server_address[:2])
    return server
