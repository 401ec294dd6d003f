"""Hot reload: edits in the pipelines folder take effect without a restart.

watchdog reports every create/modify/move/delete; once the folder has been quiet for
``debounce`` seconds (editors write in several steps), the whole set is validated and
its models are warmed. Only then does the router switch to it, atomically. An invalid
set leaves the last good one running, is logged with every ``file:line:column`` error,
and counts ``radpipe_config_reloads_total{result="error"}``. Jobs already queued keep the
pipeline version they were routed with (the router keeps every version by hash).
"""

import logging
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from plugin.metrics import Metrics
from plugin.models.artifact import ArtifactError
from plugin.models.pool import ModelPool
from plugin.pipeline import PipelineError, load_pipelines
from plugin.router import Router
from plugin.worker import Worker

log = logging.getLogger(__name__)


class _Changes(FileSystemEventHandler):
    def __init__(self) -> None:
        self.pending = threading.Event()
        self.last = 0.0

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type in ("opened", "closed_no_write"):
            return  # reads (including our own) change nothing
        self.last = time.monotonic()
        self.pending.set()


class PipelineReloader(Worker):
    interval = 0.1

    def __init__(
        self,
        directory: Path,
        router: Router,
        destinations: set[str],
        pool: ModelPool | None,
        metrics: Metrics,
        debounce: float = 0.3,
    ) -> None:
        super().__init__("pipeline-reloader")
        self._directory = directory
        self._router = router
        self._destinations = destinations
        self._pool = pool
        self._metrics = metrics
        self._debounce = debounce
        self._changes = _Changes()
        self._observer = Observer()
        self._observer.name = "pipeline-watcher"

    def start(self) -> None:
        self._directory.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(self._changes, str(self._directory), recursive=False)
        self._observer.start()
        super().start()

    def stop(self, timeout: float = 10.0) -> None:
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join(timeout)
        super().stop(timeout)

    def step(self) -> bool:
        if self._changes.pending.is_set() and time.monotonic() - self._changes.last >= self._debounce:
            self._changes.pending.clear()
            self.reload()
        return False

    def reload(self) -> bool:
        """Validate the folder as a whole and swap it in; False (and the old set kept) on error.
        A node with a model pool (one that infers) warms the set's models first; others
        never load a model."""
        try:
            pipelines = load_pipelines(self._directory, self._destinations)
            if self._pool is not None:
                for pipeline in pipelines:
                    self._pool.get(pipeline)
        except (PipelineError, ArtifactError) as e:
            log.error("pipeline change rejected; the previous pipelines stay active:\n%s", e)
            self._metrics.config_reloads.labels("error").inc()
            return False
        before = {p.name: p.version for p in self._router.pipelines}
        self._router.replace(pipelines)
        for pipeline in pipelines:
            self._metrics.add_pipeline_labels(pipeline.name, pipeline.destinations_in(sorted(self._destinations)))
        after = {p.name: p.version for p in pipelines}
        log.info(
            "pipelines reloaded: %s",
            ", ".join(f"{name} v{version}" for name, version in after.items()) or "none",
        )
        for name in before.keys() - after.keys():
            log.info("pipeline %s removed", name)
        self._metrics.config_reloads.labels("ok").inc()
        return True
