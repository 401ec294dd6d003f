"""The DICOM upper layer as an association acceptor (PS3.8): one thread per connection
reads PDUs with blocking calls and answers C-ECHO and C-STORE (PS3.7 9.3).

Why not pynetdicom's server: its association and DUL threads poll their queues with
1 ms sleeps and pass every PDU through a state machine and event queues. On one
association that caps receiving at about 200 instances/s, a fifth of dcmtk's storescp
(``benchmarks/README.md``). Here a PDU is read, its fragments kept as views, and the
service called in the same thread. pynetdicom still does what is off that hot path:
decoding A-ASSOCIATE-RQ, negotiating presentation contexts and roles, encoding
A-ASSOCIATE-AC.
"""

import contextlib
import logging
import socket
import socketserver
import ssl
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pydicom.uid import UID
from pynetdicom import ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, build_context, negotiate_as_acceptor
from pynetdicom.sop_class import Verification

from plugin.config import NodeSection
from plugin.logs import log_context

log = logging.getLogger(__name__)

# PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ_PDU, P_DATA_TF_PDU, A_RELEASE_RQ_PDU, A_ABORT_PDU = 0x01, 0x04, 0x05, 0x07
# The largest PDU this node accepts, and the P-DATA-TF length it asks peers to keep to.
MAXIMUM_PDU_LENGTH = 1 << 20
NETWORK_TIMEOUT = 60.0  # seconds without a byte from the peer before the association is aborted

# DIMSE (PS3.7 Annex E): command elements this node reads or writes, and their values.
AFFECTED_SOP_CLASS_UID, COMMAND_FIELD, MESSAGE_ID = 0x0000_0002, 0x0000_0100, 0x0000_0110
MESSAGE_ID_BEING_RESPONDED_TO, COMMAND_DATA_SET_TYPE = 0x0000_0120, 0x0000_0800
STATUS, AFFECTED_SOP_INSTANCE_UID = 0x0000_0900, 0x0000_1000
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATA_SET = 0x0101
UNRECOGNIZED_OPERATION = 0x0211

# This node's implementation (PS3.7 D.3.3.2), in the A-ASSOCIATE-AC and in every file
# meta it writes: a UUID-derived UID (2.25, PS3.5 B.2), uuid5(NAMESPACE_URL, "radpipe
# implementation class"), since radpipe has no registered root of its own.
IMPLEMENTATION_CLASS_UID = "2.25.178570306506704017692494229498818768660"
IMPLEMENTATION_VERSION_NAME = "RADPIPE"

SUPPORTED_CONTEXTS: list[PresentationContext] = [build_context(Verification)] + [
    build_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES) for context in AllStoragePresentationContexts
]


@dataclass(frozen=True)
class StoreRequest:
    """One C-STORE: its command's UIDs and the data set exactly as received."""

    calling_ae: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    dataset: bytes


@dataclass(frozen=True)
class Services:
    """What the acceptor calls: ``store`` answers a C-STORE with a status; ``rejected``
    hears why an association was refused (``called_ae_mismatch``, ...). A data set larger
    than ``max_data_set_bytes`` aborts its association before it can exhaust memory."""

    store: Callable[[StoreRequest], int]
    rejected: Callable[[str], None]
    max_data_set_bytes: int


class ProtocolError(Exception):
    """The peer broke PS3.8; the association is aborted."""


def _recv_exact(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        count = sock.recv_into(view[received:], size - received)
        if not count:
            raise ConnectionError("connection closed by the peer")
        received += count
    return buffer


def read_pdu(sock: socket.socket) -> tuple[int, bytearray]:
    """The next PDU's type and its body (the bytes after the 6-byte header)."""
    kind, _, length = struct.unpack(">BBI", _recv_exact(sock, 6))
    if length > MAXIMUM_PDU_LENGTH + 64:
        raise ProtocolError(f"PDU of {length} bytes; at most {MAXIMUM_PDU_LENGTH} were agreed")
    return kind, _recv_exact(sock, length)


def _pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def abort_pdu(reason: int) -> bytes:
    """A-ABORT from the service provider (source 2) with ``reason`` (PS3.8 9.3.8)."""
    return _pdu(A_ABORT_PDU, bytes([0, 0, 2, reason]))


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    return _pdu(0x03, bytes([0, result, source, reason]))


RELEASE_RP = _pdu(0x06, bytes(4))


def parse_command(data: bytes) -> dict[int, bytes]:
    """A command set (always Implicit VR Little Endian) as ``{tag: raw value}``."""
    fields, offset = {}, 0
    while offset + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        fields[(group << 16) | element] = data[offset : offset + length]
        offset += length
    return fields


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def encode_command(elements: dict[int, bytes]) -> bytes:
    """Encode a command set, with its Command Group Length first."""
    body = b"".join(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(v)) + v for tag, v in sorted(elements.items()))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def response(request: dict[int, bytes], status: int) -> bytes:
    """The response command to ``request``: same SOP class and instance, ``status``."""
    elements = {
        COMMAND_FIELD: _us(struct.unpack("<H", request[COMMAND_FIELD])[0] | 0x8000),
        MESSAGE_ID_BEING_RESPONDED_TO: request[MESSAGE_ID],
        COMMAND_DATA_SET_TYPE: _us(NO_DATA_SET),
        STATUS: _us(status),
    }
    for tag in (AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID):
        if tag in request:
            elements[tag] = request[tag]
    return encode_command(elements)


