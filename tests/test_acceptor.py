"""The upper layer against a scripted bad peer (raw sockets): every protocol error ends
that association with an A-ABORT or a close, nothing half-received is journaled, and the
node goes on answering everyone else."""

import contextlib
import gc
import logging
import os
import socket
import sqlite3
import ssl
import struct
import subprocess
import threading
import time
import warnings

import pydicom
import pytest
from prometheus_client import CollectorRegistry
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification

from plugin.acceptor import IMPLEMENTATION_CLASS_UID
from plugin.app import Node
from plugin.config import NodeConfig
from plugin.pdu import decode_command, encode_command
from tests.conftest import PYDICOM_DATA, node_config, storescu, wait_for, write_pipeline

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


def _association_request(
    calling: str = "BADPEER", abstract: str = Verification, transfer_syntax: str | None = None
) -> bytes:
    """An A-ASSOCIATE-RQ with one presentation context (ID 1) for ``abstract``."""
    request = A_ASSOCIATE()
    request.application_context_name = "1.2.840.10008.3.1.1.1"
    request.calling_ae_title, request.called_ae_title = calling, "RADPIPE"
    context = build_context(abstract, transfer_syntax)
    context.context_id = 1
    request.presentation_context_definition_list = [context]
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = 16384
    request.user_information = [maximum]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(request)
    return pdu.encode()


def _associate(port: int, abstract: str = Verification, transfer_syntax: str | None = None) -> socket.socket:
    sock = _connect(port)
    sock.sendall(_association_request(abstract=abstract, transfer_syntax=transfer_syntax))
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
        response = decode_command(body[6:]).elements
        assert kind == P_DATA_TF and response[0x0000_0100] == struct.pack("<H", 0x8030)
        assert response[0x0000_0120] == struct.pack("<H", 7) and response[0x0000_0900] == bytes(2)
        sock.sendall(_p_data(1, 0x03, _command(0x0020, Verification)))  # C-FIND-RQ: not served here
        kind, body = _read_pdu(sock)
        assert decode_command(body[6:]).elements[0x0000_0900] == struct.pack("<H", 0x0211)  # unrecognized operation
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


def test_a_retired_storage_sop_class_is_stored(start_node, dcmtk):
    """Older modalities still send retired SOP classes, which pynetdicom's storage list
    leaves out: pydicom-data's color-pl.dcm is Ultrasound Image Storage (Retired)."""
    node = start_node()
    path = PYDICOM_DATA / "color-pl.dcm"
    sent = pydicom.dcmread(path)
    assert sent.SOPClassUID == "1.2.840.10008.5.1.4.1.1.6"
    result = storescu(node.port, path, options=("-R",))  # propose only the file's own SOP class
    assert result.returncode == 0, result.stdout + result.stderr
    stored = pydicom.dcmread(node.journal.instance(str(sent.SOPInstanceUID)).path)
    assert stored.file_meta.MediaStorageSOPClassUID == sent.SOPClassUID
    assert stored == sent


# -- malformed bytes: one A-ABORT, one log line, counted -------------------------------------


def _command_with(**replaced: bytes) -> bytes:
    """A C-ECHO-RQ command set with some elements' raw values replaced (or dropped: b"")."""
    elements = {
        0x0000_0002: Verification.encode() + b"\0",
        0x0000_0100: struct.pack("<H", 0x0030),
        0x0000_0110: struct.pack("<H", 7),
        0x0000_0800: struct.pack("<H", 0x0101),
    }
    tags = {"sop_class": 0x0000_0002, "field": 0x0000_0100, "message_id": 0x0000_0110, "data_set_type": 0x0000_0800}
    for name, value in replaced.items():
        elements[tags[name]] = value
    return encode_command({tag: value for tag, value in elements.items() if value})


