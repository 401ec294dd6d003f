"""Log lines that say which association, job or delivery they belong to.

Handlers and workers wrap their work in :func:`log_context`; a filter on the output
handler copies that id into every record, so modules keep logging with plain
``getLogger(__name__)`` calls. Only ``cli.py`` calls :func:`configure` (STYLE 8).
Every event is one line, in text or JSON, so tracebacks do not break line-based shippers.
"""

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime

NO_CONTEXT = "-"
# The id of what the current thread is working on: assoc-<n>, job-<id>, job-<id>/<destination>.
current_context: ContextVar[str] = ContextVar("radpipe_log_context", default=NO_CONTEXT)

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(threadName)s %(context)s] %(message)s"


@contextmanager
def log_context(value: str) -> Iterator[None]:
    """Tag every record logged inside the block (in this thread) with ``value``."""
    token = current_context.set(value)
    try:
        yield
    finally:
        current_context.reset(token)


class ContextFilter(logging.Filter):
    """Adds ``record.context``; put it on the handler so records of every logger get it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "context"):
            record.context = current_context.get()
        return True


class OneLineFormatter(logging.Formatter):
    """The text format, with newlines (tracebacks, multi-line messages) escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", "\\n")


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, context, message,
    and the traceback as ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "context": getattr(record, "context", NO_CONTEXT),
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(level: str, log_format: str = "text") -> None:
    """Log to stderr in ``log_format`` ("text" or "json") at ``level``."""
    handler = logging.StreamHandler()
    handler.addFilter(ContextFilter())
    handler.setFormatter(JSONFormatter() if log_format == "json" else OneLineFormatter(TEXT_FORMAT))
    logging.basicConfig(level=level, handlers=[handler], force=True)