def _text(value: bytes) -> str:
    return value.decode("ascii", "replace").rstrip("\0 ")


class Association:
    """One accepted association: P-DATA-TF in, DIMSE messages out to the services."""

    def __init__(self, sock: socket.socket, calling_ae: str, contexts: dict[int, PresentationContext]) -> None:
        self.sock, self.calling_ae, self.contexts = sock, calling_ae, contexts

    def run(self, services: Services) -> None:
        command: list[memoryview] = []
        dataset: list[memoryview] = []
        received = 0  # bytes of the data set so far
        request: dict[int, bytes] | None = None
        while True:
            kind, body = read_pdu(self.sock)
            if kind == A_RELEASE_RQ_PDU:
                self.sock.sendall(RELEASE_RP)
                return
            if kind == A_ABORT_PDU:
                log.info("association aborted by %s", self.calling_ae)
                return
            if kind != P_DATA_TF_PDU:
                raise ProtocolError(f"unexpected PDU type 0x{kind:02X} during the association")
            view, offset = memoryview(body), 0
            while offset < len(body):
                length, context_id, control = struct.unpack_from(">IBB", body, offset)
                if length < 2 or offset + 4 + length > len(body):
                    raise ProtocolError("malformed presentation data value item")
                if context_id not in self.contexts:
                    raise ProtocolError(f"data on presentation context {context_id}, which was not accepted")
                fragment = view[offset + 6 : offset + 4 + length]
                offset += 4 + length
                is_command, is_last = bool(control & 0x01), bool(control & 0x02)
                if is_command:
                    if request is not None:
                        raise ProtocolError("a new command before the previous one's data set")
                    command.append(fragment)
                    if not is_last:
                        continue
                    request = parse_command(b"".join(command))
                    command.clear()
                    if COMMAND_FIELD not in request or MESSAGE_ID not in request:
                        raise ProtocolError("command set without Command Field or Message ID")
                    if request.get(COMMAND_DATA_SET_TYPE) != _us(NO_DATA_SET):
                        continue  # its data set follows
                    data = None
                else:
                    if request is None:
                        raise ProtocolError("a data set fragment without a command")
                    dataset.append(fragment)
                    received += len(fragment)
                    if received > services.max_data_set_bytes:
                        raise ProtocolError(f"a data set of more than {services.max_data_set_bytes} bytes")
                    if not is_last:
                        continue
                    data = b"".join(dataset)
                    dataset.clear()
                    received = 0
                self._answer(context_id, request, data, services)
                request = None

    def _answer(self, context_id: int, request: dict[int, bytes], data: bytes | None, services: Services) -> None:
        field = struct.unpack("<H", request[COMMAND_FIELD])[0]
        if field == C_CANCEL_RQ:
            return  # nothing here runs long enough to cancel; C-CANCEL has no response
        if field == C_ECHO_RQ:
            status = 0x0000
        elif field == C_STORE_RQ and data is not None and AFFECTED_SOP_INSTANCE_UID in request:
            status = services.store(
                StoreRequest(
                    calling_ae=self.calling_ae,
                    sop_class_uid=_text(request.get(AFFECTED_SOP_CLASS_UID, b"")),
                    sop_instance_uid=_text(request[AFFECTED_SOP_INSTANCE_UID]),
                    transfer_syntax=UID(self.contexts[context_id].transfer_syntax[0]),
                    dataset=data,
                )
            )
        else:
            status = UNRECOGNIZED_OPERATION
        message = response(request, status)
        self.sock.sendall(_pdu(P_DATA_TF_PDU, struct.pack(">IBB", len(message) + 2, context_id, 0x03) + message))


