"""The storage SCU: associations to one destination, bounded by timeouts, each carrying
several C-STOREs. Which results to send, and what a failure means for them, is the
dispatcher's policy (``dispatch.py``)."""

import contextlib
import socket
import ssl
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.status import code_to_category
from pynetdicom.transport import AssociationSocket

from plugin.config import Destination, TLSConfig

# An association request carries at most 128 presentation contexts (odd IDs 1..255).
MAX_CONTEXTS = 128


def _shutdown_socket(self: AssociationSocket) -> None:
    """pynetdicom 3.0.4 (pinned) skips ``close()`` when ``shutdown()`` raises, which it
    does whenever the peer has gone already or the connection never came up: every failed
    try to a dead or refusing destination dropped an open socket. Close it regardless."""
    sock = self.socket
    if sock is None:
        return
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()


AssociationSocket._shutdown_socket = _shutdown_socket  # type: ignore[method-assign]


class DeliveryError(Exception):
    """The destination could not be reached, or did not answer success, or the file
    cannot be sent. ``permanent``: the destination's answer means that sending the same
    file again cannot succeed (the outbox dead-letters it at once instead of retrying)."""

    def __init__(self, message: str, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class Timeouts:
    """Seconds that bound each step of a try: the TCP connection, the answer to the
    association request and release (ACSE), the answer to each C-STORE (DIMSE), and
    silence on an open association (network)."""

    connect: float
    acse: float
    dimse: float
    network: float


@dataclass(frozen=True)
class DicomFile:
    """A file to send, with what its presentation context needs (from its file meta)."""

    path: Path
    sop_class_uid: UID
    transfer_syntax_uid: UID
    sop_instance_uid: str

    @classmethod
    def read(cls, path: Path) -> "DicomFile":
        """Read the file meta only: the data set itself is read when it is sent."""
        try:
            meta = read_file_meta_info(path)
        except InvalidDicomError as e:
            raise DeliveryError(f"{path.name} is not a DICOM file: {e}") from e
        sop_class, syntax = meta.get("MediaStorageSOPClassUID"), meta.get("TransferSyntaxUID")
        sop_instance = meta.get("MediaStorageSOPInstanceUID")
        if not sop_class or not syntax or not sop_instance:
            raise DeliveryError(f"{path.name} names no SOP Class, SOP Instance or Transfer Syntax UID in its file meta")
        return cls(path, UID(sop_class), UID(syntax), str(sop_instance))


def client_ssl_context(tls: TLSConfig, check_hostname: bool = False) -> ssl.SSLContext:
    """TLS towards a destination: verify it against ``ca`` (system roots without one),
    and present ``cert``/``key`` when given (mutual TLS). DICOM peers are known by address
    and AE title, so their certificate's host name is checked only where asked (HTTPS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(tls.ca) if tls.ca else None)
    context.check_hostname = check_hostname
    if tls.cert is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context


class StoreAssociation:
    """An established association; releases it on leaving a ``with`` block."""

    def __init__(self, association: Association, peer: str, dimse_timeout: float) -> None:
        self._association = association
        self._peer = peer
        self._dimse_timeout = dimse_timeout

    @property
    def is_established(self) -> bool:
        return bool(self._association.is_established)

    def store(self, file: DicomFile) -> None:
        """Send one file; return only when the destination answered Success or Warning."""
        if not self.is_established:
            raise DeliveryError(f"{self._peer}: the association was lost")
        if all(cx.abstract_syntax != file.sop_class_uid for cx in self._association.accepted_contexts):
            raise DeliveryError(f"{self._peer} accepted no presentation context for {file.sop_class_uid.name}")
        self._pause_reactor()
        status = self._association.send_c_store(file.path)
        if "Status" not in status:
            raise DeliveryError(f"{self._peer}: no answer to the C-STORE within {self._dimse_timeout:g} s, or aborted")
        if code_to_category(status.Status) not in ("Success", "Warning"):
            raise DeliveryError(f"C-STORE answered 0x{status.Status:04X}")

    def _pause_reactor(self) -> None:
        """Stop the association's reactor thread at its checkpoint before a send.

        pynetdicom 3.0.4 (pinned) has a race here: ``send_c_store`` pauses the reactor so
        that it does not take the response off the queue, but only waits for a flag that
        the reactor raises before its checkpoint and lowers after it. A reactor past the
        checkpoint with the flag still up reads the queue once more, takes the response
        ("Received unexpected C-STORE service message"), and the send waits out the DIMSE
        timeout and aborts (2 in 4,500 SR sends to storescp). So: close the checkpoint and
        wait until the reactor is blocked on it (the only thread that waits on it), or has
        ended; ``send_c_store`` opens it once the response is in."""
        association = self._association
        association._reactor_checkpoint.clear()
        waiting = association._reactor_checkpoint._cond._waiters  # type: ignore[attr-defined]
        while not waiting and association.is_alive():
            time.sleep(0.0001)

    def __enter__(self) -> "StoreAssociation":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if self.is_established:
            self._association.release()


class StoreSCU:
    """Opens associations to one destination, with the configured timeouts and TLS."""

    def __init__(self, destination: Destination, calling_ae: str, timeouts: Timeouts) -> None:
        if destination.ae_title is None or destination.host is None or destination.port is None:
            raise ValueError("a C-STORE destination needs ae_title, host and port")
        self.ae_title, self.host, self.port = destination.ae_title, destination.host, destination.port
        self.destination = destination
        self.timeouts = timeouts
        self._ae = AE(ae_title=calling_ae)
        self._ae.connection_timeout = timeouts.connect
        self._ae.acse_timeout = timeouts.acse
        self._ae.dimse_timeout = timeouts.dimse
        self._ae.network_timeout = timeouts.network

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"

    def associate(self, files: Sequence[DicomFile]) -> StoreAssociation:
        """An association offering one presentation context per SOP class and transfer
        syntax among ``files`` (at most ``MAX_CONTEXTS`` of them)."""
        pairs = sorted({(f.sop_class_uid, f.transfer_syntax_uid) for f in files})
        if len(pairs) > MAX_CONTEXTS:
            raise ValueError(f"{len(pairs)} presentation contexts asked for; one association carries {MAX_CONTEXTS}")
        tls = self.destination.tls  # a context per association picks up renewed certificate files
        connected: list[evt.Event] = []

        def on_connected(event: evt.Event) -> None:
            # Each C-STORE request goes out at once, not after the delayed ACK of the last
            # response (about 40 ms a send on loopback without it).
            event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # type: ignore[union-attr]
            connected.append(event)

        association = self._ae.associate(
            self.host,
            self.port,
            contexts=[build_context(sop_class, [syntax]) for sop_class, syntax in pairs],
            ae_title=self.ae_title,
            tls_args=(client_ssl_context(tls), self.host) if tls is not None else None,
            evt_handlers=[(evt.EVT_CONN_OPEN, on_connected)],
        )
        if association.is_established:
            return StoreAssociation(association, str(self), self.timeouts.dimse)
        answer = association.acceptor.primitive
        if association.is_rejected and answer is not None:
            why = f"rejected the association ({answer.reason_str})"
        elif connected:
            why = f"accepted TCP but not the association (aborted, or no answer within {self.timeouts.acse:g} s)"
        else:
            why = f"cannot be reached (refused, or no connection within {self.timeouts.connect:g} s)"
        raise DeliveryError(f"{self}: {why}")
