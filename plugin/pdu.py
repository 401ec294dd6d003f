"""PS3.8 PDUs and PS3.7 command sets as bytes: framing, bounds-checked decoding, encoding.

Everything decoded here came from a peer and may be anything. Every decoder raises
:class:`ProtocolError` on malformed input, never ``struct.error`` or ``IndexError``, so
the acceptor has one thing to catch and answer with one A-ABORT and one log line.
pynetdicom's decoders (A-ASSOCIATE-RQ) run inside :func:`peer_bytes`, which does the
same for them, as pynetdicom's own DUL does around ``PDU.decode``.
"""

import logging
import socket
import struct
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE

# PDU types (PS3.8 9.3.1).
A_ASSOCIATE_RQ_PDU, A_ASSOCIATE_AC_PDU, A_ASSOCIATE_RJ_PDU = 0x01, 0x02, 0x03
P_DATA_TF_PDU, A_RELEASE_RQ_PDU, A_RELEASE_RP_PDU, A_ABORT_PDU = 0x04, 0x05, 0x06, 0x07
PDU_TYPES = frozenset(range(0x01, 0x08))
# The largest P-DATA-TF this node accepts, and the length it asks peers to keep to.
MAXIMUM_PDU_LENGTH = 1 << 20
# Slack over MAXIMUM_PDU_LENGTH for peers that count the PDV header into it; also the
# cap on an A-ASSOCIATE-RQ, which comes before any length was agreed.
_PDU_LENGTH_CAP = MAXIMUM_PDU_LENGTH + 64

# A-ABORT reasons when the service provider aborts (PS3.8 9.3.8, Table 9-26).
ABORT_NOT_SPECIFIED, ABORT_UNRECOGNIZED_PDU, ABORT_UNEXPECTED_PDU = 0x00, 0x01, 0x02
ABORT_INVALID_PARAMETER = 0x06

# DIMSE (PS3.7 Annex E): command elements this node reads or writes, and their values.
AFFECTED_SOP_CLASS_UID, COMMAND_FIELD, MESSAGE_ID = 0x0000_0002, 0x0000_0100, 0x0000_0110
MESSAGE_ID_BEING_RESPONDED_TO, COMMAND_DATA_SET_TYPE = 0x0000_0120, 0x0000_0800
STATUS, AFFECTED_SOP_INSTANCE_UID = 0x0000_0900, 0x0000_1000
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
RESPONSE_BIT = 0x8000
NO_DATA_SET = 0x0101


