"""The DICOM upper layer as an association acceptor (PS3.8): one thread per connection
reads PDUs with blocking calls and answers C-ECHO and C-STORE (PS3.7 9.3).

Why not pynetdicom's server: its association and DUL threads poll their queues with
1 ms sleeps and pass every PDU through a state machine and event queues. On one
association that caps receiving at about 200 instances/s, a fifth of dcmtk's storescp
(``benchmarks/README.md``). Here a PDU is read, its fragments kept as views, and the
service called in the same thread. pynetdicom still does what is off that hot path:
decoding A-ASSOCIATE-RQ, negotiating presentation contexts and roles, encoding
A-ASSOCIATE-AC. Bytes are framed and decoded in ``pdu``; this module is the lifecycle:
limits, timers, TLS, and stopping within a deadline.

How each connection ends, in one log line:
- ARTIM (``node.artim_seconds``, PS3.8 9.1.5): the TLS handshake and the whole
  A-ASSOCIATE-RQ must arrive within it, or the connection is closed. After this node
  sends A-ASSOCIATE-RJ, A-RELEASE-RP or A-ABORT it waits as long for the peer to close.
- ``node.network_timeout_seconds`` of silence inside an association: A-ABORT.
- Malformed or unexpected bytes: A-ABORT (``pdu.ProtocolError``).
- ``node.max_associations`` is counted when a connection is accepted, before any
  thread starts: one more is answered A-ASSOCIATE-RJ (transient, local limit exceeded)
  by the one refusing thread; with that thread busy too, it is closed at once.
Each end other than a release is counted in ``radpipe_associations_aborted_total``.
"""

import contextlib
import itertools
import logging
import socket
import socketserver
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor

from plugin.config import NodeSection
from plugin.logs import log_context
from plugin.pdu import (
    A_ABORT_PDU,
    A_ASSOCIATE_RQ_PDU,
    A_RELEASE_RQ_PDU,
    ABORT_NOT_SPECIFIED,
    ABORT_UNEXPECTED_PDU,
    AFFECTED_SOP_CLASS_UID,
    AFFECTED_SOP_INSTANCE_UID,
    C_CANCEL_RQ,
    C_ECHO_RQ,
    C_STORE_RQ,
    MAXIMUM_PDU_LENGTH,
    P_DATA_TF_PDU,
    RELEASE_RP,
    Command,
    PeerClosed,
    ProtocolError,
    abort_pdu,
    decode_associate_rq,
    decode_command,
    p_data_tf,
    pdv_items,
    peer_bytes,
    read_pdu,
    reject_pdu,
    response,
)

log = logging.getLogger(__name__)

UNRECOGNIZED_OPERATION = 0x0211  # DIMSE status (PS3.7 C.4): a service this node does not provide

# This node's implementation (PS3.7 D.3.3.2), in the A-ASSOCIATE-AC and in every file
# meta it writes: a UUID-derived UID (2.25, PS3.5 B.2), uuid5(NAMESPACE_URL, "radpipe
# implementation class"), since radpipe has no registered root of its own.
IMPLEMENTATION_CLASS_UID = "2.25.178570306506704017692494229498818768660"
IMPLEMENTATION_VERSION_NAME = "RADPIPE"

VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP Class (PS3.4 A.4), for C-ECHO
# Every storage SOP class: pynetdicom's, and the retired and trial ones under the storage
# root that it leaves out but older modalities still send (Ultrasound Image Storage
# (Retired), Nuclear Medicine Image Storage (Retired), ...), from pydicom's UID dictionary.
_STORAGE_ROOT = "1.2.840.10008.5.1.4.1.1."
STORAGE_SOP_CLASSES = sorted(
    {str(context.abstract_syntax) for context in AllStoragePresentationContexts}
    | {uid for uid, (_, kind, *_) in UID_dictionary.items() if kind == "SOP Class" and uid.startswith(_STORAGE_ROOT)}
)
SUPPORTED_CONTEXTS: list[PresentationContext] = [build_context(VERIFICATION)] + [
    build_context(uid, ALL_TRANSFER_SYNTAXES) for uid in STORAGE_SOP_CLASSES
]
# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4.
REJECTIONS = {
    "called_ae_mismatch": (1, 1, 7),  # permanent, service user: called AE title not recognized
    "calling_ae_not_allowed": (1, 1, 3),  # permanent, service user: calling AE title not recognized
    "too_many_associations": (2, 3, 2),  # transient, service provider (presentation): local limit exceeded
}