MALFORMED_P_DATA = {
    # A PDV item needs 6 bytes of header (length, context ID, control): here 3.
    "short_pdv_item": struct.pack(">BBI", P_DATA_TF, 0, 3) + b"\0\0\0",
    "pdv_item_longer_than_its_pdu": struct.pack(">BBIIBB", P_DATA_TF, 0, 6, 50, 1, 3),
    "pdv_item_of_length_zero": struct.pack(">BBIIBB", P_DATA_TF, 0, 6, 0, 1, 3),
    "empty_p_data": struct.pack(">BBI", P_DATA_TF, 0, 0),
    "command_field_of_three_bytes": _p_data(1, 0x03, _command_with(field=b"\x30\x00\x00")),
    "command_field_of_one_byte": _p_data(1, 0x03, _command_with(field=b"\x30")),
    "message_id_of_four_bytes": _p_data(1, 0x03, _command_with(message_id=b"\x07\0\0\0")),
    "no_command_data_set_type": _p_data(1, 0x03, _command_with(data_set_type=b"")),
    "command_element_past_the_end": _p_data(1, 0x03, _command_with()[:-3]),
    "garbage_after_the_command": _p_data(1, 0x03, _command_with() + b"\x01\x02\x03"),
    "data_set_element_in_the_command": _p_data(1, 0x03, _command_with() + struct.pack("<HHI", 8, 0x18, 0)),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_P_DATA))
def test_malformed_p_data_is_one_abort_and_one_line(start_node, dcmtk, capfd, caplog, case):
    node = start_node()
    with _associate(node.port) as sock:
        caplog.clear()
        sock.sendall(MALFORMED_P_DATA[case])
        reply = _read_pdu(sock)
        assert reply is not None and reply[0] == A_ABORT, reply  # an A-ABORT, not just a dropped connection
        assert reply[1][2] == 2  # from the service provider
    sample = node.metrics.registry.get_sample_value
    wait_for(lambda: sample("radpipe_associations_aborted_total", {"reason": "malformed_pdu"}) == 1, 10, "the count")
    assert _echo_works(node.port)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "aborting the association" in lines[0].getMessage(), [r.getMessage() for r in lines]
    assert not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in capfd.readouterr().err


def test_undecodable_association_request_is_one_line_pynetdicom_included(start_node, capfd, caplog):
    """pynetdicom logs a traceback when it cannot decode an AE title: not here."""
    node = start_node()
    request = bytearray(_association_request())
    request[10:26] = b"BADPEER".ljust(8) + bytes([0xFF, 0xFE]) * 4  # called AE title: not ASCII
    caplog.clear()
    with _connect(node.port) as sock:
        sock.sendall(bytes(request))
        assert _ends_with_abort_or_close(sock)
    assert _echo_works(node.port)
    lines = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert len(lines) == 1 and lines[0].name == "plugin.acceptor", [(r.name, r.getMessage()) for r in lines]
    assert "Traceback" not in capfd.readouterr().err


# -- C-STORE: the SOP class of its context, and every handler failure a named status -------------


def _dataset_bytes(path) -> bytes:
    """The data set of a DICOM file as stored (after its file meta)."""
    data = path.read_bytes()
    return data[132 + 12 + struct.unpack("<I", data[140:144])[0] :]


def _c_store(sock: socket.socket, sop_class: str, uid: str, dataset: bytes) -> int:
    """Send one C-STORE on context 1 and return the status it was answered."""
    sock.sendall(_p_data(1, 0x03, _command(0x0001, sop_class, with_data_set=True, sop_instance=uid)))
    for start in range(0, len(dataset), 16000):
        last = start + 16000 >= len(dataset)
        sock.sendall(_p_data(1, 0x02 if last else 0x00, dataset[start : start + 16000]))
    reply = _read_pdu(sock)
    assert reply is not None and reply[0] == P_DATA_TF, reply
    return struct.unpack("<H", decode_command(reply[1][6:]).elements[0x0000_0900])[0]


def _ct(demo_study, index: int = 0):
    path = demo_study["Demo chest CT, nodules"][index]
    return path, str(pydicom.dcmread(path).SOPInstanceUID), pydicom.dcmread(path).file_meta.TransferSyntaxUID


def test_sop_class_must_match_its_presentation_context(start_node, dcmtk, demo_study):
    node = start_node()
    path, uid, syntax = _ct(demo_study)
    with _associate(node.port, CTImageStorage, syntax) as sock:
        assert _c_store(sock, MRImageStorage, uid, _dataset_bytes(path)) == 0x0122  # SOP class not supported
        assert node.journal.instance(uid) is None
        assert _c_store(sock, CTImageStorage, uid, _dataset_bytes(path)) == 0x0000  # the association goes on
    rejected = node.metrics.registry.get_sample_value(
        "radpipe_instances_rejected_total", {"reason": "sop_class_mismatch"}
    )
    assert rejected == 1


