"""The router: which loaded pipelines want a series, judged on one instance's header."""

import threading
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from plugin.pipeline import Pipeline


class UnreadableFile(Exception):
    """A file whose header cannot be read; ``str()`` says why in a few words."""


def read_header(path: Path) -> Dataset:
    """A DICOM file's header, up to Pixel Data, as routing sees it."""
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)
    except OSError as e:
        raise UnreadableFile(e.strerror or str(e)) from e
    except InvalidDicomError as e:
        raise UnreadableFile("not a DICOM file (no DICM prefix after the 128-byte preamble)") from e
    except Exception as e:  # pydicom raises many kinds on damaged data: each is one line, not a traceback
        raise UnreadableFile(f"damaged DICOM file: {e}") from e


@dataclass(frozen=True)
class Verdict:
    """Whether a pipeline matches a dataset; ``failure`` says why not (None: it matches)."""

    pipeline: Pipeline
    failure: str | None

    @property
    def matches(self) -> bool:
        return self.failure is None


class Router:
    """Holds the current pipeline set; :meth:`replace` swaps it atomically. Every version
    ever loaded stays reachable by its hash, so a job runs on the version it was routed with."""

    def __init__(self, pipelines: list[Pipeline]) -> None:
        self._lock = threading.Lock()
        self._pipelines: list[Pipeline] = []
        self._versions: dict[str, Pipeline] = {}
        self.replace(pipelines)

    def replace(self, pipelines: list[Pipeline]) -> None:
        with self._lock:
            self._pipelines = list(pipelines)
            self._versions.update({p.sha256: p for p in pipelines})

    @property
    def pipelines(self) -> list[Pipeline]:
        with self._lock:
            return list(self._pipelines)

    def version(self, sha256: str) -> Pipeline | None:
        with self._lock:
            return self._versions.get(sha256)

    def explain(self, header: Dataset) -> list[Verdict]:
        """A shadow takes only what its live pipeline takes (and its own rule accepts)."""
        pipelines = self.pipelines
        failures = {p.name: p.rule.failure(header) for p in pipelines}
        return [
            Verdict(
                p,
                failures[p.name]
                or (
                    f"shadows {p.shadow_of}, which does not take it"
                    if p.shadow_of is not None and failures.get(p.shadow_of) is not None
                    else None
                ),
            )
            for p in pipelines
        ]

    def matching(self, header: Dataset) -> list[Pipeline]:
        return [v.pipeline for v in self.explain(header) if v.matches]
