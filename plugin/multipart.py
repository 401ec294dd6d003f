"""Streaming ``multipart/related`` parsing (RFC 2046 5.1) for STOW-RS request bodies.

The body (of a Content-Length, or chunked) is read in bounded chunks from the socket, at
most a given size, and every part's content is written
to one temporary file, so memory stays bounded whatever the body's size; what is kept
per part is its headers and where its bytes lie in that file. Every malformed byte
sequence (no boundary, headers too long, a body that ends before its close delimiter)
is one :class:`MultipartError`, raised before the caller has acted on any part, so a
bad body leaves nothing half-done.
"""

from collections.abc import Callable
from dataclasses import dataclass
from email.message import Message
from email.parser import BytesHeaderParser
from io import BufferedIOBase
from typing import BinaryIO, Protocol

CHUNK = 64 * 1024
MAX_HEADER_BYTES = 16 * 1024  # one part's header block
MAX_PREAMBLE_BYTES = 64 * 1024
MAX_LINE_BYTES = 256  # a delimiter's transport padding (RFC 2046), a chunk size or trailer line


class Readable(Protocol):
    def read(self, size: int, /) -> bytes: ...


class MultipartError(ValueError):
    """The body is not a well-formed multipart body (HTTP 400)."""


class TooLarge(MultipartError):
    """The body, or one part, is larger than allowed (HTTP 413)."""


class LengthReader:
    """A request body of ``Content-Length`` bytes: read to its end, then b""."""

    def __init__(self, stream: Readable, length: int) -> None:
        self._stream, self._left = stream, length

    def read(self, size: int, /) -> bytes:
        if self._left <= 0:
            return b""
        chunk = self._stream.read(min(size, self._left))
        if not chunk:
            raise MultipartError(f"the body ended {self._left} bytes before its Content-Length")
        self._left -= len(chunk)
        return chunk


class ChunkedReader:
    """A request body in the chunked transfer coding (RFC 9112 7.1), as Orthanc's DICOMweb
    client sends it: decoded, then b"" after the last chunk and its trailer."""

    def __init__(self, stream: BufferedIOBase) -> None:
        self._stream = stream
        self._left = 0  # of the current chunk
        self._done = False

    def _line(self) -> bytes:
        line = self._stream.readline(MAX_LINE_BYTES)
        if not line.endswith(b"\n"):
            raise MultipartError("a chunk size or trailer line is malformed or cut off")
        return line

    def read(self, size: int, /) -> bytes:
        if self._done:
            return b""
        if self._left == 0:
            try:
                self._left = int(self._line().split(b";")[0], 16)
            except ValueError:
                self._left = -1
            if self._left < 0:
                raise MultipartError("a chunk size is not a hexadecimal number")
            if self._left == 0:
                while self._line().strip():  # trailer fields, up to the empty line
                    pass
                self._done = True
                return b""
        chunk = self._stream.read(min(size, self._left))
        if not chunk:
            raise MultipartError("the body ended inside a chunk")
        self._left -= len(chunk)
        if self._left == 0 and self._stream.read(2) != b"\r\n":
            raise MultipartError("a chunk does not end with CRLF")
        return chunk


@dataclass(frozen=True)
class Part:
    """One part: its headers, and its content's place in the parts file."""

    headers: Message
    offset: int
    size: int

    @property
    def content_type(self) -> str | None:
        return self.headers.get_content_type() if "Content-Type" in self.headers else None

    def read(self, parts_file: BinaryIO, start: int = 0, end: int | None = None) -> bytes:
        """The content's bytes from ``start`` to ``end`` (default: its end)."""
        end = self.size if end is None else min(end, self.size)
        parts_file.seek(self.offset + start)
        return parts_file.read(max(0, end - start))


