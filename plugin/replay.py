"""Replay: what a pipeline would have taken of what the node received, judged from the journal.

Nothing is re-sent. Each journaled series is judged as the assembler judges it: the router's
match rule on the header of the series' first instance (read from the spool up to Pixel
Data), then the pipeline's completion rule on the journaled instance count. Quiet
period, maximum wait and expected count only decide *when* a series closes, and every
received series closes eventually, so ``min_instances`` is the one completion rule that
decides *whether* a job is queued. :func:`run_locally` (``--run``) then runs the pipeline on
what it would take, kept apart from the node.
"""

import re
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

from plugin.journal import InstanceRecord, JobSpec, Journal, PendingSeries
from plugin.pipeline import Pipeline
from plugin.router import Router, UnreadableFile, read_header

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> float:
    """Seconds in ``30m``, ``12h``, ``7d``, ``2w`` (as ``--since`` takes them)."""
    m = _DURATION.match(text.strip())
    if m is None:
        raise ValueError(f"{text!r} is not a duration such as 30m, 12h, 7d or 2w")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def describe_since(since: float) -> str:
    """``since`` (epoch seconds, 0: all) as the reports print it."""
    return f"since {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(since))}" if since else "ever"


@dataclass(frozen=True)
class SeriesVerdict:
    """One received series and why the pipeline would not take it (``failure`` None: it would)."""

    series: PendingSeries
    failure: str | None


def replay(pipeline: Pipeline, journal: Journal, since: float = 0.0) -> list[SeriesVerdict]:
    """Judge every series with instances received at or after ``since`` (epoch seconds).

    One instance per series is read, the one the assembler routes on: match rules may name
    any attribute, but the node decides for the whole series on that one header, and replay
    must give the node's answer. A study-level pipeline counts ``min_instances`` over all the
    study's series, as the assembler does when it closes the study together."""
    received = journal.received_series(since)
    study_counts: Counter[str] = Counter()
    for series in received:
        study_counts[series.study_instance_uid] += series.count
    router = Router([pipeline])
    verdicts = []
    for series in received:
        try:
            (verdict,) = router.explain(read_header(Path(series.first_path)))
            failure = verdict.failure
        except UnreadableFile as e:  # lost or damaged outside radpipe: a reason line, not a traceback
            failure = f"first instance unreadable: {e}"
        rule = pipeline.completion
        count = series.count if rule.level == "series" else study_counts[series.study_instance_uid]
        if failure is None and count < rule.min_instances:
            failure = f"completion: {count} instance(s) in the {rule.level} < min_instances {rule.min_instances}"
        verdicts.append(SeriesVerdict(series, failure))
    return verdicts


def report(pipeline: Pipeline, verdicts: list[SeriesVerdict], since: float) -> list[str]:
    """The replay as printed: the series it would take by UID, the others counted per first
    failed condition. UIDs only: no patient name or ID is ever shown."""
    window = describe_since(since)
    taken = [v.series for v in verdicts if v.failure is None]
    reasons = Counter(v.failure for v in verdicts if v.failure is not None)
    lines = [
        f"{pipeline.name} v{pipeline.version} over {len(verdicts)} series received {window}:",
        f"would take {len(taken)} series:",
    ]
    lines += [f"  study {s.study_instance_uid}  series {s.series_instance_uid}  {s.count} instance(s)" for s in taken]
    lines.append(f"would not take {sum(reasons.values())} series:")
    lines += [f"  {n:>5}  {reason}" for reason, n in sorted(reasons.items(), key=lambda item: (-item[1], item[0]))]
    return lines


def queued_locally(pipeline: Pipeline, records: list[InstanceRecord], path: Path) -> Journal:
    """A journal of its own at ``path`` holding ``records``, with one job of ``pipeline``
    queued per series (or study, by its completion level), as the assembler queues them."""
    local = Journal(path)
    for record in records:
        local.record_instance(replace(record, batch_id=None))
    spec = JobSpec(pipeline.name, pipeline.version, pipeline.sha256, pipeline.priority)
    by_study: dict[str, list[PendingSeries]] = {}
    for series in local.pending_series():
        by_study.setdefault(series.study_instance_uid, []).append(series)
    for study_uid, pending in by_study.items():
        if pipeline.completion.level == "study":
            local.create_batches(study_uid, [(s, []) for s in pending], [spec])
        else:
            local.create_batches(study_uid, [(s, [spec]) for s in pending], [])
    return local


def run_locally(
    pipeline: Pipeline, journal: Journal, verdicts: list[SeriesVerdict], out: Path, since: float
) -> Journal:
    """Run the pipeline on the instances of the series it would take, as the node would (the
    node's runner, on the spool's files), with a journal of its own in ``out``: results land in
    ``out/results``, nothing is dispatched and the node's journal is only read. Returns that
    journal (open), whose jobs and results say what came of each series."""
    from prometheus_client import CollectorRegistry  # the runner's imports (torch) only for --run

    from plugin.metrics import Metrics
    from plugin.models.pool import ModelPool
    from plugin.prepare import Preparer
    from plugin.quarantine import Quarantine
    from plugin.runner import Runner

    taken = {v.series.series_instance_uid for v in verdicts if v.failure is None}
    studies = {v.series.study_instance_uid for v in verdicts if v.failure is None}
    study_level = pipeline.completion.level == "study"
    local = queued_locally(
        pipeline,
        [
            record
            for record in journal.received_instances(since)
            if ((record.study_instance_uid in studies) if study_level else (record.series_instance_uid in taken))
        ],
        out / "journal.sqlite",
    )
    metrics = Metrics(CollectorRegistry())
    runner = Runner(
        local,
        Router([pipeline]),
        ModelPool(metrics),
        out / "results",
        [],
        Quarantine(out / "quarantine"),
        metrics,
        Preparer(0),
    )
    try:
        while runner.step():
            pass
    finally:
        runner.stop()
    return local


def run_report(local: Journal, out: Path) -> list[str]:
    """Each local job: its status and error, the series (or study) it ran on, what it wrote."""
    lines = [f"ran on the spool's instances, results in {out / 'results'} (nothing dispatched):"]
    for job in local.jobs():
        records = local.batch_instances(job.batch_id)
        series = sorted({r.series_instance_uid for r in records})
        where = f"series {series[0]}" if len(series) == 1 else f"{len(series)} series"
        written = ", ".join(f"{r.kind} {Path(r.path).relative_to(out)}" for r in local.results(job.id))
        lines.append(
            f"  job #{job.id} {job.status}  study {records[0].study_instance_uid}  {where}: {job.error or written}"
        )
    return lines
