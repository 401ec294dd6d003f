"""Log lines that say which association, job or delivery they belong to, and never
who the patient is.

Handlers and workers wrap their work in :func:`log_context`; a filter on the output
handler copies that id into every record, so modules keep logging with plain
``getLogger(__name__)`` calls. Work on one study also carries the study's trace id
(:func:`trace_id`), the same at every stage and on every node, so one study can be
followed from receipt to delivery. Only ``cli.py`` calls :func:`configure` (STYLE 8).
Every event is one line, in text or JSON, so tracebacks do not break line-based shippers.

Patient identity: work on a patient's data runs inside :func:`redacting` with that
patient's identifying values, and every record logged there has them replaced, in its
message and its traceback, whatever logger wrote it. Python warnings become log records
(libraries warn with the offending value in quotes, e.g. highdicom's "unlikely to
represent the intended person name"), and quoted text in a library's record is replaced
too, for values nobody registered. Uncaught exceptions of threads are logged the same way,
so stderr carries nothing but records.
"""

import hashlib
import json
import logging
import os
import re
import sys
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from types import TracebackType
from typing import TextIO

from pydicom import Dataset
from pydicom.multival import MultiValue

NO_CONTEXT = "-"
# The id of what the current thread is working on: assoc-<n>, job-<id>, job-<id>/<destination>.
current_context: ContextVar[str] = ContextVar("radpipe_log_context", default=NO_CONTEXT)
# The trace id of the study the current thread works on (:func:`trace_id`).
current_trace: ContextVar[str] = ContextVar("radpipe_trace", default=NO_CONTEXT)
# Identifying values of the patient whose data the current thread works on.
_identifying: ContextVar[tuple[str, ...]] = ContextVar("radpipe_identifying", default=())

REDACTED = "***"
# Attributes whose values identify the patient (from PS3.15 E.1-1, the ones a header of
# an image carries in practice); their values are never logged.
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientBirthName",
    "PatientMotherBirthName",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "AccessionNumber",
    "MedicalRecordLocator",
)
# Shorter values cannot be told from ordinary words and numbers in a message.
MIN_REDACTED_LENGTH = 3
# What a library quotes in a warning or log record is usually a value from the data.
_QUOTED = re.compile(r"""(["'])[^"'\n]{1,256}\1""")

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s trace=%(trace)s [%(threadName)s %(context)s] %(message)s"
TRACE_DIGITS = 16


def trace_id(study_uid: str) -> str:
    """A study's trace id: the first 16 hex digits of the SHA-256 of its Study Instance
    UID. Every stage and node derives the same one without coordination; short and
    greppable, and it does not give the UID away."""
    return hashlib.sha256(study_uid.encode("ascii", "replace")).hexdigest()[:TRACE_DIGITS]


@contextmanager
def log_context(value: str | None = None, study_uid: str | None = None) -> Iterator[None]:
    """Tag every record logged inside the block (in this thread) with ``value`` (None:
    the enclosing one) and, given ``study_uid``, with its :func:`trace_id` (otherwise
    the enclosing one, or what :func:`follow` sets inside)."""
    tokens = (
        current_context.set(current_context.get() if value is None else value),
        current_trace.set(current_trace.get() if study_uid is None else trace_id(study_uid)),
    )
    try:
        yield
    finally:
        current_trace.reset(tokens[1])
        current_context.reset(tokens[0])


def follow(study_uid: str) -> None:
    """Tag the rest of the enclosing :func:`log_context` block with the study's trace
    id: for a handler that learns the study only from the data it reads."""
    current_trace.set(trace_id(study_uid))


def identifying_values(datasets: Iterable[Dataset]) -> tuple[str, ...]:
    """The values of :data:`IDENTIFYING_KEYWORDS` in ``datasets`` (and each component of
    a person name), longest first, so that a name is replaced before its parts."""
    values: set[str] = set()
    for dataset in datasets:
        for keyword in IDENTIFYING_KEYWORDS:
            value = dataset.get(keyword)
            for item in value if isinstance(value, MultiValue) else [value]:
                text = str(item or "").strip()
                values.update({text, *(part.strip() for part in re.split(r"[\^=]", text))})
    return tuple(sorted((v for v in values if len(v) >= MIN_REDACTED_LENGTH), key=len, reverse=True))


