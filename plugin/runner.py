"""The runner: takes queued jobs from the journal and turns each into a result on disk.

load headers -> (per instance) decode pixels -> preprocess -> warm model in batches of
``model.batch_size`` -> postprocess -> SR -> durable write into the results folder ->
journal (job done + one pending delivery per destination) in one transaction.

Batches cross job boundaries: when a series' last batch is short, the next queued job of
the same pipeline version (waiting up to ``model.batch_window_ms`` for one) fills it, so
a stream of small series keeps the model at its batch size.

A volume pipeline (``input.kind: volume``) runs each series on its own: its slices are
decoded into one volume, resampled and preprocessed (plugin/volume.py), and the model
gets the volume whole or window by window.
Runs in threads of its own, never in an association's (invariant 4): ``runner.concurrent_jobs``
lanes, each a :class:`Runner` that claims and runs its own jobs (:class:`Lanes`), so that one
job's Python work (headers, SR) runs while another's model computes.

A claimed job is leased to this node (plugin/journal.py): the node's heartbeat keeps the
lease while the job runs, and a finish the journal refuses (the lease expired and another
node took the job over) is dropped with a warning. Jobs a step claimed and did not finish
(the journal went away, the node is stopping) are handed back at the step's end.

Test hook: with the environment variable ``RADPIPE_TEST_KILL_AFTER_CLAIM=1`` the node
SIGKILLs itself right after its first claim (tests/test_journal.py: another node must
finish the job once the lease expires). Nothing else reads it.
"""

import ctypes
import io
import logging
import os
import signal
import threading
import time
from collections.abc import Generator, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
from pydicom import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID

from plugin.journal import InstanceRecord, JobRecord, Journal, JournalUnavailable
from plugin.loader import PixelDataError, Source, file_source, read_images
from plugin.logs import identifying_values, log_context, redacting, scrub
from plugin.match import holds
from plugin.metrics import Metrics, StageTimer
from plugin.models.artifact import Artifact
from plugin.models.pool import ModelPool
from plugin.outputs.conformance import referenceable, result_source
from plugin.outputs.kos import key_images, key_object_selection
from plugin.outputs.seg import segmentation_object
from plugin.outputs.sr import AlgorithmIdentity, measurement_report, volumetric_measurement_report
from plugin.pipeline import Pipeline
from plugin.postprocess import Finding, ModelOutput, findings
from plugin.prepare import Prepared, Preparer, WorkerDied
from plugin.preprocess import PreprocessStep, preprocess_volume
from plugin.quarantine import Quarantine
from plugin.router import Router
from plugin.segment import Pixels, Segmentation, segment
from plugin.spool import write_durably
from plugin.volume import Placement, Resampling, VolumeError, infer_volume, segment_volume, series_grid
from plugin.worker import Worker

log = logging.getLogger(__name__)
_malloc_trim = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc's; absent elsewhere


class JobError(Exception):
    """A job cannot run on what it was given (its pipeline is gone, its pixels cannot be
    decoded, ...): it fails with ``reason``, a name for the failure, in one line."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(eq=False)
class Work:
    """A claimed job on its way through the model."""

    job: JobRecord
    pipeline: Pipeline
    artifact: Artifact
    sources: list[Source]
    timer: StageTimer = field(default_factory=StageTimer)
    logits: list[torch.Tensor] = field(default_factory=list)
    waiting: int = 0  # images handed to the batcher and not inferred yet
    error: Exception | None = None
    identity: tuple[str, ...] = ()  # the patient's identifying values: never logged (logs.redacting)
    study_uid: str | None = None  # its batch's study: the job's records carry its trace id


class Batcher:
    """Preprocessed images of one or more jobs that share a model, inferred
    ``batch_size`` at a time; each job gets its own rows of the logits back, in order."""

    def __init__(self, pool: ModelPool, artifact: Artifact, batch_size: int, metrics: Metrics, lanes: "Lanes") -> None:
        self.artifact = artifact
        self._pool, self._batch_size, self._metrics, self._lanes = pool, batch_size, metrics, lanes
        self._queue: list[tuple[Work, torch.Tensor]] = []

    @property
    def size(self) -> int:
        return sum(len(images) for _, images in self._queue)

    def add(self, work: Work, images: torch.Tensor) -> None:
        self._queue.append((work, images))
        work.waiting += len(images)
        while self.size >= self._batch_size:
            self._infer(self._batch_size)

    def flush(self) -> None:
        if self._queue:
            self._infer(self.size)

    def drop(self, work: Work) -> None:
        """Forget a failed job's images that have not been inferred."""
        self._queue = [(w, images) for w, images in self._queue if w is not work]
        work.waiting = 0

    def _infer(self, count: int) -> None:
        taken: list[tuple[Work, torch.Tensor]] = []
        while count:
            work, images = self._queue.pop(0)
            if len(images) > count:
                self._queue.insert(0, (work, images[count:]))
                images = images[:count]
            taken.append((work, images))
            count -= len(images)
        try:
            logits, seconds = self._lanes.model_call(self._pool, self.artifact, torch.cat([i for _, i in taken]))
        except Exception as e:  # a model that raises fails every job in the batch, not the node
            for work in {work for work, _ in taken}:
                work.error = e
                self.drop(work)
            return
        self._metrics.inference_batch_size.observe(len(logits))
        for (work, images), part in zip(taken, logits.split([len(i) for _, i in taken]), strict=True):
            # Each job is charged its images' share of the call, so that the stage's
            # seconds over all jobs add up to the model's time and not more.
            work.timer.add("infer", seconds * len(images) / len(logits))
            work.logits.append(part)
            work.waiting -= len(images)