@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE: its command's UIDs, the abstract syntax of the presentation context
    it came on, and the data set exactly as received."""

    calling_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    abstract_syntax: str
    transfer_syntax: UID
    dataset: bytes


@dataclass(frozen=True)
class Services:
    """What the acceptor calls: ``store`` answers a C-STORE with a status (it must not
    raise); ``rejected`` hears why an association was refused (``called_ae_mismatch``,
    ...) and ``aborted`` why one ended without a release (``malformed_pdu``, ...). A data
    set larger than ``max_data_set_bytes`` aborts its association before it can exhaust
    memory."""

    store: Callable[[StoreRequest], int]
    rejected: Callable[[str], None]
    aborted: Callable[[str], None]
    max_data_set_bytes: int


class Association:
    """One accepted association: P-DATA-TF in, DIMSE messages out to the services."""

    def __init__(
        self, sock: socket.socket, calling_ae: str, contexts: dict[int, PresentationContext], services: Services
    ) -> None:
        self.sock, self.calling_ae, self.contexts, self.services = sock, calling_ae, contexts, services
        self._command: list[memoryview] = []  # fragments of the command being received
        self._dataset: list[memoryview] = []  # fragments of its data set
        self._received = 0  # bytes of the data set so far
        self._request: Command | None = None  # a complete command whose data set is pending
        self._request_context = 0

    def run(self) -> str:
        """Serve until the peer releases or aborts; returns which ("released", "peer_aborted")."""
        while True:
            kind, body = read_pdu(self.sock)
            if kind == P_DATA_TF_PDU:
                for context_id, control, fragment in pdv_items(body):
                    self._receive(context_id, control, fragment)
            elif kind == A_RELEASE_RQ_PDU:
                if self._command or self._request is not None:
                    raise ProtocolError("unexpected_pdu", "A-RELEASE-RQ inside a message", ABORT_UNEXPECTED_PDU)
                self.sock.sendall(RELEASE_RP)
                return "released"
            elif kind == A_ABORT_PDU:
                return "peer_aborted"
            else:
                raise ProtocolError("unexpected_pdu", f"PDU type 0x{kind:02X} in an association", ABORT_UNEXPECTED_PDU)

    def _receive(self, context_id: int, control: int, fragment: memoryview) -> None:
        """Add one PDV fragment (PS3.8 E.2); answer once a message is complete."""
        if context_id not in self.contexts:
            raise ProtocolError("malformed_pdu", f"data on presentation context {context_id}, not accepted")
        is_command, is_last = bool(control & 0x01), bool(control & 0x02)
        if is_command:
            if self._request is not None:
                raise ProtocolError("unexpected_pdu", "a new command before the previous one's data set")
            self._command.append(fragment)
            if not is_last:
                return
            request = decode_command(b"".join(self._command))
            self._command.clear()
            if request.has_data_set:
                self._request, self._request_context = request, context_id  # its data set follows
                return
            self._answer(context_id, request, None)
            return
        if self._request is None:
            raise ProtocolError("unexpected_pdu", "a data set fragment without a complete command")
        if context_id != self._request_context:
            raise ProtocolError("malformed_pdu", "a data set on another presentation context than its command")
        self._dataset.append(fragment)
        self._received += len(fragment)
        if self._received > self.services.max_data_set_bytes:
            raise ProtocolError("too_large", f"a data set of more than {self.services.max_data_set_bytes} bytes")
        if not is_last:
            return
        request, data = self._request, b"".join(self._dataset)
        self._request, self._received = None, 0
        self._dataset.clear()
        self._answer(context_id, request, data)

    def _answer(self, context_id: int, request: Command, data: bytes | None) -> None:
        if request.is_response:
            log.debug("ignoring a DIMSE response (0x%04X): this node sends no requests", request.field)
            return
        if request.field == C_CANCEL_RQ:
            return  # nothing here runs long enough to cancel; C-CANCEL has no response
        if request.field == C_ECHO_RQ:
            status = 0x0000
        elif request.field == C_STORE_RQ:
            sop_class, sop_instance = request.text(AFFECTED_SOP_CLASS_UID), request.text(AFFECTED_SOP_INSTANCE_UID)
            if data is None or not sop_class or not sop_instance:
                raise ProtocolError("malformed_pdu", "C-STORE-RQ without its SOP Class/Instance UID or data set")
            context = self.contexts[context_id]
            status = self.services.store(
                StoreRequest(
                    calling_ae=self.calling_ae,
                    sop_class_uid=sop_class,
                    sop_instance_uid=sop_instance,
                    abstract_syntax=str(context.abstract_syntax),
                    transfer_syntax=UID(context.transfer_syntax[0]),
                    dataset=data,
                )
            )
        else:
            status = UNRECOGNIZED_OPERATION
        self.sock.sendall(p_data_tf(context_id, response(request, status)))


def _shut_down(sock: socket.socket) -> None:
    """End the connection under whatever thread is reading or writing it: at the socket
    level, also under TLS (``SSLSocket.shutdown`` would touch its SSL object too)."""
    with contextlib.suppress(OSError):
        socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _close_quietly(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.close()


class AssociationServer(socketserver.TCPServer):
    """One listening port; each admitted connection is served in its own thread."""

    allow_reuse_address = True

    def __init__(
        self, address: tuple[str, int], settings: NodeSection, services: Services, ssl_context: ssl.SSLContext | None
    ) -> None:
        super().__init__(address, socketserver.BaseRequestHandler)
        self.settings, self.services, self.ssl_context = settings, services, ssl_context
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()  # every open connection, as its thread uses it
        self._threads: set[threading.Thread] = set()
        self._admitted = 0  # connections counted against max_associations
        self._refusing = False  # the one refusing thread is busy
        self._closing = False
        self._serial = itertools.count(1)
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"dicom-listener-{self.server_address[1]}", daemon=True
        )

    # -- accepting (the listener thread) -----------------------------------------------------

    def process_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        """Admit, refuse or close a new connection, before any thread is started for it."""
        with self._lock:
            admit = not self._closing and self._admitted < self.settings.max_associations
            refuse = not self._closing and not admit and not self._refusing
            if admit:
                self._admitted += 1
            elif refuse:
                self._refusing = True
            if admit or refuse:
                name = f"dicom-{'association' if admit else 'refusal'}-{self.server_address[1]}-{next(self._serial)}"
                thread = threading.Thread(
                    target=self._serve, args=(request, client_address[0], admit), name=name, daemon=True
                )
                self._sockets.add(request)
                self._threads.add(thread)
        if not admit and not self._closing:
            self.services.rejected("too_many_associations")
        if not (admit or refuse):
            if not self._closing:
                log.warning("connection from %s closed at once: too many associations", client_address[0])
            _close_quietly(request)
            return
        try:
            thread.start()
        except RuntimeError as e:  # no thread to be had: as if it ended at once
            log.error("connection from %s closed: cannot start its thread: %s", client_address[0], e)
            self._forget(thread, request, request, admit)

    def handle_error(self, request: object, client_address: object) -> None:
        """A bug while admitting a connection: logged, not socketserver's print to stderr."""
        log.error("admitting the connection from %s failed", client_address, exc_info=True)

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        try:
            return super().get_request()
        except OSError as e:  # e.g. out of file descriptors: say so, and do not spin on it
            log.error("cannot accept a connection on port %d: %s", self.server_address[1], e.strerror or e)
            time.sleep(0.5)
            raise

    # -- one connection (its own thread) --------------------------------------------------------

    def _serve(self, connection: socket.socket, peer: str, admitted: bool) -> None:
        sock = connection
        association: Association | None = None
        ending: str | None = None  # the aborted_total reason, when it ends other than by a release
        with log_context(f"assoc-{threading.get_native_id()}"):
            try:
                deadline = time.monotonic() + self.settings.artim_seconds  # ARTIM: request in by then
                connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # responses go out at once
                if self.ssl_context is not None:
                    sock = self._wrap(self.ssl_context, connection)
                    sock.settimeout(max(0.001, deadline - time.monotonic()))
                    sock.do_handshake()  # within ARTIM too
                association = self._negotiate(sock, peer, deadline, admitted)
                if association is None:  # rejected
                    self._linger(sock)
                else:
                    sock.settimeout(self.settings.network_timeout_seconds)
                    if association.run() == "released":
                        log.info("association from %s (%s) released", peer, association.calling_ae)
                        self._linger(sock)
                    else:  # PS3.8 AA-3: close at once
                        ending = "peer_aborted"
                        log.info("association from %s (%s) aborted by the peer", peer, association.calling_ae)
            except ProtocolError as e:
                ending = e.reason
                log.warning("aborting the association from %s: %s", peer, e)
                self._abort(sock, e.abort_reason)
            except TimeoutError:
                if association is None:  # ARTIM (PS3.8 AA-2): close, nothing to abort yet
                    ending = "artim_expired"
                    log.warning("connection from %s closed: no A-ASSOCIATE-RQ within %g s (ARTIM)", peer,
                                self.settings.artim_seconds)  # fmt: skip
                else:
                    ending = "network_timeout"
                    log.warning("aborting the association from %s: nothing received for %g s", peer,
                                self.settings.network_timeout_seconds)  # fmt: skip
                    self._abort(sock, ABORT_NOT_SPECIFIED)
            except OSError as e:  # closed, reset, TLS refused; or this node stopping
                ending = self._ended(e, peer, established=association is not None)
            except Exception:  # a bug here, not the peer's doing: say where
                ending = "internal_error"
                log.error("aborting the association from %s: internal error", peer, exc_info=True)
                self._abort(sock, ABORT_NOT_SPECIFIED)
            finally:
                self._forget(threading.current_thread(), connection, sock, admitted)
            if ending is not None:
                self.services.aborted(ending)

    def _ended(self, error: OSError, peer: str, established: bool) -> str | None:
        """Log how a connection ended under this node; the aborted_total reason, if any."""
        if self._closing:
            log.info("connection from %s ended: the node is stopping", peer)
            return None
        if isinstance(error, ssl.SSLError):
            log.warning("connection from %s ended: TLS: %s", peer, error.reason or error)
            return "connection_lost" if established else "tls_handshake_failed"
        if isinstance(error, PeerClosed) and error.between_pdus and not established:
            log.debug("connection from %s closed before any request", peer)  # a port probe: nothing to count
            return None
        log.info("connection from %s ended: %s", peer, error.strerror or error)
        return "connection_lost"

    def _wrap(self, context: ssl.SSLContext, connection: socket.socket) -> ssl.SSLSocket:
        """The TLS socket, before its handshake. It replaces the plain one (which
        ``wrap_socket`` detaches) in what :meth:`stop` shuts down and what is closed."""
        sock = context.wrap_socket(connection, server_side=True, do_handshake_on_connect=False)
        with self._lock:
            self._sockets.discard(connection)
            self._sockets.add(sock)
            if self._closing:  # stop() came between: do what it did to the others
                _shut_down(sock)
        return sock

    def _negotiate(self, sock: socket.socket, peer: str, deadline: float, admitted: bool) -> Association | None:
        """Read the A-ASSOCIATE-RQ and accept or reject it (PS3.8 7.1)."""
        kind, body = read_pdu(sock, deadline)
        if kind != A_ASSOCIATE_RQ_PDU:
            raise ProtocolError("unexpected_pdu", f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}",
                                ABORT_UNEXPECTED_PDU)  # fmt: skip
        request = decode_associate_rq(body)
        with peer_bytes("A-ASSOCIATE-RQ"):
            calling, called = str(request.calling_ae_title), str(request.called_ae_title)
        settings = self.settings
        reasons = [
            (not admitted, "too_many_associations"),  # counted when it was accepted
            (called != settings.ae_title, "called_ae_mismatch"),
            (bool(settings.allowed_calling_aets) and calling not in settings.allowed_calling_aets,
             "calling_ae_not_allowed"),
        ]  # fmt: skip
        refusal = next((reason for failed, reason in reasons if failed), None)
        if refusal is not None:
            log.warning("association from %s (%s) rejected: %s", peer, calling, refusal)
            if admitted:
                self.services.rejected(refusal)
            sock.sendall(reject_pdu(*REJECTIONS[refusal]))
            return None
        with peer_bytes("A-ASSOCIATE-RQ"):
            reply, accepted = _acceptance(request)
        sock.sendall(reply)
        log.info("association from %s (%s) accepted, %d presentation context(s)", peer, calling, len(accepted))
        return Association(sock, calling, accepted, self.services)

    def _abort(self, sock: socket.socket, reason: int) -> None:
        """Send A-ABORT, then wait (ARTIM) for the peer to close (PS3.8 Sta13)."""
        try:
            sock.sendall(abort_pdu(reason))
        except OSError:
            return
        self._linger(sock)

    def _linger(self, sock: socket.socket) -> None:
        """After this node's last PDU, let the peer close first, within ARTIM; what it
        still sends is read and dropped, so closing never resets the connection."""
        deadline = time.monotonic() + self.settings.artim_seconds
        with contextlib.suppress(OSError):
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(65536):
                    return

    def _forget(self, thread: threading.Thread, connection: socket.socket, sock: socket.socket, admitted: bool) -> None:
        """Give back the connection's slot and close it (the plain socket too, under TLS)."""
        with self._lock:
            self._sockets.discard(connection)
            self._sockets.discard(sock)
            self._threads.discard(thread)
            if admitted:
                self._admitted -= 1
            else:
                self._refusing = False
        _close_quietly(sock)
        if sock is not connection:
            _close_quietly(connection)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float | None = None) -> None:
        """Stop accepting, end every open association and wait for their threads, all
        within ``timeout`` (default ``node.shutdown_seconds``). An instance being stored
        finishes first: its thread only notices at its next read or write."""
        deadline = time.monotonic() + (self.settings.shutdown_seconds if timeout is None else timeout)
        if self._thread.is_alive():
            self.shutdown()  # serve_forever returns within its 0.5 s poll
        self.server_close()
        with self._lock:
            self._closing = True
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            _shut_down(sock)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = [thread.name for thread in threads if thread.is_alive()]
        if stuck:
            log.warning("port %d stopped with %s still busy past the deadline", self.server_address[1], stuck)


