"""The STOW-RS endpoint (PS3.18 10.5): ``POST /studies`` with a ``multipart/related;
type="application/dicom"`` body, for uploaders and archives that speak DICOMweb only.

Each instance goes through the C-STORE handler's own path (``node.handle_store``: the
same checks, spool, journal, quarantine and metrics), so the answer keeps invariant 1:
200 only after every instance is durable and journaled. The body is first parsed whole
into a temporary file (``multipart.py``, bounded memory) and every part checked to be a
DICOM file, so a malformed, mistyped or oversize body is refused with its 4xx before any
instance is stored: nothing is half-stored. Bearer tokens, or client certificates
(mutual TLS), stand where the allow-list of calling AE titles stands for C-STORE.
"""

import contextlib
import hmac
import io
import json
import logging
import socket
import socketserver
import ssl
import struct
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO

import pydicom
from pydicom import Dataset
from pydicom.uid import UID

from plugin.acceptor import StoreRequest
from plugin.config import NodeSection
from plugin.multipart import CHUNK, ChunkedReader, LengthReader, MultipartError, Part, Readable, TooLarge, read_parts
from plugin.node import Storage, StoreStatus, handle_store, server_ssl_context
from plugin.stow import DICOM_JSON, FailureReason, is_transient

log = logging.getLogger(__name__)

# The name journaled as the calling AE title for an upload without a token.
ANONYMOUS = "STOW-RS"
RETRY_AFTER_SECONDS = 60
LINGER_SECONDS = 2.0


class HTTPError(Exception):
    """The request is refused with ``status``; ``str()`` is the message the client reads."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.headers = status, headers or {}


@dataclass(frozen=True)
class Endpoint:
    """What a request is checked against and stored into."""

    storage: Storage
    tokens: dict[str, str]  # token -> client name
    max_body_bytes: int
    parts_dir: Path
    network_timeout: float


@dataclass(frozen=True)
class Outcome:
    sop_class_uid: str
    sop_instance_uid: str
    status: int

    @property
    def failure_reason(self) -> int:
        # DICOMweb's code for "the node failed, try again" (the DIMSE answer is 0xC211)
        return FailureReason.PROCESSING_FAILURE if self.status == StoreStatus.PROCESSING_FAILURE else self.status


def answer(outcomes: list[Outcome]) -> tuple[HTTPStatus, bytes]:
    """The STOW-RS answer (PS3.18 10.5.3): 200 when every instance was stored, 202 when
    some were, 503 when none was and only for reasons that pass (out of resources, the
    node failing), else 409; the body lists stored and failed instances (DICOM JSON)."""
    dataset = Dataset()
    stored = [o for o in outcomes if o.status == StoreStatus.SUCCESS]
    failed = [o for o in outcomes if o.status != StoreStatus.SUCCESS]
    if stored:
        dataset.ReferencedSOPSequence = [_reference(o) for o in stored]
    if failed:
        dataset.FailedSOPSequence = [_reference(o) for o in failed]
        for item, outcome in zip(dataset.FailedSOPSequence, failed, strict=True):
            item.FailureReason = outcome.failure_reason
    if not failed:
        status = HTTPStatus.OK
    elif stored:
        status = HTTPStatus.ACCEPTED
    elif all(is_transient(o.failure_reason) for o in failed):
        status = HTTPStatus.SERVICE_UNAVAILABLE
    else:
        status = HTTPStatus.CONFLICT
    return status, json.dumps(dataset.to_json_dict()).encode()


def _reference(outcome: Outcome) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = outcome.sop_class_uid
    item.ReferencedSOPInstanceUID = outcome.sop_instance_uid
    return item


@dataclass(frozen=True)
class Instance:
    """A part checked to be a DICOM file (PS3.10): its file meta's UIDs, and where its data set starts."""

    part: Part
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: UID
    data_set_start: int

    def request(self, parts_file: BinaryIO, client: str) -> StoreRequest:
        """The C-STORE handler's request: the data set's bytes after the file meta, as received."""
        data_set = self.part.read(parts_file, self.data_set_start)
        return StoreRequest(
            client, self.sop_class_uid, self.sop_instance_uid, self.sop_class_uid, self.transfer_syntax, data_set
        )


