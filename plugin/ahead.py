"""Inference ahead of completion: the model runs on a series while it is still arriving.

A series becomes a job only once it is complete (its quiet period over), and until then
the runner would sit idle while the associations receive. Instead, on a node that both
receives and infers, the C-STORE handler hands each instance it made durable to the
runner (``arrivals``), and whenever the runner has no job it runs every series-level
slice pipeline that takes the instance's series on it: decode, preprocess and model, as
the job would. Each instance's logits wait here, with the time each stage took, keyed by
the pipeline version, the model and the receipt (file and time received). When the
series' job comes and every one of its images was inferred ahead, the job takes those
logits and goes straight to its result; otherwise it runs as if nothing had been done
ahead.

Nothing here is durable or needed: a restart, a reloaded pipeline or model, or a job
claimed by another node just finds no logits. Study-level pipelines are left to their
job, which chooses among the study's series only once it is complete.
"""

import logging
import time
from collections import OrderedDict, deque
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import torch
from pydicom import Dataset

from plugin.journal import InstanceRecord
from plugin.loader import PixelDataError, Source, is_image, journaled_source
from plugin.logs import identifying_values, redacting
from plugin.metrics import Metrics
from plugin.models.artifact import Artifact
from plugin.models.pool import ModelPool
from plugin.pipeline import Pipeline
from plugin.prepare import Preparer
from plugin.router import Router, UnreadableFile, read_header

log = logging.getLogger(__name__)

_STEP = 64  # instances inferred per step, at most: a job that becomes due waits for no more
_CAPACITY = 16384  # instances' logits kept (a few studies' worth); the oldest go first

Key = tuple[str, str, str, float]  # pipeline version, model, file, time received
Decoded = tuple[Source, torch.Tensor, float, float]  # an instance's images, its decode and preprocess seconds


@dataclass(frozen=True)
class Inferred:
    """One instance's logits (a row per frame) and what making them took, per stage."""

    logits: torch.Tensor
    seconds: dict[str, float]  # load, preprocess, infer: the runner's stages


class Ahead:
    """The runner's work between jobs (:meth:`step`), and what a job takes of it (:meth:`take`),
    in the runner's thread; the associations' threads fill ``arrivals`` (a deque's append
    and popleft are atomic)."""

    def __init__(
        self, arrivals: deque[InstanceRecord], router: Router, pool: ModelPool, preparer: Preparer, metrics: Metrics
    ) -> None:
        self._arrivals, self._router, self._pool, self._preparer = arrivals, router, pool, preparer
        self._metrics = metrics
        self._inferred: OrderedDict[Key, Inferred] = OrderedDict()

    @staticmethod
    def _key(pipeline: Pipeline, artifact: Artifact, source: Source) -> Key | None:
        if source.received_at is None:
            return None
        return (pipeline.sha256, artifact.sha256, source.path, source.received_at)

    def step(self) -> bool:
        """Infer the instances that arrived next; False if none did."""
        fresh = [self._arrivals.popleft() for _ in range(min(_STEP, len(self._arrivals)))]
        if not fresh:
            return False
        by_series: dict[str, list[InstanceRecord]] = {}
        for record in fresh:
            by_series.setdefault(record.series_instance_uid, []).append(record)
        wanted: dict[str, tuple[Pipeline, list[Source], list[Dataset]]] = {}
        for records in by_series.values():
            try:  # routed as the assembler routes: on one file's whole header
                header = read_header(Path(records[0].path))
            except UnreadableFile:
                continue
            sources = [s for s in map(journaled_source, records) if is_image(s)]
            for pipeline in self._router.matching(header):
                if pipeline.input.kind == "slice" and pipeline.completion.level == "series":
                    _, taken, headers = wanted.setdefault(pipeline.sha256, (pipeline, [], []))
                    taken.extend(sources)
                    headers.append(header)
        for pipeline, sources, headers in wanted.values():
            try:
                with redacting(identifying_values(headers)):  # in what a decoder may warn
                    self._infer(pipeline, sources)
            except Exception as e:  # the job meets the same failure, and reports it
                log.debug("%s: not inferred ahead: %s", pipeline.name, type(e).__name__)
        return True

    def _infer(self, pipeline: Pipeline, sources: list[Source]) -> None:
        artifact = self._pool.get(pipeline)
        batch: list[Decoded] = []
        for decoded in self._decoded(pipeline, sources):
            batch.append(decoded)
            if sum(len(images) for _, images, _, _ in batch) >= pipeline.model.batch_size:
                self._keep(pipeline, artifact, batch)
                batch = []
        if batch:
            self._keep(pipeline, artifact, batch)

    def _decoded(self, pipeline: Pipeline, sources: list[Source]) -> Iterator[Decoded]:
        """Each source's preprocessed images, in order, but for those that cannot be
        decoded: their job fails on them and says why."""
        while sources:
            done = 0
            try:
                with closing(self._preparer.images(sources, pipeline.preprocess)) as prepared:
                    for source, item in prepared:
                        done += 1
                        assert item.images is not None  # the preparer raises for an undecodable one
                        yield source, torch.from_numpy(item.images), item.decode_seconds, item.preprocess_seconds
                return
            except PixelDataError:
                sources = sources[done + 1 :]

    def _keep(self, pipeline: Pipeline, artifact: Artifact, batch: list[Decoded]) -> None:
        start = time.perf_counter()
        logits = self._pool.infer(artifact, torch.cat([images for _, images, _, _ in batch]))
        share = (time.perf_counter() - start) / len(logits)
        self._metrics.inference_batch_size.observe(len(logits))
        rows = logits.split([len(images) for _, images, _, _ in batch])
        for (source, images, load, preprocess), part in zip(batch, rows, strict=True):
            key = self._key(pipeline, artifact, source)
            if key is not None:
                seconds = {"load": load, "preprocess": preprocess, "infer": share * len(images)}
                self._inferred[key] = Inferred(part, seconds)
        while len(self._inferred) > _CAPACITY:
            self._inferred.popitem(last=False)

    def take(self, pipeline: Pipeline, artifact: Artifact, sources: list[Source]) -> list[Inferred] | None:
        """Every source's logits, in order, if each was inferred ahead for this pipeline
        version and model; None otherwise. Either way they are not kept any longer."""
        keys = [self._key(pipeline, artifact, source) for source in sources]
        found = [self._inferred.pop(key, None) if key is not None else None for key in keys]
        inferred = [item for item in found if item is not None]
        return inferred if len(inferred) == len(sources) else None
