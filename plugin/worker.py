"""The base of every background thread: a loop with a stop event."""

import logging
import threading

log = logging.getLogger(__name__)


class Worker(threading.Thread):
    """Calls :meth:`step` until stopped; sleeps ``interval`` seconds whenever a step found
    nothing to do. An exception in a step is logged and the loop goes on: one bad job
    must never stop the node."""

    interval = 0.2

    def __init__(self, name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.stopping = threading.Event()

    def step(self) -> bool:
        """Do one unit of work; return True if there may be more right away."""
        raise NotImplementedError

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                busy = self.step()
            except Exception:
                log.exception("%s: unexpected error; continuing", self.name)
                busy = False
            if not busy:
                self.stopping.wait(self.interval)

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        if self.is_alive():
            self.join(timeout)
