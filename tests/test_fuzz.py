"""A seeded fuzzer against a running node (``python -m plugin serve``, its own process).

A valid association is recorded once (A-ASSOCIATE-RQ, C-ECHO, C-STORE of a small real
CT, A-RELEASE-RQ, as pynetdicom sends them), then sent again thousands of times with one
mutation each: bit flips, a truncation, a wrong length field (PDU, PDV item, A-ASSOCIATE
item, command element) or reordered, repeated or missing PDUs. Each mutated stream is
sent whole and followed by the end of the client's writing, as from a peer that sends
garbage and hangs up, so no case waits on a timer. Afterwards: echo works; every
connection ended in exactly one log line, every A-ABORT received was one of them and was
counted, no traceback anywhere in the output; the node's threads and file descriptors
are back to their count before the first case.
"""

import contextlib
import os
import random
import re
import selectors
import socket
import struct
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from tests.conftest import PYDICOM_FILES, echo_ok, free_port, node_config, serve, wait_for

SEED = int(os.environ.get("RADPIPE_FUZZ_SEED", "11"))
CASES = int(os.environ.get("RADPIPE_FUZZ_CASES", "2000"))
IMAGE = PYDICOM_FILES / "CT_small.dcm"  # 128 x 128 CT, 39 KB

A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF, A_RELEASE_RP, A_ABORT = 0x02, 0x03, 0x04, 0x06, 0x07
# The one line each connection ends with (plugin/acceptor.py).
ENDINGS = re.compile(
    r"association from \S+ \(.*\) (released|aborted by the peer|rejected: )"
    r"|aborting the association from |connection from \S+ (closed|ended)"
)
LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
NODE_ABORTS = ("malformed_pdu", "unrecognized_pdu", "unexpected_pdu", "too_large", "network_timeout", "internal_error")


def _record(port: int) -> bytes:
    """Everything pynetdicom sends for C-ECHO + C-STORE + release, relayed to the node."""
    listener = socket.create_server(("127.0.0.1", 0))
    sent = bytearray()

    def relay() -> None:
        client, _ = listener.accept()
        with client, socket.create_connection(("127.0.0.1", port)) as node, selectors.DefaultSelector() as sel:
            sel.register(client, selectors.EVENT_READ, node)
            sel.register(node, selectors.EVENT_READ, client)
            while True:
                for key, _ in sel.select(10):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    if key.fileobj is client:
                        sent.extend(data)
                    key.data.sendall(data)

    thread = threading.Thread(target=relay)
    thread.start()
    meta = pydicom.filereader.read_file_meta_info(IMAGE)
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(Verification)
    ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", listener.getsockname()[1], ae_title="RADPIPE")
    try:
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0 and assoc.send_c_store(IMAGE).Status == 0
    finally:
        assoc.release()
        thread.join(10)
        listener.close()
    return bytes(sent)


def _split(stream: bytes) -> list[bytes]:
    pdus, offset = [], 0
    while offset < len(stream):
        length = struct.unpack_from(">I", stream, offset + 2)[0]
        pdus.append(stream[offset : offset + 6 + length])
        offset += 6 + length
    return pdus


class Mutator:
    """Knows where the recorded stream's structure is: length fields (offset, size,
    byte order) and the bytes that are not data set values (headers, the association
    request, command sets), where bit flips find the decoders."""

    def __init__(self, pdus: list[bytes]) -> None:
        self.pdus, self.stream = pdus, b"".join(pdus)
        self.lengths: list[tuple[int, int, str]] = []
        self.structure: list[int] = []
        offset = 0
        for pdu in pdus:
            self.lengths.append((offset + 2, 4, ">"))
            self.structure.extend(range(offset, offset + 6))
            if pdu[0] == 0x01:
                self.structure.extend(range(offset, offset + len(pdu)))
                self._items(offset + 6 + 68, offset + len(pdu))
            elif pdu[0] == 0x04:
                self._pdvs(pdu, offset)
            offset += len(pdu)

    def _items(self, start: int, end: int) -> None:
        """A-ASSOCIATE-RQ items and sub-items (PS3.8 9.3.2): type, reserved, 2-byte length."""
        while start + 4 <= end:
            kind, length = self.stream[start], struct.unpack_from(">H", self.stream, start + 2)[0]
            self.lengths.append((start + 2, 2, ">"))
            if kind == 0x20:
                self._items(start + 8, start + 4 + length)
            elif kind == 0x50:
                self._items(start + 4, start + 4 + length)
            start += 4 + length

    def _pdvs(self, pdu: bytes, offset: int) -> None:
        item = 6
        while item < len(pdu):
            length, control = struct.unpack_from(">I", pdu, item)[0], pdu[item + 5]
            self.lengths.append((offset + item, 4, ">"))
            self.structure.extend(range(offset + item, offset + item + 6))
            if control & 0x01:  # a command set: its elements' lengths too
                self.structure.extend(range(offset + item + 6, offset + item + 4 + length))
                element = item + 6
                while element < item + 4 + length:
                    self.lengths.append((offset + element + 4, 4, "<"))
                    element += 8 + struct.unpack_from("<I", pdu, element + 4)[0]
            item += 4 + length

    def mutate(self, rng: random.Random) -> tuple[str, bytes]:
        kind = rng.choices(["bit_flip", "length", "truncate", "reorder"], [35, 25, 20, 20])[0]
        data = bytearray(self.stream)
        if kind == "bit_flip":
            for _ in range(rng.randint(1, 8)):
                where = rng.choice(self.structure) if rng.random() < 0.7 else rng.randrange(len(data))
                data[where] ^= 1 << rng.randrange(8)
        elif kind == "length":
            offset, size, order = rng.choice(self.lengths)
            value = int.from_bytes(data[offset : offset + size], "big" if order == ">" else "little")
            top = (1 << (8 * size)) - 1
            new = rng.choice(
                [0, 1, value - 1, value + 1, value + rng.randint(2, 64), value * 2, top, rng.randint(0, top)]
            )
            data[offset : offset + size] = (new % (top + 1)).to_bytes(size, "big" if order == ">" else "little")
        elif kind == "truncate":
            del data[rng.randint(1, len(data) - 1) :]
        else:
            pdus = list(self.pdus)
            i, j = rng.randrange(len(pdus)), rng.randrange(len(pdus))
            how = rng.choice(["swap", "move", "repeat", "drop"])
            if how == "swap":
                pdus[i], pdus[j] = pdus[j], pdus[i]
            elif how == "move":
                pdus.insert(j, pdus.pop(i))
            elif how == "repeat":
                pdus.insert(j, pdus[i])
            elif len(pdus) > 1:
                del pdus[i]
            data = bytearray(b"".join(pdus))
        return kind, bytes(data)


