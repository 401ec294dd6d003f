"""Preparing a job's images for the model: decode each instance and preprocess it, on
worker processes ahead of the model when the machine has cores to spare.

pydicom's parsing holds the GIL, so threads would not spread it over cores; processes
do. The pool starts once and stays warm (each worker imports torch once, runs one torch
thread). Images come back in order and at most ``2 x workers`` instances ahead, so a
large series never piles up in memory. With no workers the same function runs in the
runner's thread: the results are identical either way.
"""

import dataclasses
import logging
import multiprocessing
import time
import warnings
from collections import deque
from collections.abc import Generator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np
import torch

from plugin.loader import PixelDataError, Source, decoded_frames
from plugin.preprocess import PreprocessStep, preprocess

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Prepared:
    """One instance's images ``[F, C, H, W]``, or why its pixels could not be decoded."""

    images: np.ndarray | None
    error: str | None
    decode_seconds: float
    preprocess_seconds: float
    warnings: tuple[str, ...] = ()  # Python warnings raised in a worker process, for the node to log


def prepare(source: Source, steps: list[PreprocessStep]) -> Prepared:
    """Decode one instance and preprocess its frames."""
    start = time.perf_counter()
    try:
        frames = decoded_frames(source)
    except Exception as e:  # decoders raise many types; all mean the same to the job
        return Prepared(None, f"{type(e).__name__}: {e}", time.perf_counter() - start, 0.0)
    decoded = time.perf_counter()
    images = preprocess(steps, torch.from_numpy(frames)[:, None]).numpy()
    return Prepared(images, None, decoded - start, time.perf_counter() - decoded)


def _prepare_in_worker(source: Source, steps: list[PreprocessStep]) -> Prepared:
    """:func:`prepare` in a worker process. Its stderr is not the node's log, so its
    Python warnings (a decoder's complaint may quote a patient's value) come back with the
    result and the node logs them, scrubbed, like its own."""
    with warnings.catch_warnings(record=True) as caught:
        prepared = prepare(source, steps)
    return dataclasses.replace(prepared, warnings=tuple(str(w.message) for w in caught))


def _one_torch_thread() -> None:
    torch.set_num_threads(1)


class WorkerDied(Exception):
    """A worker process died while preparing a job's images (a decoder crashed, or the
    process was killed). The job fails and can be retried; the pool is started again."""


class Preparer:
    """Prepares images with ``workers`` processes (0: in the calling thread). A decoder
    that crashes takes down one worker process, not the node."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self._executor = self._start() if workers else None
        if workers:
            log.info("decoding and preprocessing on %d worker process(es)", workers)

    def _start(self) -> ProcessPoolExecutor:
        # forkserver: forking a process that runs threads (this node) is unsafe.
        context = multiprocessing.get_context("forkserver")
        return ProcessPoolExecutor(self.workers, mp_context=context, initializer=_one_torch_thread)

    def images(
        self, sources: Sequence[Source], steps: list[PreprocessStep]
    ) -> Generator[tuple[Source, Prepared], None, None]:
        """Each source with its prepared images, in order; raises :class:`PixelDataError`
        for the first that cannot be decoded, :class:`WorkerDied` if a worker died."""
        if self._executor is None:
            for source in sources:
                yield source, self._checked(source, prepare(source, steps))
            return
        executor = self._executor
        pending: deque[tuple[Source, Future[Prepared]]] = deque()
        remaining = iter(sources)
        try:
            for source in remaining:
                pending.append((source, executor.submit(_prepare_in_worker, source, steps)))
                if len(pending) >= 2 * self.workers:
                    break
            while pending:
                source, future = pending.popleft()
                following = next(remaining, None)
                if following is not None:
                    pending.append((following, executor.submit(_prepare_in_worker, following, steps)))
                prepared = future.result()
                for message in prepared.warnings:
                    logging.getLogger("py.warnings").warning("%s", message)
                yield source, self._checked(source, prepared)
        except BrokenProcessPool as e:
            log.error("a decode worker process died; starting the pool again")
            executor.shutdown(wait=True, cancel_futures=True)
            self._executor = self._start()
            raise WorkerDied(f"a decode worker process died: {e}") from e
        finally:
            for _, future in pending:
                future.cancel()

    @staticmethod
    def _checked(source: Source, prepared: Prepared) -> Prepared:
        if prepared.error is not None:
            raise PixelDataError(source, RuntimeError(prepared.error))
        return prepared

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