@contextmanager
def redacting(values: Iterable[str]) -> Iterator[None]:
    """Replace ``values`` (see :func:`identifying_values`) in every record logged inside
    the block, in this thread, and in what :func:`scrub` returns there."""
    token = _identifying.set(tuple(sorted({*_identifying.get(), *values}, key=len, reverse=True)))
    try:
        yield
    finally:
        _identifying.reset(token)


def scrub(text: str) -> str:
    """``text`` without the identifying values of the current :func:`redacting` block
    (for what is stored or printed beside the logs, such as a job's error)."""
    for value in _identifying.get():
        text = text.replace(value, REDACTED)
    return text


class ContextFilter(logging.Filter):
    """Adds ``record.context`` and ``record.trace``; put it on the handler so records of
    every logger get them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "context"):
            record.context = current_context.get()
        if not hasattr(record, "trace"):
            record.trace = current_trace.get()
        return True


class ScrubFilter(logging.Filter):
    """Replaces patient identity in a record's message and traceback, once, before any
    formatter sees it: the values of the current :func:`redacting` block, and in records
    of libraries (Python warnings included), whatever they quote."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "scrubbed", False):
            return True
        library = not record.name.startswith("plugin")
        message = scrub(record.getMessage())
        record.msg, record.args = (_QUOTED.sub(rf"\1{REDACTED}\1", message) if library else message), ()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        record.exc_info = None  # formatters use the scrubbed exc_text
        record.scrubbed = True
        return True


# Control characters, escaped in text lines: newlines of tracebacks, and whatever a peer or
# a data set puts in a value that ends up in a message (a carriage return would forge a line).
_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(32), 127] if code != 9} | {10: "\\n", 13: "\\r"}


class OneLineFormatter(logging.Formatter):
    """The text format, with newlines (tracebacks, multi-line messages) and every other
    control character escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).translate(_ESCAPES)


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, context, trace,
    message, and the traceback as ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "context": getattr(record, "context", NO_CONTEXT),
            "trace": getattr(record, "trace", NO_CONTEXT),
            "message": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, ensure_ascii=False)


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None:
        thread = args.thread.name if args.thread is not None else "?"
        logging.getLogger(__name__).critical("uncaught exception in thread %s", thread, exc_info=args.exc_value)


def _log_uncaught(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    logging.getLogger(__name__).critical("uncaught exception", exc_info=value)


def _stderr_as_records() -> TextIO:
    """Turn file descriptor 2 into a pipe whose lines become records of logger ``stderr``:
    what C libraries (openjpeg's decoder messages) and child processes write there.
    Returns the real stderr, for the log handler itself."""
    real = os.fdopen(os.dup(2), "w", buffering=1, encoding="utf-8", errors="backslashreplace")
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        with os.fdopen(read_end, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if line.strip():
                    logging.getLogger("stderr").warning("%s", line.rstrip())

    threading.Thread(target=pump, name="stderr", daemon=True).start()
    return real


def configure(level: str, log_format: str = "text") -> None:
    """Log to stderr in ``log_format`` ("text" or "json") at ``level``: every record,
    Python warnings and threads' uncaught exceptions included, one line each, scrubbed.
    In JSON mode, anything else written to stderr becomes a record too."""
    handler = logging.StreamHandler(_stderr_as_records() if log_format == "json" else None)
    handler.addFilter(ContextFilter())
    handler.addFilter(ScrubFilter())
    handler.setFormatter(JSONFormatter() if log_format == "json" else OneLineFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    logging.captureWarnings(True)
    threading.excepthook = _log_uncaught_in_thread
    sys.excepthook = _log_uncaught