def check_part(part: Part, parts_file: BinaryIO, number: int) -> Instance:
    """Read a part's file meta only; 415 when it is not application/dicom, 400 when it is
    not a DICOM file."""
    where = f"part {number}"
    if part.content_type not in (None, "application/dicom"):
        raise HTTPError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, f"{where} is {part.content_type}, not application/dicom")
    head = part.read(parts_file, 0, 144)
    if head[128:132] != b"DICM":
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{where}: not a DICOM file (no DICM prefix, PS3.10 7.1)")
    try:
        group, element, vr, length, meta_length = struct.unpack("<HH2sHI", head[132:144])
    except struct.error:
        group, element, vr, length, meta_length = 0, 0, b"", 0, 0
    end = 144 + meta_length
    if (group, element, vr, length) != (2, 0, b"UL", 4) or end > part.size:
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{where}: its file meta does not start with its group length")
    try:
        meta = pydicom.dcmread(io.BytesIO(part.read(parts_file, 0, end))).file_meta
    except Exception as e:  # whatever pydicom raises on bad bytes
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{where}: unreadable file meta ({type(e).__name__})") from e
    sop_class, sop_instance = meta.get("MediaStorageSOPClassUID"), meta.get("MediaStorageSOPInstanceUID")
    syntax = meta.get("TransferSyntaxUID")
    if not (sop_class and sop_instance and syntax):
        raise HTTPError(HTTPStatus.BAD_REQUEST, f"{where}: no SOP Class, Instance or Transfer Syntax in its file meta")
    return Instance(part, str(sop_class), str(sop_instance), UID(str(syntax)), end)