class ProtocolError(Exception):
    """The peer broke PS3.8 or PS3.7: the association is aborted. ``reason`` is the
    metric label (``radpipe_associations_aborted_total``), ``abort_reason`` the
    A-ABORT's reason field."""

    def __init__(self, reason: str, detail: str, abort_reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(printable(detail))
        self.reason, self.abort_reason = reason, abort_reason


def printable(text: str) -> str:
    """``text`` fit for one log line: what a peer sent may hold control characters or
    terminal escapes; those (and backslashes) are shown as ``\\xNN``/``\\uNNNN``."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return "".join(c if c.isascii() and c.isprintable() and c != "\\" else ascii(c)[1:-1] for c in text)


def malformed(detail: str) -> ProtocolError:
    return ProtocolError("malformed_pdu", detail)


# -- what pynetdicom logs while it decodes peer bytes --------------------------------------

_captured: ContextVar[list[logging.LogRecord] | None] = ContextVar("radpipe_pdu_captured", default=None)


class _CaptureWhileDecoding(logging.Filter):
    """Diverts what pynetdicom logs inside :func:`peer_bytes` (in that thread only):
    about bad peer bytes it logs errors and whole tracebacks, while the node says it in
    the one abort line. Everywhere else (the SCU side, other threads) it passes all."""

    def filter(self, record: logging.LogRecord) -> bool:
        captured = _captured.get()
        if captured is None:
            return True
        captured.append(record)
        return False


_CAPTURE = _CaptureWhileDecoding()
# A logger's filters see only records logged to it, not its children's: one per module
# (all of pynetdicom's are created by the import above).
for _name in [n for n in logging.root.manager.loggerDict if n.startswith("pynetdicom.")]:
    logging.getLogger(_name).addFilter(_CAPTURE)


@contextmanager
def peer_bytes(what: str) -> Iterator[list[logging.LogRecord]]:
    """Run third-party decoding of ``what`` the peer sent: any exception it raises
    becomes one :class:`ProtocolError`; yields the records pynetdicom logged meanwhile."""
    records: list[logging.LogRecord] = []
    token = _captured.set(records)
    try:
        yield records
    except ProtocolError:
        raise
    except Exception as e:
        detail = f"undecodable {what}: {type(e).__name__}: {e}"
        raise malformed(detail[:300]) from e
    finally:
        _captured.reset(token)


def decode_associate_rq(body: bytes | bytearray) -> A_ASSOCIATE:
    """An A-ASSOCIATE-RQ body (after the 6-byte header) as pynetdicom's primitive."""
    with peer_bytes("A-ASSOCIATE-RQ"):
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(encode_pdu(A_ASSOCIATE_RQ_PDU, body))
        return pdu.to_primitive()


# -- framing --------------------------------------------------------------------------------


class PeerClosed(ConnectionError):
    """The peer closed the connection; ``between_pdus`` when no part of a PDU was pending."""

    def __init__(self, between_pdus: bool) -> None:
        super().__init__("connection closed by the peer" + ("" if between_pdus else " in the middle of a PDU"))
        self.between_pdus = between_pdus


def _recv_exact(sock: socket.socket, size: int, deadline: float | None) -> bytearray:
    """``size`` bytes; by ``deadline`` (monotonic) if given, else each read within the
    socket's own timeout. ``TimeoutError`` when the time runs out."""
    buffer = bytearray(size)
    view, received = memoryview(buffer), 0
    while received < size:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("timed out")
            sock.settimeout(left)
        count = sock.recv_into(view[received:], size - received)
        if not count:
            raise PeerClosed(between_pdus=received == 0)
        received += count
    return buffer


def read_pdu(sock: socket.socket, deadline: float | None = None) -> tuple[int, bytearray]:
    """The next PDU's type and its body (the bytes after the 6-byte header)."""
    kind, _, length = struct.unpack(">BBI", _recv_exact(sock, 6, deadline))
    if kind not in PDU_TYPES:
        raise ProtocolError("unrecognized_pdu", f"unknown PDU type 0x{kind:02X}", ABORT_UNRECOGNIZED_PDU)
    if length > _PDU_LENGTH_CAP:
        raise ProtocolError("too_large", f"PDU of {length} bytes; at most {MAXIMUM_PDU_LENGTH} were agreed")
    try:
        return kind, _recv_exact(sock, length, deadline)
    except PeerClosed:
        raise PeerClosed(between_pdus=False) from None


def encode_pdu(kind: int, body: bytes | bytearray) -> bytes:
    return struct.pack(">BBI", kind, 0, len(body)) + body


def abort_pdu(reason: int) -> bytes:
    """A-ABORT from the service provider (source 2) with ``reason`` (PS3.8 9.3.8)."""
    return encode_pdu(A_ABORT_PDU, bytes([0, 0, 2, reason]))


def reject_pdu(result: int, source: int, reason: int) -> bytes:
    """A-ASSOCIATE-RJ (PS3.8 9.3.4)."""
    return encode_pdu(A_ASSOCIATE_RJ_PDU, bytes([0, result, source, reason]))


RELEASE_RP = encode_pdu(A_RELEASE_RP_PDU, bytes(4))


def pdv_items(body: bytearray) -> Iterator[tuple[int, int, memoryview]]:
    """(presentation context ID, message control header, fragment) of each presentation
    data value item in a P-DATA-TF body (PS3.8 9.3.5, Annex E.2)."""
    if not body:
        raise malformed("P-DATA-TF without any presentation data value item")
    view, offset, end = memoryview(body), 0, len(body)
    while offset < end:
        if end - offset < 6:
            raise malformed(f"presentation data value item cut short: {end - offset} byte(s) left")
        length, context_id, control = struct.unpack_from(">IBB", body, offset)
        if length < 2 or length > end - offset - 4:
            raise malformed(f"presentation data value item of length {length} in {end - offset} byte(s)")
        yield context_id, control, view[offset + 6 : offset + 4 + length]
        offset += 4 + length


def p_data_tf(context_id: int, message: bytes, is_command: bool = True) -> bytes:
    """One P-DATA-TF carrying ``message`` whole, as its last fragment."""
    control = 0x03 if is_command else 0x02
    return encode_pdu(P_DATA_TF_PDU, struct.pack(">IBB", len(message) + 2, context_id, control) + message)


# -- command sets ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """A DIMSE command set (PS3.7 6.3, always Implicit VR Little Endian): raw element
    values by tag, and the three every request needs, checked on decode."""

    elements: dict[int, bytes]
    field: int
    message_id: int | None  # None in a response (it has Message ID Being Responded To)
    has_data_set: bool

    @property
    def is_response(self) -> bool:
        return bool(self.field & RESPONSE_BIT)

    def text(self, tag: int) -> str:
        """A UI/AE value as text ("" when absent), padding removed and anything but
        printable ASCII escaped (:func:`printable`): such a UID then fails every check."""
        return printable(self.elements.get(tag, b"").rstrip(b"\0 ").decode("latin-1"))


def _us(elements: dict[int, bytes], tag: int, name: str) -> int:
    value = elements.get(tag)
    if value is None:
        raise malformed(f"command set without {name}")
    if len(value) != 2:
        raise malformed(f"{name} of {len(value)} byte(s); US is 2")
    return int.from_bytes(value, "little")


def decode_command(data: bytes) -> Command:
    """A command set as received: elements that exactly fill it, all in group 0000."""
    elements: dict[int, bytes] = {}
    offset, end = 0, len(data)
    while offset < end:
        if end - offset < 8:
            raise malformed(f"command element header cut short: {end - offset} byte(s) left")
        group, element, length = struct.unpack_from("<HHI", data, offset)
        offset += 8
        if group != 0x0000:
            raise malformed(f"element ({group:04X},{element:04X}) in a command set")
        if length > end - offset:
            raise malformed(f"command element (0000,{element:04X}) of {length} bytes in {end - offset}")
        tag = (group << 16) | element
        if tag in elements:
            raise malformed(f"command element (0000,{element:04X}) twice")
        elements[tag] = bytes(data[offset : offset + length])
        offset += length
    field = _us(elements, COMMAND_FIELD, "Command Field")
    message_id = None if field & RESPONSE_BIT else _us(elements, MESSAGE_ID, "Message ID")
    has_data_set = _us(elements, COMMAND_DATA_SET_TYPE, "Command Data Set Type") != NO_DATA_SET
    return Command(elements, field, message_id, has_data_set)


def encode_command(elements: dict[int, bytes]) -> bytes:
    """Encode a command set, with its Command Group Length first."""
    body = b"".join(struct.pack("<HHI", tag >> 16, tag & 0xFFFF, len(v)) + v for tag, v in sorted(elements.items()))
    return struct.pack("<HHII", 0, 0, 4, len(body)) + body


def us(value: int) -> bytes:
    return struct.pack("<H", value)


def response(request: Command, status: int) -> bytes:
    """The response command to ``request``: same SOP class and instance, ``status``."""
    if request.message_id is None:
        raise ValueError("a response is never answered")
    elements = {
        COMMAND_FIELD: us(request.field | RESPONSE_BIT),
        MESSAGE_ID_BEING_RESPONDED_TO: us(request.message_id),
        COMMAND_DATA_SET_TYPE: us(NO_DATA_SET),
        STATUS: us(status),
    }
    for tag in (AFFECTED_SOP_CLASS_UID, AFFECTED_SOP_INSTANCE_UID):
        if tag in request.elements:
            elements[tag] = request.elements[tag]
    return encode_command(elements)