@pytest.mark.sqlite_only("holds SQLite's write lock (BEGIN EXCLUSIVE) and waits out its busy timeout")
def test_a_locked_journal_is_answered_processing_failure(start_node, dcmtk, demo_study):
    """Another process holds the journal's write lock (an admin's sqlite3 shell): the
    store fails after SQLite's busy timeout and the sender hears 0xC211, not silence."""
    node = start_node()
    path, uid, syntax = _ct(demo_study)
    holder = sqlite3.connect(node.config.storage.dir / "journal.sqlite", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        with _associate(node.port, CTImageStorage, syntax) as sock:
            sock.settimeout(60)  # the runner's writes wait out their busy timeouts too, under one journal lock
            assert _c_store(sock, CTImageStorage, uid, _dataset_bytes(path)) == 0xC211
            holder.execute("ROLLBACK")
            assert _c_store(sock, CTImageStorage, uid, _dataset_bytes(path)) == 0x0000  # the sender's retry
    finally:
        holder.close()
    sample = node.metrics.registry.get_sample_value
    assert sample("radpipe_instances_rejected_total", {"reason": "processing_failure"}) == 1
    assert node.journal.instance(uid) is not None


@pytest.fixture
def full_journal_disk(tmp_path):
    """``tmp_path/data`` on a 1 MB tmpfs (the journal's disk), its spool on the roomy one."""
    data = tmp_path / "data"
    data.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(data)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"mounting a tmpfs needs root: {mounted.stderr.decode().strip()}")
    try:
        (tmp_path / "spool").mkdir()
        (data / "spool").symlink_to(tmp_path / "spool")
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=True)


@pytest.mark.sqlite_only("fills the disk that holds the SQLite journal's file (PostgreSQL's is the server's)")
def test_a_full_journal_disk_is_answered_out_of_resources(full_journal_disk, start_node, dcmtk, demo_study):
    node = start_node()
    with (full_journal_disk / "filler").open("wb", buffering=0) as filler, contextlib.suppress(OSError):
        while True:  # the journal's disk, full
            filler.write(bytes(4096))
    path, uid, syntax = _ct(demo_study)
    with _associate(node.port, CTImageStorage, syntax) as sock:
        assert _c_store(sock, CTImageStorage, uid, _dataset_bytes(path)) == 0xA700
        (full_journal_disk / "filler").unlink()  # space again: the sender's retry gets through
        assert _c_store(sock, CTImageStorage, uid, _dataset_bytes(path)) == 0x0000
    assert node.metrics.registry.get_sample_value("radpipe_instances_rejected_total", {"reason": "storage_full"}) == 1


# -- timers and limits ---------------------------------------------------------------------------


def test_artim_closes_a_connection_that_sends_no_association_request(start_node, caplog):
    node = start_node(node={"artim_seconds": 0.5})
    with _connect(node.port) as silent, _connect(node.port) as slow:
        slow.sendall(struct.pack(">BBI", 0x01, 0, 200) + bytes(10))  # an A-ASSOCIATE-RQ that never completes
        start = time.monotonic()
        for _ in range(10):  # ... trickled, a byte per 0.1 s: each read is quick, the whole is not
            time.sleep(0.1)
            with contextlib.suppress(OSError):
                slow.sendall(b"\0")
        assert silent.recv(1) == b"" and slow.recv(1) == b""  # closed, not answered (PS3.8 AA-2)
        assert time.monotonic() - start < 3
    sample = node.metrics.registry.get_sample_value
    wait_for(lambda: sample("radpipe_associations_aborted_total", {"reason": "artim_expired"}) == 2, 10, "the count")
    with _associate(node.port) as sock:  # after A-RELEASE-RP the node waits for the peer to close, within ARTIM
        sock.sendall(struct.pack(">BBI", 0x05, 0, 4) + bytes(4))
        assert _read_pdu(sock) == (0x06, bytes(4))
        start = time.monotonic()
        assert sock.recv(1) == b"" and 0.3 < time.monotonic() - start < 3