class StowHandler(BaseHTTPRequestHandler):
    """One HTTP connection (keep-alive: several requests)."""

    server: "StowServer"
    protocol_version = "HTTP/1.1"

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.endpoint.network_timeout)  # a silent client costs this much
        self.server.opened(self.connection)

    def finish(self) -> None:
        self.server.closed(self.connection)
        super().finish()

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s: " + format, self.client_address[0], *args)

    def handle_expect_100(self) -> bool:
        """``Expect: 100-continue`` is answered in :meth:`do_POST`, after the headers are
        checked, so a refused client never sends its body."""
        return True

    def do_POST(self) -> None:
        with self.server.busy():
            try:
                self._answer()
            except OSError as e:  # the client went away; what was stored before stays stored
                self.close_connection = True
                log.warning("STOW-RS from %s: connection lost: %s", self.client_address[0], e)

    def _answer(self) -> None:
        try:
            client = self._client()
            body, boundary = self._checked_headers()
            if self.headers.get("Expect", "").lower() == "100-continue":
                self.send_response_only(HTTPStatus.CONTINUE)
                self.end_headers()
            status, answered = self._store(client, body, boundary)
        except HTTPError as e:
            log.warning("STOW-RS from %s refused: %d %s", self.client_address[0], e.status, e)
            self.close_connection = True  # its body may be unread
            self._send(e.status, str(e).encode(), "text/plain; charset=utf-8", e.headers)
            self._linger()
            return
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if status == HTTPStatus.SERVICE_UNAVAILABLE else {}
        self._send(status, answered, DICOM_JSON, headers)

    def _client(self) -> str:
        """The client's name: the one its bearer token is registered under (401 without a
        known token, when tokens are configured)."""
        tokens = self.server.endpoint.tokens
        if not tokens:
            return ANONYMOUS
        scheme, _, given = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer":
            offered = given.strip().encode()
            names = [name for token, name in tokens.items() if hmac.compare_digest(token.encode(), offered)]
            if names:
                return names[0]
        challenge = {"WWW-Authenticate": 'Bearer realm="radpipe"'}
        raise HTTPError(HTTPStatus.UNAUTHORIZED, "a known bearer token is required", challenge)

    def _checked_headers(self) -> tuple[Readable, str]:
        """The body and its multipart boundary, from a request that may be read."""
        if self.path.split("?")[0].rstrip("/") != "/studies":
            raise HTTPError(HTTPStatus.NOT_FOUND, "STOW-RS is at POST /studies")
        given = self.headers.get("Content-Type", "")
        content_type = Message()
        content_type["Content-Type"] = given
        kind, part_type = content_type.get_content_type(), content_type.get_param("type")
        if kind != "multipart/related" or not isinstance(part_type, str) or part_type.lower() != "application/dicom":
            raise HTTPError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                f'expected Content-Type: multipart/related; type="application/dicom", not {given[:100]!r}',
            )
        boundary = content_type.get_param("boundary")
        if not isinstance(boundary, str) or not boundary:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the multipart Content-Type has no boundary")
        return self._body(), boundary

    def _body(self) -> Readable:
        """The body as sent: chunked (its size is checked as it arrives) or of a Content-Length."""
        coding = self.headers.get("Transfer-Encoding")
        if coding is not None:
            if coding.strip().lower() != "chunked":
                raise HTTPError(HTTPStatus.NOT_IMPLEMENTED, f"Transfer-Encoding {coding} is not supported (chunked is)")
            return ChunkedReader(self.rfile)
        if "Content-Length" not in self.headers:
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "a Content-Length or chunked Transfer-Encoding is required")
        try:
            length = int(self.headers["Content-Length"])
        except ValueError:
            length = -1
        if length < 0:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "the Content-Length is not a number of bytes")
        limit = self.server.endpoint.max_body_bytes
        if length > limit:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"the body may have at most {limit} bytes")
        return LengthReader(self.rfile, length)

    def _store(self, client: str, body: Readable, boundary: str) -> tuple[HTTPStatus, bytes]:
        """Read the whole body, check every part, then store each instance as C-STORE does."""
        endpoint = self.server.endpoint
        storage = endpoint.storage
        try:
            with tempfile.TemporaryFile(dir=endpoint.parts_dir) as parts_file:  # unnamed: gone with a crash too
                limit = storage.limits.max_instance_bytes
                parts = read_parts(body, boundary, parts_file, limit, endpoint.max_body_bytes)
                instances = [check_part(part, parts_file, number) for number, part in enumerate(parts, 1)]
                # Every part is a DICOM file: now each is stored, one in memory at a time.
                outcomes = [
                    Outcome(i.sop_class_uid, i.sop_instance_uid, handle_store(i.request(parts_file, client), storage))
                    for i in instances
                ]
        except TooLarge as e:
            raise HTTPError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, str(e)) from e
        except MultipartError as e:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"malformed multipart body: {e}") from e
        except TimeoutError as e:
            raise HTTPError(HTTPStatus.REQUEST_TIMEOUT, "the body stopped arriving") from e
        except ConnectionError:
            raise  # the client went away
        except OSError as e:  # the temporary file: disk full, ...
            retry = {"Retry-After": str(RETRY_AFTER_SECONDS)}
            raise HTTPError(HTTPStatus.SERVICE_UNAVAILABLE, f"cannot hold the body: {e.strerror or e}", retry) from e
        status, reply = answer(outcomes)
        stored = sum(o.status == StoreStatus.SUCCESS for o in outcomes)
        peer = self.client_address[0]
        log.info("STOW-RS from %s (%s): %d of %d instance(s) stored", peer, client, stored, len(outcomes))
        return status, reply

    def _linger(self) -> None:
        """After a refusal, read and drop what the client still sends, for a moment: closing
        with its body unread would reset the connection, and the client could lose the answer."""
        with contextlib.suppress(OSError):
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(LINGER_SECONDS)
            deadline = time.monotonic() + LINGER_SECONDS
            while time.monotonic() < deadline and self.connection.recv(CHUNK):
                pass

    def _send(self, status: HTTPStatus, body: bytes, content_type: str, headers: dict[str, str]) -> None:
        self.server.endpoint.storage.metrics.stow_requests.labels(str(int(status))).inc()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)