def _exchange(port: int, stream: bytes) -> list[int]:
    """Send ``stream``, stop writing, read until the node closes: the PDU types it sent."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(stream)
            sock.shutdown(socket.SHUT_WR)
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    kinds, offset = [], 0
    while offset + 6 <= len(received):
        kinds.append(received[offset])
        offset += 6 + struct.unpack_from(">I", received, offset + 2)[0]
    return kinds


def _counts(pid: int) -> tuple[int, int]:
    return len(os.listdir(f"/proc/{pid}/task")), len(os.listdir(f"/proc/{pid}/fd"))


def _aborted(metrics_port: int) -> dict[str, float]:
    page = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    # (each sample carries the node's id beside its reason)
    found = re.findall(r'^radpipe_associations_aborted_total\{[^}]*\breason="(\w+)"[^}]*\} (\S+)$', page, re.M)
    return {reason: float(value) for reason, value in found}


@pytest.mark.sqlite_only("counts the node's descriptors: a PostgreSQL pool keeps the connections a load opened")
def test_fuzzed_association_streams(tmp_path: Path, dcmtk) -> None:
    port, metrics_port = free_port(), free_port()
    (tmp_path / "pipelines").mkdir()  # nothing routed: no model, so no threads of its own
    config = node_config(
        tmp_path, node={"port": port, "artim_seconds": 2, "network_timeout_seconds": 5}, metrics={"port": metrics_port}
    )
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump(config))
    log_path = tmp_path / "node.log"
    node = serve(tmp_path / "radpipe.yaml", port, log_path)
    try:
        mutator = Mutator(_split(_record(port)))
        assert [p[0] for p in mutator.pdus][:2] == [0x01, 0x04] and mutator.pdus[-1][0] == 0x05
        assert _exchange(port, mutator.stream) == [A_ASSOCIATE_AC, P_DATA_TF, P_DATA_TF, A_RELEASE_RP]
        # The node listens before it has started its pipeline stages: the baseline waits for them.
        wait_for(lambda: " ready: " in log_path.read_text(errors="replace"), 60, "the node loaded")
        _aborted(metrics_port)  # the scrape's own thread comes and goes before the baseline
        time.sleep(0.5)
        before = _counts(node.pid)
        lines_before = len(log_path.read_text(errors="replace").splitlines())

        rng = random.Random(SEED)
        kinds: dict[str, int] = {}
        replies = {"aborted": 0, "rejected": 0, "released": 0, "closed": 0}
        start = time.monotonic()
        for _ in range(CASES):
            kind, stream = mutator.mutate(rng)
            kinds[kind] = kinds.get(kind, 0) + 1
            got = _exchange(port, stream)
            outcome = (
                "aborted" if A_ABORT in got
                else "rejected" if A_ASSOCIATE_RJ in got
                else "released" if A_RELEASE_RP in got
                else "closed"
            )  # fmt: skip
            replies[outcome] += 1
        took = time.monotonic() - start

        assert echo_ok(port)
        after = wait_for(
            lambda: (counts := _counts(node.pid)) == before and counts, 15, f"threads and descriptors back to {before}"
        )
        aborted = _aborted(metrics_port)
        lines = log_path.read_text(errors="replace").splitlines()
        new = lines[lines_before:]
        endings = [line for line in new if ENDINGS.search(line)]
        counted = {reason: int(value) for reason, value in aborted.items() if value}
        refusals = sum("C-STORE from" in line for line in new)
        print(
            f"\nfuzz: {CASES} cases in {took:.1f} s (seed {SEED}; {kinds}); the node answered {replies};"
            f"\n  ends counted by the node (radpipe_associations_aborted_total): {counted};"
            f"\n  node threads/fds before {before}, after {after}; {len(new)} log lines:"
            f" {len(endings)} connection ends, {refusals} C-STORE refusals"
        )
        assert "Traceback" not in "\n".join(lines)
        assert [line for line in lines if not LOG_LINE.match(line)] == []  # nothing printed beside the log
        assert [line for line in lines if not line.isprintable()] == []  # no control character a peer sent
        assert len(endings) == CASES + 1  # one line per connection: the cases and the echo
        assert sum("aborting the association" in line for line in new) == replies["aborted"]
        assert sum(aborted[reason] for reason in NODE_ABORTS) == replies["aborted"]
        assert aborted["internal_error"] == 0
        assert sum("rejected: " in line for line in new) == replies["rejected"]
        assert aborted["connection_lost"] + aborted["peer_aborted"] == replies["closed"]
    finally:
        node.terminate()
        node.wait(30)
    assert node.returncode == 0
