"""Prometheus metrics (prefix ``radpipe_``), created on an injectable registry.

Queue depths and spool free space are computed at scrape time by a collector that asks
the journal and the file system, so they are never stale and cost nothing between scrapes;
so are the pipelines' baseline bands, which therefore follow every pipeline reload.

Model monitoring: what each finished series gave (its score, Present/Absent, lesions) and
what the model saw (slices, pixel spacing, manufacturer), per pipeline, so that alert rules
can tell when production leaves the band the model was validated in. Every label value is
from a bounded set: pipeline and finding names, and a manufacturer mapped onto
:data:`MANUFACTURERS`; nothing from a patient. A shadow pipeline's findings are also set
against those of the live pipeline it shadows (agree/disagree, score difference).

Every sample served carries ``node="<node.id>"``: nodes sharing a journal export the same
names, and the journal-wide series (queue depths) once per node; the label tells them apart
where a scrape's target labels (a pod's address) say little. It is added at exposition to
what the registry holds, so the registry itself, which the node and tests read, has no such label.
"""

import math
import re
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from threading import Thread
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydicom import Dataset

from plugin.journal import FindingPair, JournalUnavailable

NODE_LABEL = "node"  # on every sample served: the node.id of the node that served it
STAGES = ("receive", "wait", "load", "preprocess", "infer", "write", "dispatch")
QUEUES = ("assembly", "jobs", "running", "dispatch", "dead_letter")
REJECT_REASONS = (
    "invalid_uid",
    "undecodable",
    "missing_pixel_data",
    "pixel_data_mismatch",
    "unsupported_pixel_format",
    "absurd_size",
    "duplicate_conflict",
    "out_of_resources",
    "queue_full",
    "storage_error",
    "sop_class_mismatch",
    "storage_full",
    "processing_failure",
    "journal_unavailable",
)
ASSOCIATION_REJECT_REASONS = ("calling_ae_not_allowed", "called_ae_mismatch", "too_many_associations")
# How associations end other than by a release (plugin/acceptor.py): aborted by this node
# for the peer's bytes or silence, or ended by the peer.
ASSOCIATION_ABORT_REASONS = (
    "malformed_pdu",
    "unrecognized_pdu",
    "unexpected_pdu",
    "too_large",
    "artim_expired",
    "network_timeout",
    "tls_handshake_failed",
    "internal_error",
    "peer_aborted",
    "connection_lost",
)

# HTTP statuses the STOW-RS endpoint answers (plugin/dicomweb.py).
STOW_STATUSES = ("200", "202", "400", "401", "404", "408", "409", "411", "413", "415", "501", "503")

# Manufacturer label values: a series' Manufacturer (0008,0070) is matched, case-blind, on
# these words; anything else is "other", an absent or empty one "unknown". Free text from
# a header never becomes a label value (unbounded series, and it could carry anything).
MANUFACTURERS = {
    "ge": ("ge", "general electric", "gems"),
    "siemens": ("siemens",),
    "philips": ("philips",),
    "canon": ("canon", "toshiba"),
    "fujifilm": ("fujifilm", "hitachi"),
    "united_imaging": ("united imaging", "uih"),
    "radpipe": ("radpipe",),  # the synthetic studies of `radpipe demo`
}
MANUFACTURER_OTHER = ("other", "unknown")
_MANUFACTURER_PATTERNS = {
    name: re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b") for name, words in MANUFACTURERS.items()
}
EVALUATIONS = ("present", "absent")
AGREEMENTS = ("agree", "disagree")  # a shadow's Present/Absent against its live pipeline's
BASELINE_QUANTITIES = ("positive_rate", "mean_score")  # the keys of a pipeline's monitoring.findings.<label>

