"""The upper layer against a scripted bad peer (raw sockets): every protocol error ends
that association with an A-ABORT or a close, nothing half-received is journaled, and the
node goes on answering everyone else."""

import socket
import struct
import subprocess

import pydicom
import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, Verification

from plugin.acceptor import IMPLEMENTATION_CLASS_UID, encode_command, parse_command
from tests.conftest import storescu, wait_for

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_ABORT = 0x02, 0x03, 0x04, 0x07


def _connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _read_pdu(sock: socket.socket) -> tuple[int, bytes] | None:
    """The next PDU (type, body), or None if the node closed the connection."""
    header = b""
    while len(header) < 6:
        chunk = sock.recv(6 - len(header))
        if not chunk:
            return None
        header += chunk
    kind, _, length = struct.unpack(">BBI", header)
    body = b""
    while len(body) < length:
        chunk = sock.recv(length - len(body))
        if not chunk:
            return None
        body += chunk
    return kind, body


def _association_request(calling: str = "BADPEER", abstract: str = Verification) -> bytes:
    """An A-ASSOCIATE-RQ with one presentation context (ID 1) for ``abstract``."""
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title, request.called_ae_title = calling, "RADPIPE"
    context = build_context(abstract)
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    request.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return pdu.encode()


def _associate(port: int, abstract: str = Verification) -> socket.socket:
    sock = _connect(port)
    sock.sendall(_association_request(abstract=abstract))
    reply = _read_pdu(sock)
    assert reply is not None and reply[0] == A_ASSOCIATE_AC
    return sock


def _p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    item = struct.pack(">IBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBI", P_DATA_TF, 0, len(item)) + item


def _command(field: int, sop_class: str, with_data_set: bool = False, sop_instance: str = "") -> bytes:
    def ui(value: str) -> bytes:
        return value.encode() + b"\0" * (len(value) % 2)

    elements = {
        0x0000_0002: ui(sop_class),
        0x0000_0100: struct.pack("<H", field),
        0x0000_0110: struct.pack("<H", 7),
        0x0000_0800: struct.pack("<H", 0x0001 if with_data_set else 0x0101),
    }
    if sop_instance:
        elements[0x0000_1000] = ui(sop_instance)
    return encode_command(elements)


def _ends_with_abort_or_close(sock: socket.socket) -> bool:
    reply = _read_pdu(sock)
    return reply is None or reply[0] == A_ABORT


def _echo_works(port: int) -> bool:
    return subprocess.run(["echoscu", "-aec", "RADPIPE", "127.0.0.1", str(port)], capture_output=True).returncode == 0


@pytest.mark.parametrize(
    "case",
    ["garbage_instead_of_association", "p_data_before_association", "oversized_pdu", "unknown_pdu_type"],
)
def test_bad_first_pdu_is_aborted(start_node, dcmtk, case):
    node = start_node()
    data = {
        "garbage_instead_of_association": b"GET / HTTP/1.1\r\nHost: radpipe\r\n\r\n",
        "p_data_before_association": _p_data(1, 0x03, b"\0" * 16),
        "oversized_pdu": struct.pack(">BBI", 0x01, 0, 0xFFFFFFF0),
        "unknown_pdu_type": struct.pack(">BBI", 0x09, 0, 4) + bytes(4),
    }[case]
    with _connect(node.port) as sock:
        sock.sendall(data)
        assert _ends_with_abort_or_close(sock)
    assert _echo_works(node.port)


def test_protocol_errors_inside_an_association_abort_it(start_node, dcmtk):
    node = start_node()
    with _associate(node.port) as sock:  # data on a presentation context that was never accepted
        sock.sendall(_p_data(99, 0x03, _command(0x0030, Verification)))
        assert _ends_with_abort_or_close(sock)
    with _associate(node.port) as sock:  # a data set fragment with no command before it
        sock.sendall(_p_data(1, 0x02, b"\0" * 32))
        assert _ends_with_abort_or_close(sock)
    with _associate(node.port) as sock:  # a second A-ASSOCIATE-RQ inside the association
        sock.sendall(struct.pack(">BBI", 0x01, 0, 4) + bytes(4))
        assert _ends_with_abort_or_close(sock)
    assert _echo_works(node.port)


