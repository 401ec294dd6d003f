"""The runner: takes queued jobs from the journal and turns each into a result on disk.

load headers -> (per instance) decode pixels -> preprocess -> warm model in batches of
``model.batch_size`` -> postprocess -> SR -> durable write into the results folder ->
journal (job done + one pending delivery per destination) in one transaction.
Runs in its own thread, never in an association's (invariant 4).
"""

import io
import logging
from pathlib import Path

import pydicom
import torch
from pydicom import Dataset
from pydicom.filewriter import dcmwrite

from plugin.journal import InstanceRecord, JobRecord, Journal
from plugin.loader import PixelDataError, is_image, iter_pixels, read_sources
from plugin.logs import log_context
from plugin.match import holds
from plugin.metrics import Metrics, StageTimer
from plugin.models.pool import ModelPool
from plugin.outputs.kos import key_images, key_object_selection
from plugin.outputs.sr import AlgorithmIdentity, measurement_report
from plugin.pipeline import Pipeline
from plugin.postprocess import findings
from plugin.preprocess import preprocess
from plugin.quarantine import Quarantine
from plugin.router import Router
from plugin.spool import write_durably
from plugin.worker import Worker

log = logging.getLogger(__name__)


class JobError(Exception):
    """A job cannot run (its pipeline is gone, its inputs are unreadable, ...)."""


class Runner(Worker):
    def __init__(
        self,
        journal: Journal,
        router: Router,
        pool: ModelPool,
        results_dir: Path,
        destinations: list[str],
        quarantine: Quarantine,
        metrics: Metrics,
    ) -> None:
        super().__init__("runner")
        self._journal = journal
        self._router = router
        self._pool = pool
        self._results_dir = results_dir
        self._destinations = destinations
        self._quarantine = quarantine
        self._metrics = metrics

    def step(self) -> bool:
        job = self._journal.claim_job()
        if job is None:
            return False
        with log_context(f"job-{job.id}"):
            try:
                self._run(job)
            except Exception as e:
                log.error("job %d (%s) failed: %s", job.id, job.pipeline, e, exc_info=not isinstance(e, JobError))
                self._journal.fail_job(job.id, f"{type(e).__name__}: {e}")
                self._metrics.jobs.labels(job.pipeline, "failed").inc()
        return True

    def _pipeline(self, job: JobRecord) -> Pipeline:
        """The exact version the job was routed with; after a restart, the current one."""
        pipeline = self._router.version(job.pipeline_sha256)
        if pipeline is None:
            pipeline = next((p for p in self._router.pipelines if p.name == job.pipeline), None)
            if pipeline is None:
                raise JobError(f"pipeline {job.pipeline!r} is no longer loaded")
            log.warning(
                "job %d: pipeline %s changed since routing; running version %s", job.id, job.pipeline, pipeline.version
            )
        return pipeline

    def _select(self, pipeline: Pipeline, records: list[InstanceRecord]) -> list[InstanceRecord]:
        """For a study-level pipeline: the one series ``input`` selects (series-level
        batches hold one series already)."""
        by_series: dict[str, list[InstanceRecord]] = {}
        for record in records:
            by_series.setdefault(record.series_instance_uid, []).append(record)
        rule = pipeline.input.series_rule
        candidates = [
            series
            for series in by_series.values()
            if rule is None or holds(rule, pydicom.dcmread(series[0].path, stop_before_pixels=True))
        ]
        if not candidates:
            raise JobError(f"no series of the study satisfies input.series of {pipeline.name}")
        if pipeline.input.choose == "most_instances":
            return max(candidates, key=len)
        candidates.sort(key=lambda series: min(r.received_at for r in series))
        return candidates[0] if pipeline.input.choose == "first" else candidates[-1]

    def _write(self, dataset: Dataset) -> str:
        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        target = self._results_dir / str(dataset.StudyInstanceUID) / f"{dataset.SOPInstanceUID}.dcm"
        write_durably(target, buffer.getvalue())
        return str(target)

    def _run(self, job: JobRecord) -> None:
        pipeline = self._pipeline(job)
        name = pipeline.name
        timer = StageTimer()
        artifact = self._pool.get(pipeline)
        records = self._journal.batch_instances(job.batch_id)
        if not records:
            raise JobError(f"batch {job.batch_id} has no instances")
        with timer.stage("load"):
            sources = [s for s in read_sources(self._select(pipeline, records), pipeline.input.sort) if is_image(s)]
        if not sources:
            raise JobError("no images among the inputs (non-image SOP classes only)")

        logits: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []
        batch_size = pipeline.model.batch_size

        def infer(images: torch.Tensor) -> None:
            with timer.stage("infer"):
                logits.append(self._pool.infer(artifact, images))
            self._metrics.inference_batch_size.observe(len(images))

        pixels = iter_pixels(sources)
        while True:
            with timer.stage("load"):
                try:
                    item = next(pixels, None)
                except PixelDataError as e:
                    self._quarantine.keep_file(Path(e.source.path), "decode_failed", str(e), f"job {job.id}")
                    raise JobError(f"{e}; instance quarantined") from e
            if item is None:
                break
            with timer.stage("preprocess"):
                pending.append(preprocess(pipeline.preprocess, item[1]))
            while sum(len(p) for p in pending) >= batch_size:
                stacked = torch.cat(pending)
                infer(stacked[:batch_size])
                pending = [stacked[batch_size:]]
        if pending and sum(len(p) for p in pending):
            infer(torch.cat(pending))

        result = findings(pipeline.postprocess, artifact.classes, torch.cat(logits))
        algorithm = AlgorithmIdentity(
            pipeline=name,
            pipeline_version=pipeline.version,
            pipeline_sha256=pipeline.sha256,
            model_sha256=artifact.sha256,
            precision=artifact.precision,
            device=str(next(artifact.module.parameters()).device.type),
        )
        headers = [s.header for s in sources]
        written: list[tuple[str, str, str]] = []
        with timer.stage("write"):
            for output in pipeline.outputs:
                if output.sr is not None:
                    previous = self._journal.previous_result(job)
                    predecessors = (
                        [pydicom.dcmread(previous.path)] if previous and Path(previous.path).is_file() else []
                    )
                    sr = measurement_report(headers, result, algorithm, output.sr.sop_class, predecessors)
                    written.append(("sr", self._write(sr), str(sr.SOPInstanceUID)))
                elif output.kos is not None:
                    images = key_images(headers, result, only_present=output.kos.when == "positive")
                    if images:
                        kos = key_object_selection(headers, images, algorithm)
                        written.append(("kos", self._write(kos), str(kos.SOPInstanceUID)))
        self._journal.complete_job(job.id, written, pipeline.destinations_in(self._destinations))
        timer.observe(self._metrics, name)
        self._metrics.jobs.labels(name, "done").inc()
        summary = ", ".join(f"{f.spec.label}={f.probability:.3f}{' (present)' if f.present else ''}" for f in result)
        log.info(
            "job %d (%s v%s): %d image(s) -> %s; wrote %s",
            job.id,
            name,
            pipeline.version,
            len(sources),
            summary,
            ", ".join(kind for kind, _, _ in written),
        )