_DIFFERENCE_BUCKETS = (-0.5, -0.2, -0.1, -0.05, -0.01, 0.01, 0.05, 0.1, 0.2, 0.5)
_SCORE_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)
_LESION_BUCKETS = (0, 1, 2, 3, 5, 10, 20, 50)
_SLICE_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)
_SPACING_BUCKETS = (0.25, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.5, 2.0, 3.0, 5.0)
_LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class Band:
    """A pipeline's expected range of one quantity of a finding (the pipeline's ``monitoring``)."""

    pipeline: str
    finding: str
    quantity: str  # one of BASELINE_QUANTITIES
    low: float
    high: float


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.instances_received = Counter(
            "radpipe_instances_received", "Instances stored and journaled", ["calling_ae"], registry=r
        )
        self.instances_rejected = Counter(
            "radpipe_instances_rejected", "C-STORE requests answered with a failure status", ["reason"], registry=r
        )
        for reason in REJECT_REASONS:
            self.instances_rejected.labels(reason)
        self.associations_rejected = Counter(
            "radpipe_associations_rejected", "Associations refused", ["reason"], registry=r
        )
        for reason in ASSOCIATION_REJECT_REASONS:
            self.associations_rejected.labels(reason)
        self.associations_aborted = Counter(
            "radpipe_associations_aborted", "Associations ended other than by a release", ["reason"], registry=r
        )
        for reason in ASSOCIATION_ABORT_REASONS:
            self.associations_aborted.labels(reason)
        self.stow_requests = Counter(
            "radpipe_stow_requests", "STOW-RS requests answered, by HTTP status", ["status"], registry=r
        )
        for status in STOW_STATUSES:
            self.stow_requests.labels(status)
        self.studies_completed = Counter(
            "radpipe_studies_completed", "Series/studies judged complete by the assembler", registry=r
        )
        self.jobs = Counter("radpipe_jobs", "Pipeline jobs finished", ["pipeline", "status"], registry=r)
        self.stage_seconds = Histogram(
            "radpipe_stage_seconds", "Time spent per stage", ["stage", "pipeline"], buckets=_LATENCY_BUCKETS, registry=r
        )
        self.inference_batch_size = Histogram(
            "radpipe_inference_batch_size", "Images per model call", buckets=_BATCH_BUCKETS, registry=r
        )
        self.model_compile_seconds = Histogram(
            "radpipe_model_compile_seconds",
            "Time to ready an optimized model's compiled program: loaded from the node's compile cache, or compiled",
            ["source"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        for source in ("cache", "compile"):
            self.model_compile_seconds.labels(source)
        self.results_delivered = Counter(
            "radpipe_results_delivered", "Results a destination accepted", ["destination"], registry=r
        )
        self.dispatch_failures = Counter(
            "radpipe_dispatch_failures",
            "Failed C-STORE or STOW-RS attempts to a destination",
            ["destination"],
            registry=r,
        )
        self.config_reloads = Counter("radpipe_config_reloads", "Pipeline (re)loads", ["result"], registry=r)
        for result in ("ok", "error"):
            self.config_reloads.labels(result)
        self.series_score = Histogram(
            "radpipe_series_score",
            "A series' probability per finding, as its SR reports it",
            ["pipeline", "finding"],
            buckets=_SCORE_BUCKETS,
            registry=r,
        )
        self.findings = Counter(
            "radpipe_findings",
            "Series evaluated per finding, by Present/Absent",
            ["pipeline", "finding", "evaluation"],
            registry=r,
        )
        self.series_lesions = Histogram(
            "radpipe_series_lesions",
            "Lesions outlined per series and segment",
            ["pipeline", "segment"],
            buckets=_LESION_BUCKETS,
            registry=r,
        )
        self.input_slices = Histogram(
            "radpipe_input_slices", "Images per series the model saw", ["pipeline"], buckets=_SLICE_BUCKETS, registry=r
        )
        self.input_pixel_spacing = Histogram(
            "radpipe_input_pixel_spacing_mm",
            "In-plane pixel spacing (row spacing) of each series the model saw",
            ["pipeline"],
            buckets=_SPACING_BUCKETS,
            registry=r,
        )
        self.input_series = Counter(
            "radpipe_input_series",
            "Series the model saw, by manufacturer (a bounded set)",
            ["pipeline", "manufacturer"],
            registry=r,
        )
        self.shadow_agreement = Counter(
            "radpipe_shadow_agreement",
            "Series a shadow pipeline and the live one it shadows both evaluated, per finding: agree or disagree",
            ["pipeline", "live", "finding", "agreement"],
            registry=r,
        )
        self.shadow_score_difference = Histogram(
            "radpipe_shadow_score_difference",
            "A shadow pipeline's series probability minus its live pipeline's, per finding",
            ["pipeline", "live", "finding"],
            buckets=_DIFFERENCE_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "radpipe_model_info",
            "Loaded models (value is always 1)",
            ["pipeline", "model", "precision", "device", "sparsity"],
            registry=r,
        )

    def observe_state(self, queue_depths: Callable[[], dict[str, int]], free_bytes: Callable[[], int]) -> None:
        """Register the scrape-time collector for queue depths and spool free space."""
        self.registry.register(_StateCollector(queue_depths, free_bytes))

    def observe_baselines(self, bands: Callable[[], Iterable[Band]]) -> None:
        """Register the scrape-time collector of the loaded pipelines' baseline bands."""
        self.registry.register(_BaselineCollector(bands))

    def add_pipeline_labels(self, pipeline: str, destinations: Iterable[str]) -> None:
        """Create a pipeline's series up front so dashboards see zeros, not gaps."""
        for status in ("done", "failed"):
            self.jobs.labels(pipeline, status)
        for destination in destinations:
            self.results_delivered.labels(destination)
            self.dispatch_failures.labels(destination)
        self.input_slices.labels(pipeline)
        self.input_pixel_spacing.labels(pipeline)
        for manufacturer in (*MANUFACTURERS, *MANUFACTURER_OTHER):
            self.input_series.labels(pipeline, manufacturer)

    def observe_input(self, pipeline: str, headers: Sequence[Dataset]) -> None:
        """What the model saw of one series: its image count, pixel spacing and manufacturer."""
        first = headers[0]
        self.input_slices.labels(pipeline).observe(len(headers))
        spacing = _pixel_spacing(first)
        if spacing is not None:
            self.input_pixel_spacing.labels(pipeline).observe(spacing)
        self.input_series.labels(pipeline, manufacturer_label(first.get("Manufacturer"))).inc()

    def observe_finding(self, pipeline: str, finding: str, probability: float, present: bool) -> None:
        """One finding of a finished series: its score and its Present/Absent verdict."""
        self.series_score.labels(pipeline, finding).observe(probability)
        for evaluation in EVALUATIONS:  # both exist from the first series on, so rates start at 0
            self.findings.labels(pipeline, finding, evaluation)
        self.findings.labels(pipeline, finding, "present" if present else "absent").inc()

    def observe_agreement(self, shadow: str, live: str, pair: FindingPair) -> None:
        """One finding of a series that a shadow and its live pipeline both evaluated."""
        labels = (shadow, live, pair.label)
        for agreement in AGREEMENTS:  # both exist from the first series on, so rates start at 0
            self.shadow_agreement.labels(*labels, agreement)
        self.shadow_agreement.labels(*labels, "agree" if pair.agree else "disagree").inc()
        self.shadow_score_difference.labels(*labels).observe(pair.shadow_probability - pair.live_probability)

    def observe_lesions(self, pipeline: str, segment: str, count: int) -> None:
        self.series_lesions.labels(pipeline, segment).observe(count)


def _pixel_spacing(header: Dataset) -> float | None:
    """The row spacing in mm; None when absent or not a positive number (not observed)."""
    try:
        spacing = float(header.PixelSpacing[0])
    except (AttributeError, TypeError, ValueError, IndexError):
        return None
    return spacing if math.isfinite(spacing) and spacing > 0 else None


def manufacturer_label(value: object) -> str:
    """A header's Manufacturer as one of the bounded label values (see :data:`MANUFACTURERS`)."""
    text = str(value or "").strip().lower()
    if not text:
        return "unknown"
    return next((name for name, pattern in _MANUFACTURER_PATTERNS.items() if pattern.search(text)), "other")


class _BaselineCollector(Collector):
    def __init__(self, bands: Callable[[], Iterable[Band]]) -> None:
        self._bands = bands

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "radpipe_finding_baseline",
            "A finding's validated band per quantity (the pipeline's monitoring block): low and high bound",
            labels=["pipeline", "finding", "quantity", "bound"],
        )
        for band in self._bands():
            family.add_metric([band.pipeline, band.finding, band.quantity, "low"], band.low)
            family.add_metric([band.pipeline, band.finding, band.quantity, "high"], band.high)
        yield family


class _StateCollector(Collector):
    def __init__(self, queue_depths: Callable[[], dict[str, int]], free_bytes: Callable[[], int]) -> None:
        self._queue_depths = queue_depths
        self._free_bytes = free_bytes

    def collect(self) -> Iterable[GaugeMetricFamily]:
        # The depths' query doubles as the journal's probe: a scrape while its database is
        # unreachable answers (up 0, no depths) instead of failing as a whole.
        depth = GaugeMetricFamily("radpipe_queue_depth", "Items waiting per queue", labels=["queue"])
        try:
            depths, up = self._queue_depths(), 1
        except JournalUnavailable:
            depths, up = {}, 0
        for queue, value in depths.items():
            depth.add_metric([queue], value)
        yield depth
        yield GaugeMetricFamily(
            "radpipe_journal_up", "1 if the journal's database answered this scrape's query, else 0", value=up
        )
        yield GaugeMetricFamily(
            "radpipe_spool_free_bytes", "Free bytes on the spool's file system", value=self._free_bytes()
        )


class _NodeLabelled(Collector):
    """Every sample of ``registry`` with ``node`` added to its labels, at each scrape."""

    def __init__(self, registry: CollectorRegistry, node: str) -> None:
        self._registry = registry
        self._node = node

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={**s.labels, NODE_LABEL: self._node}) for s in family.samples]
            yield labelled


def exposition(metrics: Metrics, node: str) -> CollectorRegistry:
    """What ``/metrics`` serves: the node's registry with ``node="<node>"`` on every sample."""
    served = CollectorRegistry()
    served.register(_NodeLabelled(metrics.registry, node))
    return served


def serve_metrics(metrics: Metrics, host: str, port: int, node: str) -> tuple[WSGIServer, Thread]:
    """Start the ``/metrics`` HTTP endpoint; returns (server, thread) so callers can stop it."""
    return start_http_server(port, addr=host, registry=exposition(metrics, node))


class StageTimer:
    """Adds up the time a job spends in each stage, then observes each total once."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def observe(self, metrics: Metrics, pipeline: str) -> None:
        for name, seconds in self.seconds.items():
            metrics.stage_seconds.labels(name, pipeline).observe(seconds)
