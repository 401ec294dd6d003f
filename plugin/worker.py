"""The base of every background thread: a loop with a stop event."""

import logging
import threading

from plugin.journal import JournalUnavailable

log = logging.getLogger(__name__)


class Worker(threading.Thread):
    """Calls :meth:`step` until stopped; waits up to ``interval`` seconds whenever a step
    found nothing to do. An exception in a step is logged and the loop goes on: one bad
    job must never stop the node. An unreachable journal is not logged here: the journal
    tells of its outage itself, once (every loop's every poll fails while it lasts).

    ``next_stage`` is the worker that consumes what this one produces (assembler ->
    runner -> dispatcher): after a step that did work it is woken at once instead of
    finding the work at its next poll, which takes the polling out of result latency.
    Workers that take the same work (the runner's lanes) share ``woken``: waking one wakes
    them all."""

    interval = 0.2
    next_stage: "Worker | None" = None  # set when the stages are wired (plugin/app.py)

    def __init__(self, name: str, woken: threading.Event | None = None) -> None:
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()
        self._woken = woken or threading.Event()

    def step(self) -> bool:
        """Do one unit of work; return True if there may be more right away."""
        raise NotImplementedError

    def wake(self) -> None:
        self._woken.set()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.step()
            except JournalUnavailable:
                busy = False
            except Exception:
                log.exception("%s: unexpected error; continuing", self.name)
                busy = False
            if busy and self.next_stage is not None:
                self.next_stage.wake()
            if not busy:
                self._woken.wait(self.interval)
                self._woken.clear()

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        self._woken.set()
        if self.is_alive():
            self.join(timeout)