def test_echo_unknown_command_and_release_on_a_raw_association(start_node, dcmtk):
    node = start_node()
    with _associate(node.port) as sock:
        sock.sendall(_p_data(1, 0x03, _command(0x0030, Verification)))  # C-ECHO-RQ
        kind, body = _read_pdu(sock)
        response = parse_command(body[6:])
        assert kind == P_DATA_TF and response[0x0000_0100] == struct.pack("<H", 0x8030)
        assert response[0x0000_0120] == struct.pack("<H", 7) and response[0x0000_0900] == bytes(2)
        sock.sendall(_p_data(1, 0x03, _command(0x0020, Verification)))  # C-FIND-RQ: not served here
        kind, body = _read_pdu(sock)
        assert parse_command(body[6:])[0x0000_0900] == struct.pack("<H", 0x0211)  # unrecognized operation
        sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))  # A-RELEASE-RQ
        assert _read_pdu(sock) == (0x06, bytes(4))


def test_peer_gone_mid_data_set_stores_nothing(start_node, dcmtk, demo_study):
    node = start_node()
    path = demo_study["Demo chest CT, nodules"][0]
    uid = str(pydicom.dcmread(path).SOPInstanceUID)
    data = path.read_bytes()
    with _associate(node.port, abstract=CTImageStorage) as sock:
        sock.sendall(_p_data(1, 0x03, _command(0x0001, CTImageStorage, with_data_set=True, sop_instance=uid)))
        sock.sendall(_p_data(1, 0x00, data[1000:5000]))  # a first fragment, then nothing
    assert _echo_works(node.port)
    assert node.journal.instance(uid) is None
    assert not list((node.config.storage.dir / "spool").rglob("*.dcm"))


def test_endless_data_set_is_aborted(start_node, dcmtk):
    node = start_node(storage={"max_instance_mb": 1})
    uid = "1.2.826.0.1.3680043.8.498.1"
    with _associate(node.port, abstract=CTImageStorage) as sock:
        sock.sendall(_p_data(1, 0x03, _command(0x0001, CTImageStorage, with_data_set=True, sop_instance=uid)))
        try:
            for _ in range(200):  # 200 x 16 KB, never the last fragment: 3 MB > 1 MB
                sock.sendall(_p_data(1, 0x00, bytes(16384)))
        except OSError:
            pass  # the node aborted and closed while we were still sending
        else:
            assert _ends_with_abort_or_close(sock)  # a node still waiting for more times out here
    assert _echo_works(node.port)
    assert node.journal.instance(uid) is None


def test_associations_beyond_the_limit_are_rejected(start_node, dcmtk):
    node = start_node(node={"max_associations": 2})
    held = [_associate(node.port), _associate(node.port)]
    try:
        with _connect(node.port) as sock:
            sock.sendall(_association_request("THIRD"))
            kind, body = _read_pdu(sock)
            assert kind == A_ASSOCIATE_RJ and body[1:] == bytes([2, 3, 2])  # transient, local limit exceeded
    finally:
        for sock in held:
            sock.close()
    sample = node.metrics.registry.get_sample_value
    assert sample("radpipe_associations_rejected_total", {"reason": "too_many_associations"}) == 1
    wait_for(lambda: _echo_works(node.port), what="echo once the held associations are closed")


def test_stored_file_carries_the_file_meta_of_its_association(start_node, dcmtk, demo_study):
    node = start_node()
    path = demo_study["Demo chest CT, nodules"][0]
    sent = pydicom.dcmread(path)
    assert storescu(node.port, path, options=("-aet", "MODALITY1")).returncode == 0
    stored = pydicom.dcmread(node.journal.instance(str(sent.SOPInstanceUID)).path)
    meta = stored.file_meta
    assert meta.MediaStorageSOPClassUID == sent.SOPClassUID
    assert meta.MediaStorageSOPInstanceUID == sent.SOPInstanceUID
    assert meta.TransferSyntaxUID == sent.file_meta.TransferSyntaxUID
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle == "MODALITY1"
    assert stored == sent  # the data set itself, element for element