class StowServer(ThreadingHTTPServer):
    """The listening port; each connection is served in its own thread (TLS handshake
    included, so a slow client holds up no other)."""

    daemon_threads = True  # stop() ends and joins them itself, within its deadline

    def __init__(self, address: tuple[str, int], endpoint: Endpoint, ssl_context: ssl.SSLContext | None) -> None:
        super().__init__(address, StowHandler)
        self.endpoint, self.ssl_context = endpoint, ssl_context
        self._lock = threading.Condition()
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._busy = 0
        self._thread = threading.Thread(target=self.serve_forever, name=f"stow-listener-{self.port}", daemon=True)

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def server_bind(self) -> None:
        """Bind without HTTPServer's reverse DNS lookup of the address (slow, or hanging, offline)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.port

    def finish_request(self, request: socket.socket, client_address: tuple[str, int]) -> None:  # type: ignore[override]
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(self.endpoint.network_timeout)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError) as e:  # no or a refused client certificate, or not TLS at all
            log.warning("STOW-RS from %s: TLS handshake failed: %s", client_address[0], e)
            return
        with tls:
            super().finish_request(tls, client_address)

    def handle_error(self, request: object, client_address: object) -> None:
        log.error("STOW-RS connection from %s failed", client_address, exc_info=True)

    def opened(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections[connection] = threading.current_thread()

    def closed(self, connection: socket.socket) -> None:
        with self._lock:
            self._connections.pop(connection, None)

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Marks a request in progress: stop() lets it finish (within its deadline)."""
        with self._lock:
            self._busy += 1
        try:
            yield
        finally:
            with self._lock:
                self._busy -= 1
                self._lock.notify_all()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float) -> None:
        """Stop accepting, let requests in progress finish, close idle connections, and
        wait for their threads, all within ``timeout``."""
        deadline = time.monotonic() + timeout
        if self._thread.is_alive():
            self.shutdown()
        self.server_close()
        with self._lock:
            self._lock.wait_for(lambda: self._busy == 0, max(0.0, deadline - time.monotonic()))
            connections = dict(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        for thread in connections.values():
            thread.join(max(0.0, deadline - time.monotonic()))


def read_tokens(files: dict[str, Path]) -> dict[str, str]:
    """token -> client name, from the token files (read once, at start: a missing or
    empty file stops the start)."""
    tokens = {}
    for name, path in files.items():
        token = path.read_text().strip()
        if not token:
            raise ValueError(f"node.dicomweb.tokens.{name}: {path} is empty")
        tokens[token] = name
    return tokens


def start_stow_server(settings: NodeSection, storage: Storage, parts_dir: Path) -> StowServer | None:
    """Start the STOW-RS endpoint when ``node.dicomweb.port`` is set; None when it is not."""
    web = settings.dicomweb
    if web.port is None:
        return None
    endpoint = Endpoint(
        storage=storage,
        tokens=read_tokens(web.tokens),
        max_body_bytes=web.max_body_mb * 2**20,
        parts_dir=parts_dir,
        network_timeout=settings.network_timeout_seconds,
    )
    server = StowServer((web.host, web.port), endpoint, server_ssl_context(web.tls) if web.tls.cert else None)
    server.start()
    auth = "bearer tokens" if endpoint.tokens else "no token"
    if web.tls.cert and web.tls.require_client_cert:
        auth += ", client certificates"
    log.info("STOW-RS on %s://%s:%d/studies (%s)", "https" if web.tls.cert else "http", web.host, server.port, auth)
    return server
