"""The DICOM node (SCP): C-STORE of every storage SOP class in every transfer syntax,
compressed ones included (C-ECHO and the upper layer are ``acceptor``'s).

The C-STORE handler only checks, stores and journals (invariants 1 and 4); everything
else happens in background workers that read the journal. Whatever it refuses, it
quarantines with the reason, and it answers a named DIMSE status.
"""

import dataclasses
import errno
import functools
import io
import logging
import sqlite3
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from types import TracebackType

import pydicom
from pydicom import Dataset
from pydicom.filereader import read_dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from plugin.acceptor import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    AssociationServer,
    Services,
    StoreRequest,
)
from plugin.attributes import PIXEL_DATA, PIXEL_TAGS, PixelDataElement, header_values, journal_entry, pixel_data_element
from plugin.config import NodeSection, TLSConfig
from plugin.durability import GroupSync
from plugin.journal import InstanceRecord, Journal, JournalUnavailable
from plugin.logs import follow, log_context
from plugin.metrics import Metrics
from plugin.pdu import printable
from plugin.quarantine import Quarantine
from plugin.resend import same_instance
from plugin.spool import Spool, is_valid_uid

log = logging.getLogger(__name__)


class StoreStatus(IntEnum):
    """C-STORE response statuses this node answers (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    # Refused: SOP Class not supported (PS3.7 C.4). The command's Affected SOP Class UID
    # is not the abstract syntax of the presentation context it came on, so that SOP
    # class was never negotiated: nothing is stored.
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    # Refused: out of resources. Disk below its floor, the job queue over its cap, a
    # write failed, the disk or the journal is full, or the journal's database cannot be
    # reached (PostgreSQL down): the sender keeps the instance and retries later.
    OUT_OF_RESOURCES = 0xA700
    # Error: data set does not match SOP class. UIDs missing or malformed, pixel module
    # inconsistent with the pixel data, absurd sizes, or a known SOP Instance UID with
    # different content: retrying the same bytes will not help.
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    # Error: cannot understand. The data set could not be decoded at all.
    CANNOT_UNDERSTAND = 0xC210
    # Error: unable to process (what pynetdicom's storage SCP answers when its handler
    # raises). The node failed, not the data (the journal locked or read-only, a bug):
    # the sender keeps the instance and may retry.
    PROCESSING_FAILURE = 0xC211


@dataclass(frozen=True)
class StoreLimits:
    min_free_bytes: int
    max_instance_bytes: int
    max_queued_jobs: int


class InstanceLocks:
    """One lock per SOP Instance UID being received. A sender that tries again while its
    first try is still being stored (two associations, one instance) waits for that try
    and then finds the instance known, instead of racing it onto the same spool file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[threading.Lock, int]] = {}  # UID -> (its lock, threads using it)

    @contextmanager
    def hold(self, uid: str) -> Iterator[None]:
        with self._lock:
            lock, users = self._held.get(uid, (threading.Lock(), 0))
            self._held[uid] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                users = self._held[uid][1] - 1
                if users:
                    self._held[uid] = (lock, users)
                else:
                    del self._held[uid]


@dataclass(frozen=True)
class Storage:
    """What the C-STORE handler writes to and reports into (bound into the acceptor's ``Services``)."""

    spool: Spool
    journal: Journal
    group_sync: GroupSync
    quarantine: Quarantine
    metrics: Metrics
    limits: StoreLimits
    receiving: InstanceLocks = field(default_factory=InstanceLocks)