class _Reader:
    """Reads a body (to its end, at most ``max_bytes``) through a small look-ahead buffer."""

    def __init__(self, stream: Readable, max_bytes: int, prefix: bytes) -> None:
        self._stream = stream
        self._max_bytes = max_bytes
        self._read = 0
        self._buffer = prefix

    def _fill(self) -> bool:
        """Read one more chunk; False at the end of the body."""
        chunk = self._stream.read(CHUNK)
        self._read += len(chunk)
        if self._read > self._max_bytes:
            raise TooLarge(f"the body is larger than {self._max_bytes} bytes")
        self._buffer += chunk
        return bool(chunk)

    def peek(self, n: int) -> bytes:
        while len(self._buffer) < n and self._fill():
            pass
        return self._buffer[:n]

    def skip(self, n: int) -> None:
        self._buffer = self._buffer[n:]

    def read_until(self, marker: bytes, sink: Callable[[bytes], object], limit: int, what: str) -> int:
        """Pass everything before ``marker`` to ``sink`` and consume the marker; returns
        how many bytes went to ``sink``. Raises when more than ``limit`` bytes come first
        (:class:`TooLarge` for a part's content) or the body ends."""
        passed = 0
        keep = len(marker) - 1  # a marker split across two chunks is found in the next
        while True:
            found = self._buffer.find(marker)
            if found >= 0:
                head, self._buffer = self._buffer[:found], self._buffer[found + len(marker) :]
            else:
                head, self._buffer = self._buffer[: max(0, len(self._buffer) - keep)], self._buffer[-keep:]
            passed += len(head)
            if passed > limit:
                error = TooLarge if what == "part" else MultipartError
                raise error(f"{what} longer than {limit} bytes")
            sink(head)
            if found >= 0:
                return passed
            if not self._fill():
                raise MultipartError(f"the body ended inside the {what}, before the multipart close delimiter")

    def drain(self) -> None:
        """Read and drop the rest of the body (the epilogue), so the connection can be reused."""
        self._buffer = b""
        while self._fill():
            self._buffer = b""


def read_parts(
    stream: Readable, boundary: str, parts_file: BinaryIO, max_part_bytes: int, max_body_bytes: int
) -> list[Part]:
    """Parse a multipart body with ``boundary`` from ``stream`` (a :class:`LengthReader` or
    :class:`ChunkedReader`), every part's content appended to ``parts_file``. Raises
    :class:`MultipartError` (or :class:`TooLarge`) on anything malformed, having read no
    further than the fault."""
    if not 1 <= len(boundary) <= MAX_LINE_BYTES:  # RFC 2046 says 70; Orthanc's DICOMweb client sends more
        raise MultipartError(f"the boundary must have 1 to {MAX_LINE_BYTES} characters")
    reader = _Reader(stream, max_body_bytes, prefix=b"\r\n")  # a delimiter at the very start is found like any other
    delimiter = b"\r\n--" + boundary.encode("latin-1")
    reader.read_until(delimiter, lambda _: None, MAX_PREAMBLE_BYTES, "preamble")
    parts: list[Part] = []
    while True:
        if reader.peek(2) == b"--":  # the close delimiter: what follows is the epilogue
            reader.drain()
            if not parts:
                raise MultipartError("the body holds no part")
            return parts
        padding = bytearray()
        reader.read_until(b"\r\n", padding.extend, MAX_LINE_BYTES, "delimiter line")
        if padding.strip(b" \t"):
            raise MultipartError("a boundary delimiter is followed by other characters than white space")
        header_block = bytearray()
        if reader.peek(2) == b"\r\n":  # no headers at all
            reader.skip(2)
        else:
            reader.read_until(b"\r\n\r\n", header_block.extend, MAX_HEADER_BYTES, "part headers")
        headers = BytesHeaderParser().parsebytes(bytes(header_block) + b"\r\n\r\n")
        if headers.defects:
            raise MultipartError(f"part {len(parts) + 1}: malformed headers ({headers.defects[0].__class__.__name__})")
        offset = parts_file.tell()
        size = reader.read_until(delimiter, parts_file.write, max_part_bytes, "part")
        parts.append(Part(headers, offset, size))