class AssociationHandler(socketserver.BaseRequestHandler):
    server: "AssociationServer"

    def handle(self) -> None:
        with log_context(f"assoc-{threading.get_native_id()}"):
            connection: socket.socket = self.request
            connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # responses go out at once
            connection.settimeout(NETWORK_TIMEOUT)
            self.server.track(connection)
            sock = connection
            try:
                if self.server.ssl_context is not None:
                    sock = self.server.ssl_context.wrap_socket(connection, server_side=True)
                association = self._accept(sock)
                if association is not None:
                    association.run(self.server.services)
            except ProtocolError as e:
                log.warning("aborting the association from %s: %s", self.client_address[0], e)
                self._send_quietly(sock, abort_pdu(0x02))  # unexpected PDU / parameter
            except OSError as e:  # a failed TLS handshake, a reset, a timeout, a close
                log.info("connection from %s ended: %s", self.client_address[0], e)
            finally:
                self.server.untrack(connection)

    @staticmethod
    def _send_quietly(sock: socket.socket, data: bytes) -> None:
        with contextlib.suppress(OSError):
            sock.sendall(data)

    def _accept(self, sock: socket.socket) -> Association | None:
        """Read the A-ASSOCIATE-RQ and accept or reject it (PS3.8 7.1)."""
        kind, body = read_pdu(sock)
        if kind != A_ASSOCIATE_RQ_PDU:
            raise ProtocolError(f"expected A-ASSOCIATE-RQ, got PDU type 0x{kind:02X}")
        pdu = A_ASSOCIATE_RQ()
        try:
            pdu.decode(bytes(_pdu(kind, body)))
            request = pdu.to_primitive()
        except Exception as e:
            raise ProtocolError(f"undecodable A-ASSOCIATE-RQ: {e}") from e
        settings = self.server.settings
        calling, called = str(request.calling_ae_title), str(request.called_ae_title)
        reasons = [
            (called != settings.ae_title, "called_ae_mismatch", (1, 1, 7)),
            (bool(settings.allowed_calling_aets) and calling not in settings.allowed_calling_aets,
             "calling_ae_not_allowed", (1, 1, 3)),
            (self.server.active() > settings.max_associations, "too_many_associations", (2, 3, 2)),
        ]  # fmt: skip
        refusal = next(((reason, rsd) for failed, reason, rsd in reasons if failed), None)
        if refusal is not None:
            reason, rsd = refusal
            log.warning("association from %s (%s) rejected: %s", self.client_address[0], calling, reason)
            self.server.services.rejected(reason)
            sock.sendall(reject_pdu(*rsd))
            return None

        items = request.user_information
        roles = {
            item.sop_class_uid: (item.scu_role, item.scp_role)
            for item in items
            if isinstance(item, SCP_SCU_RoleSelectionNegotiation)
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
        accept.calling_ae_title = calling
        accept.called_ae_title = called
        accept.result, accept.result_source = 0x00, 0x01
        accept.presentation_context_definition_results_list = results
        accept.user_information = [maximum, implementation, version, *role_replies]
        reply = A_ASSOCIATE_AC()
        reply.from_primitive(accept)
        sock.sendall(reply.encode())
        accepted = {int(cx.context_id): cx for cx in results if cx.result == 0x00 and cx.context_id is not None}
        log.info("association from %s (%s) accepted, %d presentation context(s)", self.client_address[0], calling,
                 len(accepted))  # fmt: skip
        return Association(sock, calling, accepted)


class AssociationServer(socketserver.ThreadingTCPServer):
    """One listening port; each connection is served in its own thread."""

    allow_reuse_address = True
    daemon_threads = False
    block_on_close = True  # server_close() joins the association threads

    def __init__(
        self, address: tuple[str, int], settings: NodeSection, services: Services, ssl_context: ssl.SSLContext | None
    ) -> None:
        super().__init__(address, AssociationHandler)
        self.settings, self.services, self.ssl_context = settings, services, ssl_context
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"dicom-listener-{self.server_address[1]}", daemon=True
        )

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(sock)

    def active(self) -> int:
        with self._lock:
            return len(self._sockets)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Stop accepting, end every open association (an instance being stored finishes
        first: its thread only notices at its next read) and wait for their threads."""
        self.shutdown()
        with self._lock:
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        self.server_close()
        self._thread.join()