class Refusal(Exception):
    def __init__(self, status: StoreStatus, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


BITS_ALLOCATED = {1, 8, 16, 32, 64}
PHOTOMETRIC = {"MONOCHROME1", "MONOCHROME2", "RGB", "PALETTE COLOR", "YBR_FULL", "YBR_FULL_422",
               "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT"}  # fmt: skip


def _integer(values: dict[str, str | int], keyword: str, default: int | None = None) -> int:
    """``values[keyword]`` as an integer, for :func:`check_pixel_module`; a refusal that
    names the attribute when it is missing or not an integer."""
    value = values.get(keyword, default)
    if value is None:
        detail = f"incomplete image pixel module: no {keyword}"
    else:
        try:
            return int(value)
        except ValueError:
            detail = f"{keyword} {value!r} is not an integer"
    raise Refusal(StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS, "unsupported_pixel_format", detail)


def check_pixel_module(
    values: dict[str, str | int], pixels: PixelDataElement | None, encapsulated: bool, max_bytes: int
) -> None:
    """Refuse pixel data that cannot be what its header says, before it is stored: the
    decoder must never be asked to allocate an absurd size or read past the data.
    ``values``: the header's (:func:`header_values`); ``pixels``: its pixel data element."""
    if "Rows" not in values and pixels is None:
        return  # not an image (SR, RTSTRUCT, presentation state, ...)
    bad = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    if pixels is None:
        raise Refusal(bad, "missing_pixel_data", "image attributes present but no Pixel Data")
    rows, columns, bits = _integer(values, "Rows"), _integer(values, "Columns"), _integer(values, "BitsAllocated")
    samples, frames = _integer(values, "SamplesPerPixel", 1), _integer(values, "NumberOfFrames", 1)
    photometric = str(values.get("PhotometricInterpretation", ""))
    if rows <= 0 or columns <= 0 or frames <= 0 or samples not in (1, 3):
        raise Refusal(bad, "unsupported_pixel_format", f"{rows}x{columns}, {frames} frame(s), {samples} sample(s)")
    if bits not in BITS_ALLOCATED or photometric not in PHOTOMETRIC:
        raise Refusal(bad, "unsupported_pixel_format", f"BitsAllocated {bits}, PhotometricInterpretation {photometric}")
    expected = (rows * columns * frames * samples * bits + 7) // 8
    if expected > max_bytes:
        raise Refusal(bad, "absurd_size", f"pixels would decode to {expected / 2**20:.0f} MiB")
    if not encapsulated and pixels.tag == PIXEL_DATA and pixels.length not in (expected, expected + 1):
        detail = f"Pixel Data has {pixels.length} bytes, the header implies {expected}"
        raise Refusal(bad, "pixel_data_mismatch", detail)


def _parse(data: bytes, start: int, transfer_syntax: UID) -> tuple[Dataset, PixelDataElement | None]:
    """The data set that starts at ``start`` of ``data`` (after the File Meta Information
    the node wrote itself), parsed up to the pixel data, and the pixel data element (its
    length as far as ``data`` holds it). pydicom's ``read_dataset`` reads the data set
    alone: ``dcmread`` would also parse back the file meta the node has just built and
    wrap both in a ``FileDataset``, which took as long again."""
    if not transfer_syntax.is_deflated:
        stream = io.BytesIO(data)
        stream.seek(start)
        dataset = read_dataset(
            stream, transfer_syntax.is_implicit_VR, transfer_syntax.is_little_endian, stop_when=_at_pixel_data
        )
        pixels = pixel_data_element(data, stream.tell(), transfer_syntax)
        if pixels is not None and pixels.offset is not None:
            return dataset, dataclasses.replace(pixels, length=min(pixels.length, len(data) - pixels.offset))
        if pixels is not None or stream.tell() == len(data):
            return dataset, pixels
    # Deflated (pydicom inflates it into a buffer of its own), or encoded otherwise than its
    # transfer syntax says (pydicom reads it anyway): parsed whole; where its pixels lie is not known.
    dataset = pydicom.dcmread(io.BytesIO(data))
    tag = next((tag for tag in PIXEL_TAGS if tag in dataset), None)
    return dataset, None if tag is None else PixelDataElement(tag, None, len(dataset[tag].value))


def _at_pixel_data(tag: BaseTag, vr: str | None, length: int) -> bool:
    return tag in PIXEL_TAGS


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    """One Explicit VR Little Endian element (PS3.5 7.1.2)."""
    if vr == b"OB":
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


def _padded(text: str, pad: bytes) -> bytes:
    raw = text.encode("ascii")
    return raw + pad * (len(raw) % 2)


def file_header(request: StoreRequest) -> bytes:
    """Preamble, "DICM" and the File Meta Information (PS3.10 7.1) that make the received
    data set a DICOM file. Encoded here directly: pydicom's FileMetaDataset path costs
    about 0.5 ms per instance, a tenth of the whole receive."""
    group = b"".join(
        (
            _element(0x0002_0001, b"OB", b"\x00\x01"),
            _element(0x0002_0002, b"UI", _padded(request.sop_class_uid, b"\0")),
            _element(0x0002_0003, b"UI", _padded(request.sop_instance_uid, b"\0")),
            _element(0x0002_0010, b"UI", _padded(request.transfer_syntax, b"\0")),
            _element(0x0002_0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\0")),
            _element(0x0002_0013, b"SH", _padded(IMPLEMENTATION_VERSION_NAME, b" ")),
            _element(0x0002_0016, b"AE", _padded(request.calling_ae, b" ")),
        )
    )
    return b"\0" * 128 + b"DICM" + _element(0x0002_0000, b"UL", struct.pack("<I", len(group))) + group


def _store(request: StoreRequest, storage: Storage) -> None:
    """Check, store and journal one instance; raise :class:`Refusal` on any problem."""
    spool, journal, limits = storage.spool, storage.journal, storage.limits
    bad = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    try:
        header = file_header(request)
        data = header + request.dataset
        dataset, pixels = _parse(data, len(header), request.transfer_syntax)
        if "SOPClassUID" not in dataset and "SOPInstanceUID" not in dataset:
            raise Refusal(StoreStatus.CANNOT_UNDERSTAND, "undecodable", "not a DICOM data set")
        values = header_values(dataset)
        study_uid = str(values.get("StudyInstanceUID", ""))
        series_uid = str(values.get("SeriesInstanceUID", ""))
        if study_uid:
            follow(study_uid)  # this instance's records, its refusal's included, carry the study's trace id
        check_pixel_module(values, pixels, request.transfer_syntax.is_encapsulated, limits.max_instance_bytes)
        entry = journal_entry(values, dataset, pixels, request.transfer_syntax)
    except Refusal:
        raise
    except Exception as e:
        raise Refusal(StoreStatus.CANNOT_UNDERSTAND, "undecodable", f"cannot decode the data set: {e}") from e
    sop_uid = request.sop_instance_uid
    bad_uids = [n for n, u in (("Study", study_uid), ("Series", series_uid), ("SOP", sop_uid)) if not is_valid_uid(u)]
    if bad_uids:
        raise Refusal(bad, "invalid_uid", f"missing or invalid {'/'.join(bad_uids)} Instance UID")
    if spool.free_bytes() < limits.min_free_bytes:
        raise Refusal(StoreStatus.OUT_OF_RESOURCES, "out_of_resources", "spool below its free-space floor")
    if journal.queued_jobs() >= limits.max_queued_jobs:
        raise Refusal(StoreStatus.OUT_OF_RESOURCES, "queue_full", "job queue at its cap")
    received_at = time.time()
    with storage.receiving.hold(sop_uid):
        known = journal.instance(sop_uid)
        # The same instance again is a no-op, unless a crash before the flush lost its file.
        lost = known is not None and not _intact(Path(known.path), known.size)
        if known is not None and not lost:
            _check_resend(known, data)
            return
        try:
            path = spool.store(study_uid, series_uid, sop_uid, data)
            record = InstanceRecord(
                sop_instance_uid=sop_uid,
                sop_class_uid=request.sop_class_uid,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                path=str(path),
                size=len(data),
                calling_ae=request.calling_ae,
                received_at=received_at,
                attributes=entry,
            )
            journal.record_instance(record, replace=lost)
            storage.group_sync.sync()  # file, directory entry and journal row: on disk before success
            log.debug("C-STORE from %s: instance stored (%d bytes)", request.calling_ae, len(data))
        except OSError as e:
            raise Refusal(StoreStatus.OUT_OF_RESOURCES, "storage_error", f"cannot store: {e}") from e


def _check_resend(known: InstanceRecord, data: bytes) -> None:
    """A SOP Instance UID already stored: return (answer success, store nothing, start no
    re-run) when ``data`` holds the same instance in any transfer syntax; refuse it when
    its content differs or cannot be compared."""
    uid = known.sop_instance_uid
    bad = StoreStatus.DATASET_DOES_NOT_MATCH_SOP_CLASS
    try:
        same = same_instance(Path(known.path), data)
    except Exception as e:
        raise Refusal(
            bad, "duplicate_conflict", f"{uid} already received; cannot compare the re-sent content: {e}"
        ) from e
    if not same:
        raise Refusal(bad, "duplicate_conflict", f"{uid} already received with different content")


def _intact(path: Path, size: int) -> bool:
    try:
        return path.stat().st_size == size
    except OSError:
        return False


def _check_context(request: StoreRequest) -> None:
    """The SOP class must be the one negotiated for the presentation context it came on."""
    if request.sop_class_uid != request.abstract_syntax:
        raise Refusal(
            StoreStatus.SOP_CLASS_NOT_SUPPORTED,
            "sop_class_mismatch",
            f"SOP class {request.sop_class_uid} sent on the presentation context for {request.abstract_syntax}",
        )


def _is_full(error: Exception) -> bool:
    """Disk or journal full: the same errors a later try, with space freed, gets past."""
    if isinstance(error, OSError):
        return error.errno in (errno.ENOSPC, errno.EDQUOT)
    code = getattr(error, "sqlite_errorcode", None)  # set by SQLite on the errors it raises
    return isinstance(error, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL


class Attempt:
    """Runs a C-STORE handler body and turns whatever it raises into a named status, as
    pynetdicom's ``service_class.attempt`` does: a :class:`Refusal` keeps its own (and
    its bytes are quarantined unless the sender will retry), disk or journal full is
    OUT_OF_RESOURCES, anything else PROCESSING_FAILURE. Each is one log line, counted."""

    def __init__(self, request: StoreRequest, storage: Storage) -> None:
        self.request, self.storage = request, storage
        self.status = StoreStatus.SUCCESS

    def __enter__(self) -> "Attempt":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> bool:
        if error is None or not isinstance(error, Exception):
            return False
        refused = isinstance(error, Refusal)
        refusal = error if isinstance(error, Refusal) else self._failure(error)
        self.status = refusal.status
        self.storage.metrics.instances_rejected.labels(refusal.reason).inc()
        detail = printable(refusal.detail)  # it may quote the data set's values, control characters included
        kept = ""
        if refusal.status not in (StoreStatus.OUT_OF_RESOURCES, StoreStatus.PROCESSING_FAILURE):
            kept = self._quarantine(refusal.reason, detail)  # the sender keeps the others and retries
        log.error("C-STORE from %s %s (%s): %s%s", self.request.calling_ae, "refused" if refused else "failed",
                  refusal.reason, detail, kept)  # fmt: skip
        return True

    @staticmethod
    def _failure(error: Exception) -> Refusal:
        detail = f"{type(error).__name__}: {error}"
        log.debug("C-STORE handler failed", exc_info=error)
        if _is_full(error):
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "storage_full", detail)
        if isinstance(error, JournalUnavailable):  # nothing committed; the sender tries again later
            return Refusal(StoreStatus.OUT_OF_RESOURCES, "journal_unavailable", detail)
        return Refusal(StoreStatus.PROCESSING_FAILURE, "processing_failure", detail)

    def _quarantine(self, reason: str, detail: str) -> str:
        """Keep the refused bytes; what the refusal's log line says about where they are."""
        request = self.request
        try:
            kept = self.storage.quarantine.keep_bytes(
                request.dataset, reason, detail, request.calling_ae, request.sop_instance_uid
            )
        except OSError as e:
            return f"; not quarantined: {e}"
        return f"; kept as quarantine/{reason}/{kept.name}"


def handle_store(request: StoreRequest, storage: Storage) -> int:
    """Store one instance durably, journal it, and only then answer success. Never
    raises: every failure is a named status (:class:`Attempt`)."""
    start = time.perf_counter()
    with log_context(), Attempt(request, storage) as attempt:  # the scope of the instance's trace id
        _check_context(request)
        _store(request, storage)
        storage.metrics.instances_received.labels(request.calling_ae).inc()
        storage.metrics.stage_seconds.labels("receive", "").observe(time.perf_counter() - start)
    return int(attempt.status)


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext:
    """The listener's TLS: its certificate, and client certificates checked against ``ca``."""
    if tls.cert is None:
        raise ValueError("node.tls: a TLS listener needs a certificate (cert, and key unless the cert file holds it)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.cert, tls.key)
    if tls.ca is not None:
        context.load_verify_locations(tls.ca)
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


def start_servers(settings: NodeSection, storage: Storage) -> list[AssociationServer]:
    """Start listening in the background: on ``port`` (TLS when a certificate is
    configured) and, if set, a plain listener on ``plain_port``. Returns the servers."""
    services = Services(
        store=functools.partial(handle_store, storage=storage),
        rejected=lambda reason: storage.metrics.associations_rejected.labels(reason).inc(),
        aborted=lambda reason: storage.metrics.associations_aborted.labels(reason).inc(),
        max_data_set_bytes=storage.limits.max_instance_bytes,
    )
    listeners = [(settings.port, server_ssl_context(settings.tls) if settings.tls.cert else None)]
    if settings.tls.cert and settings.plain_port is not None:
        listeners.append((settings.plain_port, None))
    servers = []
    for port, ssl_context in listeners:
        server = AssociationServer((settings.host, port), settings, services, ssl_context)
        server.start()
        log.info(
            "DICOM node %s listening on %s:%d%s",
            settings.ae_title,
            settings.host,
            server.server_address[1],
            " (TLS)" if ssl_context else "",
        )
        servers.append(server)
    return servers