def _acceptance(request: A_ASSOCIATE) -> tuple[bytes, dict[int, PresentationContext]]:
    """Negotiate ``request``'s presentation contexts and roles: the encoded
    A-ASSOCIATE-AC, and the accepted contexts by ID."""
    roles = {
        item.sop_class_uid: (item.scu_role, item.scp_role)
        for item in request.user_information
        if isinstance(item, SCP_SCU_RoleSelectionNegotiation) and item.sop_class_uid is not None
    }
    results, role_replies = negotiate_as_acceptor(
        request.presentation_context_definition_list, SUPPORTED_CONTEXTS, roles
    )
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = MAXIMUM_PDU_LENGTH
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    version = ImplementationVersionNameNotification()
    version.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    accept = A_ASSOCIATE()
    accept.application_context_name = request.application_context_name
    accept.calling_ae_title = request.calling_ae_title
    accept.called_ae_title = request.called_ae_title
    accept.result, accept.result_source = 0x00, 0x01
    accept.presentation_context_definition_results_list = results
    accept.user_information = [maximum, implementation, version, *role_replies]
    reply = A_ASSOCIATE_AC()
    reply.from_primitive(accept)
    accepted = {int(cx.context_id): cx for cx in results if cx.result == 0x00 and cx.context_id is not None}
    return reply.encode(), accepted