def test_a_silent_association_is_aborted_after_the_network_timeout(start_node):
    node = start_node(node={"network_timeout_seconds": 0.5})
    with _associate(node.port) as sock:
        start = time.monotonic()
        reply = _read_pdu(sock)
        assert reply is not None and reply[0] == A_ABORT and time.monotonic() - start < 3
    sample = node.metrics.registry.get_sample_value
    wait_for(lambda: sample("radpipe_associations_aborted_total", {"reason": "network_timeout"}) == 1, 10, "the count")


def test_max_associations_is_counted_before_a_thread_starts(start_node, dcmtk):
    node = start_node(node={"max_associations": 2, "artim_seconds": 1})
    held = [_associate(node.port), _associate(node.port)]
    threads = threading.active_count()
    extra = [_connect(node.port) for _ in range(6)]  # connect, say nothing
    try:
        time.sleep(0.5)
        assert threading.active_count() - threads <= 1  # the one refusing thread, no more
        closed = 0
        for sock in extra:
            sock.settimeout(3)
            closed += sock.recv(1) == b""  # one by the refusing thread after ARTIM, the rest at once
        assert closed == 6
    finally:
        for sock in held + extra:
            sock.close()
    sample = node.metrics.registry.get_sample_value
    assert sample("radpipe_associations_rejected_total", {"reason": "too_many_associations"}) == 6
    wait_for(lambda: _echo_works(node.port), what="echo once the held associations are closed")


# -- TLS: stop within node.shutdown_seconds, no socket left open --------------------------------


def _open_sockets() -> int:
    links = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(FileNotFoundError):  # the listing's own descriptor, gone already
            links.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sum(link.startswith("socket:") for link in links)


def test_stop_with_an_idle_tls_association_is_quick_and_closes_every_socket(tmp_path, pki):
    write_pipeline(tmp_path / "pipelines")
    tls = {"cert": str(pki / "server.crt"), "key": str(pki / "server.key")}
    config = node_config(tmp_path, node={"tls": tls, "shutdown_seconds": 5}, metrics={"port": 0})
    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    client.check_hostname = False
    sockets = _open_sockets()
    node = Node(NodeConfig.model_validate(config), CollectorRegistry())
    node.start()
    with warnings.catch_warnings(record=True) as caught:  # records, hides nothing: every warning fails below
        warnings.simplefilter("always")
        try:
            sock = client.wrap_socket(_connect(node.port))
            sock.sendall(_association_request())
            assert _read_pdu(sock)[0] == A_ASSOCIATE_AC  # then idle: the node's thread waits in a TLS read
        finally:
            start = time.monotonic()
            node.stop()
            took = time.monotonic() - start
        print(f"\nstop() with one idle TLS association: {took:.2f} s")
        assert took < 5
        assert sock.recv(1) == b""  # the node closed it
        sock.close()
        gc.collect()
    assert [str(w.message) for w in caught] == []
    assert _open_sockets() == sockets


def test_failed_tls_handshakes_are_counted_and_leave_no_socket(start_node, pki):
    tls = {"cert": str(pki / "server.crt"), "key": str(pki / "server.key"), "ca": str(pki / "ca.crt")}
    node = start_node(node={"tls": {**tls, "require_client_cert": True}})
    anonymous = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.crt"))
    anonymous.check_hostname = False
    with warnings.catch_warnings(record=True) as caught:  # records, hides nothing: every warning fails below
        warnings.simplefilter("always")
        with _connect(node.port) as plain, contextlib.suppress(ConnectionResetError):  # plain DICOM on the TLS port
            plain.sendall(_association_request())
            assert plain.recv(1) == b""
        # TLS without the client certificate it needs: the node ends the handshake (TLS 1.3: after the client's end)
        sock = anonymous.wrap_socket(_connect(node.port))
        with sock, contextlib.suppress(ssl.SSLError, ConnectionResetError):
            sock.sendall(_association_request())
            assert sock.recv(1) == b""
        sample = node.metrics.registry.get_sample_value
        wait_for(
            lambda: sample("radpipe_associations_aborted_total", {"reason": "tls_handshake_failed"}) == 2, 10, "count"
        )
        gc.collect()
    assert [str(w.message) for w in caught] == []