class Lanes:
    """What the runner's lanes share. Waking one wakes them all, and each hands its
    results to the same next stage.

    One lane at a time has the turn: the right to run the job's Python (headers, decoding,
    preprocessing, SR). A lane gives the turn up while its model computes, so another
    lane's Python runs beside the model, never beside other Python: two lanes that both ran
    Python would pass the GIL to and fro and each go slower (benchmarks/README.md, twentieth
    pass). The cores are shared among what runs: the lane with the turn and the model calls
    in flight. Each sets its torch threads to its share when it starts (torch counts
    threads per calling thread), so a lone job runs on all the cores, and two model calls
    side by side run one thread each, which gets more out of 2 cores than one call on both.
    Volume jobs, which hold a whole series in memory, run one at a time."""

    def __init__(self, cores: int | None = None) -> None:
        self.cores = cores or torch.get_num_threads()
        self.woken = threading.Event()
        self.next_stage: Worker | None = None
        self._turn = threading.Lock()
        self._volume = threading.Lock()
        self._lock = threading.Lock()  # guards _running
        self._running = 0  # the turn's holder and the model calls in flight

    def _count(self, change: int) -> None:
        with self._lock:
            self._running += change

    @contextmanager
    def working(self) -> Iterator[None]:
        """While a lane holds a job: with the turn, except in :meth:`model_call` and :meth:`pause`."""
        with self._turn:
            self._count(1)
            try:
                yield
            finally:
                self._count(-1)

    @contextmanager
    def _given_up(self) -> Iterator[None]:
        self._count(-1)
        self._turn.release()
        try:
            yield
        finally:
            self._turn.acquire()
            self._count(1)

    def take_share(self) -> None:
        """Set the calling lane's torch threads to its share of the cores, as it stands now."""
        torch.set_num_threads(max(1, self.cores // max(1, self._running)))

    def model_call(self, pool: ModelPool, artifact: Artifact, batch: torch.Tensor) -> tuple[torch.Tensor, float]:
        """``pool.infer`` with the turn given up, on the call's share of the cores; the
        logits and the seconds the model took (not the wait for the turn after it)."""
        with self._given_up():
            self._count(1)
            try:
                self.take_share()
                start = time.perf_counter()
                return pool.infer(artifact, batch), time.perf_counter() - start
            finally:
                self._count(-1)

    def pause(self, seconds: float) -> None:
        """Sleep with the turn given up."""
        with self._given_up():
            time.sleep(seconds)

    @contextmanager
    def volume_turn(self) -> Iterator[None]:
        """A volume job's turn, one at a time (waited for with the turn given up)."""
        with self._given_up():
            self._volume.acquire()
        try:
            yield
        finally:
            self._volume.release()


class Runner(Worker):
    """One lane of the runner. ``lanes`` is what it shares with the others (none: it is
    the only one)."""

    def __init__(
        self,
        journal: Journal,
        router: Router,
        pool: ModelPool,
        results_dir: Path,
        destinations: list[str],
        quarantine: Quarantine,
        metrics: Metrics,
        preparer: Preparer,
        lanes: Lanes | None = None,
    ) -> None:
        self._lanes = lanes or Lanes()
        super().__init__("runner", woken=self._lanes.woken)
        self._preparer = preparer
        self._journal = journal
        self._router = router
        self._pool = pool
        self._results_dir = results_dir
        self._destinations = destinations
        self._quarantine = quarantine
        self._metrics = metrics
        self._claimed: list[int] = []  # this step's jobs: handed back at its end unless finished
        self._kill_after_claim = os.environ.get("RADPIPE_TEST_KILL_AFTER_CLAIM") == "1"  # test hook (module doc)

    @property
    def next_stage(self) -> Worker | None:  # Worker's attribute, shared by the lanes
        return self._lanes.next_stage

    @next_stage.setter
    def next_stage(self, stage: Worker | None) -> None:
        self._lanes.next_stage = stage

    def _claim(self, pipeline_sha256: str | None = None) -> JobRecord | None:
        job = self._journal.claim_job(pipeline_sha256)
        if job is not None:
            self._claimed.append(job.id)
            if self._kill_after_claim:
                os.kill(os.getpid(), signal.SIGKILL)
        return job

    def step(self) -> bool:
        try:
            return self._step()
        finally:
            claimed, self._claimed = self._claimed, []
            self._journal.release_jobs(claimed)  # finished ones are no longer held: skipped

    def _step(self) -> bool:
        job = self._claim()
        if job is None:
            return False
        with self._lanes.working():
            self._run(job)
        return True

    def _run(self, job: JobRecord) -> None:
        """``job`` and the queued jobs that share its batches."""
        work = self._start(job)
        batcher: Batcher | None = None
        fed: list[Work] = []  # every image handed to the batcher; waiting for the last logits
        while work is not None:
            if work.pipeline.input.kind == "volume":  # a volume is a batch of its own
                with self._lanes.volume_turn():
                    self._run_volume(work)
                break
            if batcher is None or work.artifact is not batcher.artifact:
                if batcher is not None:
                    batcher.flush()
                    fed = self._finish_inferred(fed)
                batcher = Batcher(self._pool, work.artifact, work.pipeline.model.batch_size, self._metrics, self._lanes)
            if self._feed(work, batcher):
                fed.append(work)
            fed = self._finish_inferred(fed)
            work = self._next_sharing(work.job, batcher)
        if batcher is not None:
            batcher.flush()
            self._finish_inferred(fed)

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)
        self._preparer.close()

    def _fail(self, job: JobRecord, error: Exception) -> None:
        """Journal and log ``reason: detail`` in one line; anything but a :class:`JobError`
        is unexpected, named by its type and logged with its traceback. An unreachable
        journal is no failure of the job: it goes on up, and the job is handed back."""
        if isinstance(error, JournalUnavailable):
            raise error
        reason = error.reason if isinstance(error, JobError) else type(error).__name__
        detail = " ".join(str(error).split())  # decoders' messages span lines
        log.error(
            "job %d (%s) failed: %s: %s", job.id, job.pipeline, reason, detail, exc_info=not isinstance(error, JobError)
        )
        if not self._journal.fail_job(job.id, scrub(f"{reason}: {detail}")):
            log.warning("job %d: lease lost to another node; its failure is not journaled", job.id)
            return
        self._metrics.jobs.labels(job.pipeline, "failed").inc()

    def _next_sharing(self, previous: JobRecord, batcher: Batcher) -> Work | None:
        """The next queued job of the same pipeline version, to fill the batcher's short
        batch; waits up to the pipeline's batch window for one. None if there is nothing
        to fill or none came."""
        if not batcher.size:
            return None
        pipeline = self._router.version(previous.pipeline_sha256)
        window = pipeline.model.batch_window_ms / 1000 if pipeline is not None else 0.0
        deadline = time.monotonic() + window
        while not self.stopping.is_set():
            job = self._claim(previous.pipeline_sha256)
            if job is not None:
                work = self._start(job)
                if work is not None:
                    return work
                continue
            if time.monotonic() >= deadline:
                return None
            self._lanes.pause(0.005)
        return None

    def _pipeline(self, job: JobRecord) -> Pipeline:
        """The exact version the job was routed with; after a restart, the current one."""
        pipeline = self._router.version(job.pipeline_sha256)
        if pipeline is None:
            pipeline = next((p for p in self._router.pipelines if p.name == job.pipeline), None)
            if pipeline is None:
                raise JobError("pipeline_unloaded", f"pipeline {job.pipeline!r} is no longer loaded")
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
            raise JobError("no_matching_series", f"no series of the study satisfies input.series of {pipeline.name}")
        if pipeline.input.choose == "most_instances":
            return max(candidates, key=len)
        candidates.sort(key=lambda series: min(r.received_at for r in series))
        return candidates[0] if pipeline.input.choose == "first" else candidates[-1]

    def _start(self, job: JobRecord) -> Work | None:
        """The job's pipeline, model and input headers; None (job failed) if any is missing."""
        study_uid = self._journal.batch_study(job.batch_id)
        with log_context(f"job-{job.id}", study_uid):
            try:
                pipeline = self._pipeline(job)
                timer = StageTimer()
                artifact = self._pool.get(pipeline)
                records = self._journal.batch_instances(job.batch_id)
                if not records:
                    raise JobError("no_instances", f"batch {job.batch_id} has no instances")
                with timer.stage("load"):
                    sources = read_images(self._select(pipeline, records), pipeline.input.sort)
                if not sources:
                    raise JobError("no_images", "no images among the inputs (non-image SOP classes only)")
                if not all(referenceable(s.header) for s in sources):
                    raise JobError("invalid_uid", "an input's Study, Series or SOP Instance UID is not a valid UID")
                classes = {str(s.header.SOPClassUID) for s in sources}
                if unwritable := sorted(uid for uid in classes if not result_source(uid)):
                    names = ", ".join(f"{uid} ({UID(uid).name})" for uid in unwritable)
                    raise JobError("unsupported_sop_class", f"no result can be written from images of {names}")
                identity = identifying_values(s.header for s in sources)
                return Work(job, pipeline, artifact, sources, timer, identity=identity, study_uid=study_uid)
            except Exception as e:
                self._fail(job, e)
                return None

    def _prepared(self, work: Work, steps: list[PreprocessStep]) -> Generator[Prepared, None, None]:
        """The job's instances decoded and preprocessed with ``steps`` (ahead, on the
        preparer's workers), in order; a decode failure is a :class:`JobError`."""
        images = self._preparer.images(work.sources, steps)
        try:
            while True:
                try:
                    item = next(images, None)
                except PixelDataError as e:
                    uid = str(e.source.header.SOPInstanceUID)
                    kept = self._quarantine.keep_file(
                        Path(e.source.path), "decode_failed", str(e), f"job {work.job.id}", uid
                    )
                    raise JobError("decode_failed", f"{e}; kept as quarantine/decode_failed/{kept.name}") from e
                except WorkerDied as e:  # a decoder crashed on this input and took its process down
                    raise JobError("worker_died", str(e)) from e
                if item is None:
                    return
                self._lanes.take_share()  # for the next image's preprocessing (a model call takes its own)
                work.timer.add("load", item[1].decode_seconds)
                work.timer.add("preprocess", item[1].preprocess_seconds)
                yield item[1]
        finally:
            images.close()

    def _feed(self, work: Work, batcher: Batcher) -> bool:
        """Decode and preprocess the job's images into the batcher; False (job failed, its
        images dropped) on a decode error."""
        with (
            log_context(f"job-{work.job.id}", work.study_uid),
            redacting(work.identity),
            closing(self._prepared(work, work.pipeline.preprocess)) as prepared,
        ):
            try:
                for item in prepared:
                    batcher.add(work, torch.from_numpy(item.images))
                    if work.error is not None:
                        break  # the model failed on a batch; reported when the job finishes
                return True
            except Exception as e:
                batcher.drop(work)
                self._fail(work.job, e)
                return False

    def _run_volume(self, work: Work) -> None:
        """One volume job: check the series' geometry (before decoding a pixel), stack its
        slices, resample and preprocess the volume, run the model on it and write the result.
        The model's calls hold this volume's windows only. At the end the freed heap goes
        back to the system: glibc kept about 0.8 GB of a 500-slice job's, on which the next
        job stacked its own peak."""
        job, pipeline, timer = work.job, work.pipeline, work.timer
        selection = pipeline.input
        window = selection.sliding_window

        def predict(batch: torch.Tensor) -> torch.Tensor:
            logits, _ = self._lanes.model_call(self._pool, work.artifact, batch)
            self._metrics.inference_batch_size.observe(len(batch))
            return logits

        with log_context(f"job-{job.id}", work.study_uid), redacting(work.identity):
            try:
                try:
                    source = series_grid([s.header for s in work.sources])
                    resampling = Resampling(source, selection.orientation, selection.spacing)
                except VolumeError as e:
                    raise JobError(e.reason, str(e)) from e
                stack = self._stack(work, resampling)
                with timer.stage("preprocess"):
                    volume = resampling.finish(stack)
                    del stack
                    image, grid = preprocess_volume(pipeline.preprocess, volume[None, None], resampling.target)
                    del volume
                log.info(
                    "job %d: volume %s %s of %s mm -> model input %s %s of %s mm",
                    job.id,
                    "x".join(map(str, source.shape)),
                    source.orientation,
                    "x".join(f"{s:.3g}" for s in source.spacing),
                    "x".join(map(str, image.shape[1:])),
                    grid.orientation,
                    "x".join(f"{s:.3g}" for s in grid.spacing),
                )
                windows = () if window is None else (window.roi_size, window.overlap, window.sw_batch_size)
                with timer.stage("infer"):
                    if pipeline.task == "segmentation":
                        logits = segment_volume(predict, image, *windows)
                        centres = np.array([[(n - 1) / 2 for n in image.shape[2:]]])
                    else:
                        logits, centres = infer_volume(predict, image, *windows)
                del image
                output = ModelOutput(logits, Placement(source, grid, centres))
                del logits  # held by output alone, so that segment can free them (ModelOutput.take_logits)
                self._finish(work, output)
            except Exception as e:
                self._fail(job, e)
            finally:
                if _malloc_trim is not None:
                    _malloc_trim(0)

    def _stack(self, work: Work, resampling: Resampling) -> torch.Tensor:
        """The job's slices, decoded in modality units and resampled in their plane as they
        come, as one ``[D, H', W']`` float32 stack: only the stack and a few slices are held."""
        stack = torch.empty(resampling.stack_shape)
        seconds = 0.0
        with closing(self._prepared(work, [])) as prepared:
            for index, item in enumerate(prepared):
                start = time.perf_counter()
                stack[index] = resampling.plane(torch.from_numpy(item.images)[0])[0]
                seconds += time.perf_counter() - start
        work.timer.add("preprocess", seconds)
        return stack

    def _pixels(self, work: Work) -> Pixels:
        """The job's slices read again in modality units, a run of them at a time: an outline
        (plugin/segment.py) reads only its lesions' slices, and the stack is gone by then."""

        def read(slices: slice) -> np.ndarray:
            planes = []
            with closing(self._preparer.images(work.sources[slices], [])) as images:
                for _, prepared in images:
                    assert prepared.images is not None  # Preparer.images raises for one it cannot decode
                    planes.append(prepared.images[0, 0])
            return np.stack(planes)

        return read

    def _finish_inferred(self, fed: list[Work]) -> list[Work]:
        """Write the results of every job whose images are all inferred; return the rest."""
        for work in [w for w in fed if not w.waiting]:
            with log_context(f"job-{work.job.id}", work.study_uid), redacting(work.identity):
                try:
                    if work.error is not None:
                        raise work.error
                    self._finish(work, ModelOutput(torch.cat(work.logits)))
                except Exception as e:
                    self._fail(work.job, e)
        return [w for w in fed if w.waiting]

    def _write(self, dataset: Dataset) -> str:
        buffer = io.BytesIO()
        dcmwrite(buffer, dataset, enforce_file_format=True)
        target = self._results_dir / str(dataset.StudyInstanceUID) / f"{dataset.SOPInstanceUID}.dcm"
        write_durably(target, buffer.getvalue())
        return str(target)

    def _finish(self, work: Work, model_output: ModelOutput) -> None:
        job, pipeline, artifact, timer = work.job, work.pipeline, work.artifact, work.timer
        name = pipeline.name
        algorithm = AlgorithmIdentity(
            pipeline=name,
            pipeline_version=pipeline.version,
            pipeline_sha256=pipeline.sha256,
            model_sha256=artifact.sha256,
            precision=artifact.precision,
            device=artifact.device.type,
        )
        with timer.stage("write"):
            if pipeline.task == "segmentation":
                segmentation = segment(pipeline.postprocess, artifact.classes, model_output, self._pixels(work))
                written, summary = self._write_segmentation(work, segmentation, algorithm)
            else:
                result = findings(pipeline.postprocess, artifact.classes, model_output)
                written, summary = self._write_findings(work, result, algorithm)
        reported = [] if pipeline.task == "segmentation" else [(f.spec.label, f.probability, f.present) for f in result]
        if not self._journal.complete_job(job.id, written, pipeline.destinations_in(self._destinations), reported):
            # Its files are the same objects the new owner writes (deterministic UIDs): harmless.
            log.warning("job %d: lease lost to another node; its result is dropped, not journaled", job.id)
            return
        if pipeline.shadow_of is not None:  # its live job ran first (priority); counted once, here
            for pair in self._journal.finding_pairs(pipeline.shadow_of, name, shadow_job=job.id):
                self._metrics.observe_agreement(name, pipeline.shadow_of, pair)
        # The series' result is final (journaled): monitoring sees it once, as the SR reports it.
        self._metrics.observe_input(name, [s.header for s in work.sources])
        if pipeline.task == "segmentation":
            for spec in segmentation.segments:
                count = sum(lesion.label == spec.label for lesion in segmentation.lesions)
                self._metrics.observe_lesions(name, spec.label, count)
        else:
            for finding in result:
                self._metrics.observe_finding(name, finding.spec.label, finding.probability, finding.present)
        if self.next_stage is not None:
            self.next_stage.wake()  # the dispatcher sends it now, not at its next poll
        timer.observe(self._metrics, name)
        self._metrics.jobs.labels(name, "done").inc()
        log.info(
            "job %d (%s v%s): %d image(s) -> %s; wrote %s",
            job.id,
            name,
            pipeline.version,
            len(work.sources),
            summary,
            ", ".join(kind for kind, _, _ in written),
        )

    def _predecessors(self, job: JobRecord) -> list[Dataset]:
        """The SR this job supersedes: the latest of an earlier job on the same series."""
        previous = self._journal.previous_result(job)
        return [pydicom.dcmread(previous.path)] if previous and Path(previous.path).is_file() else []

    @staticmethod
    def _whole(work: Work, headers: list[Dataset]) -> list[Dataset]:
        """The whole headers of the job's images ``headers``, read from their files: a KOS
        copies the patient and the study from its first image (the journal keeps only the
        series' first image's), a SEG the image pixel and plane modules of each."""
        paths = {str(s.header.SOPInstanceUID): s.path for s in work.sources}
        first = work.sources[0].header
        return [first if h is first else file_source(paths[str(h.SOPInstanceUID)]).header for h in headers]

    def _write_findings(
        self, work: Work, result: list[Finding], algorithm: AlgorithmIdentity
    ) -> tuple[list[tuple[str, str, str]], str]:
        """A classification's SR and key images; what was written and a summary line."""
        headers = [s.header for s in work.sources]
        written: list[tuple[str, str, str]] = []
        for output in work.pipeline.outputs:
            if output.sr is not None:
                sr = measurement_report(headers, result, algorithm, output.sr.sop_class, self._predecessors(work.job))
                written.append(("sr", self._write(sr), str(sr.SOPInstanceUID)))
            elif output.kos is not None:
                images = key_images(headers, result, only_present=output.kos.when == "positive")
                if images:
                    kos = key_object_selection(headers, self._whole(work, images), algorithm)
                    written.append(("kos", self._write(kos), str(kos.SOPInstanceUID)))
        summary = ", ".join(f"{f.spec.label}={f.probability:.3f}{' (present)' if f.present else ''}" for f in result)
        return written, summary

    def _write_segmentation(
        self, work: Work, segmentation: Segmentation, algorithm: AlgorithmIdentity
    ) -> tuple[list[tuple[str, str, str]], str]:
        """A segmentation's SEG and, pointing into it, its SR; what was written and a
        summary line. The SEG is written first whatever the order of the outputs."""
        headers = [s.header for s in work.sources]
        [seg_output] = [o.seg for o in work.pipeline.outputs if o.seg is not None]  # exactly one (pipeline.py)
        seg = segmentation_object(self._whole(work, headers), segmentation, algorithm, seg_output.type)
        written = [("seg", self._write(seg), str(seg.SOPInstanceUID))]
        for output in work.pipeline.outputs:
            if output.sr is not None:
                sr = volumetric_measurement_report(
                    headers, segmentation, seg, algorithm, output.sr.sop_class, self._predecessors(work.job)
                )
                written.append(("sr", self._write(sr), str(sr.SOPInstanceUID)))
        summary = ", ".join(
            f"{spec.label}: {sum(lesion.label == spec.label for lesion in segmentation.lesions)} lesion(s)"
            for spec in segmentation.segments
        )
        return written, summary
