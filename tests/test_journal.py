"""Journal rows read back exactly as written, and state survives reopening the database:
every test on both back ends, SQLite and PostgreSQL (a real server, tests/postgres.py).
Leases: nodes claiming side by side, a lease expiring to another node, fenced finishes,
the heartbeat, and a node SIGKILLed right after its claim."""

import logging
import signal
import sqlite3
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

import psycopg
import pydicom
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from plugin.app import Heartbeat, Node
from plugin.config import NodeConfig
from plugin.journal import (
    DELIVERIES_DUE,
    JOBS_QUEUED,
    MAX_JOB_CLAIMS,
    SCHEMA_STATEMENTS,
    InstanceRecord,
    JobSpec,
    Journal,
    JournalUnavailable,
    ResultRecord,
)
from plugin.journal_pg import PostgresBackend, ddl
from plugin.logs import trace_id
from tests.conftest import (
    node_config,
    results,
    serve,
    shared_journal,
    storescu,
    wait_for,
    write_node_config,
    write_pipeline,
)

Location = Path | str


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """Where a journal lives: an SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "j.sqlite"
    return str(request.getfixturevalue("postgres_url"))


def _integrity_error(location: Location) -> type[Exception]:
    return sqlite3.IntegrityError if isinstance(location, Path) else psycopg.IntegrityError


def _execute(location: Location, statements: Sequence[str]) -> None:
    """Run SQL on the journal's database behind the journal's back (an older radpipe's)."""
    if isinstance(location, Path):
        with sqlite3.connect(location) as db:
            for statement in statements:
                db.execute(statement)
        db.close()
    else:
        with psycopg.connect(location, autocommit=True) as conn:
            for statement in statements:
                conn.execute(ddl(statement))


def _instance(sop: str, series: str = "1.2.3", size: int = 10) -> InstanceRecord:
    return InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", "1.2", series, f"/spool/{sop}.dcm", size, "CT1", 100.0)


def test_instance_round_trip_and_replacement_of_a_lost_file(location):
    journal = Journal(location)
    record = _instance("1.2.3.1")
    journal.record_instance(record)
    assert journal.instance("1.2.3.1") == record
    with pytest.raises(
        _integrity_error(location)
    ):  # a known UID is the node's call (plugin/resend.py), never a 2nd row
        journal.record_instance(_instance("1.2.3.1", size=11))
    replaced = _instance("1.2.3.1", size=12)  # its file was lost before the flush: received again
    journal.record_instance(replaced, replace=True)
    assert journal.instance("1.2.3.1") == replaced
    journal.close()


def test_journal_of_an_earlier_version_opens_with_its_rows(location):
    """radpipe 0.1 journals kept a sha256 per instance; the column goes, the rows stay.
    Journals from before leases gain their columns; a job they left running is free.
    Their instances have no journaled attributes: the runner reads their files."""
    old = [
        s.replace("series_instance_uid TEXT NOT NULL,", "series_instance_uid TEXT NOT NULL, sha256 TEXT NOT NULL,")
        .replace(",\n    attempts INTEGER NOT NULL DEFAULT 0,\n    lease_owner TEXT,\n    lease_until REAL", "")
        .replace("\n    lease_owner TEXT,\n    lease_until REAL,", "")
        .replace(",\n    generation INTEGER NOT NULL DEFAULT 1", "")
        .replace(",\n    attributes TEXT", "")
        for s in SCHEMA_STATEMENTS
    ]
    assert not any("lease" in s or "generation" in s or "attributes" in s for s in old)
    _execute(location, [*old, "INSERT INTO instances VALUES ('1.2.3.1', '1.2.840.10008.5.1.4.1.1.2', '1.2', '1.2.3',"
                              " 'ab', '/s', 10, 'CT1', 100.0, NULL)",
                        "INSERT INTO batches VALUES (1, '1.2', '1.2.3', 100.0, 'routed')",
                        "INSERT INTO batches VALUES (2, '1.2', NULL, 100.0, 'routed')",
                        "INSERT INTO batches VALUES (3, '1.2', '1.2.3', 200.0, 'routed')",
                        "INSERT INTO jobs VALUES (1, 1, 'demo', '1', 'f', 0, 'running', NULL, 100.0, 101.0, NULL)",
                        "INSERT INTO jobs VALUES (2, 3, 'demo', '1', 'f', 0, 'queued', NULL, 200.0, NULL, NULL)",
                        ])  # fmt: skip
    journal = Journal(location)
    assert journal.instance("1.2.3.1") == InstanceRecord(
        "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.3", "/s", 10, "CT1", 100.0
    )
    journal.record_instance(_instance("1.2.3.2"))
    assert journal.queue_depths()["assembly"] == 2
    assert [j.generation for j in journal.jobs()] == [1, 2]  # the series' batches numbered in order
    job = journal.claim_job()  # no lease: an old radpipe's running job, claimable at once
    assert job is not None and (job.id, job.attempts, job.lease_owner) == (1, 1, journal.node_id)
    assert journal.complete_job(job.id, [("sr", "/r/sr.dcm", "9.9")], ["pacs"])
    assert journal.previous_result(journal.claim_job()) == ResultRecord(1, 1, "sr", "/r/sr.dcm", "9.9")
    journal.close()


def test_batch_job_delivery_lifecycle_survives_reopen(location):
    journal = Journal(location)
    for n in range(3):
        journal.record_instance(_instance(f"1.2.3.{n}"))
    [series] = journal.pending_series()
    assert series.count == 3
    [batch] = journal.create_batches("1.2", [(series, [JobSpec("demo", "1", "f" * 64, 0)])], [])
    assert journal.pending_series() == []
    job = journal.claim_job()
    assert job is not None and job.status == "running" and job.batch_id == batch.id and job.generation == 1
    journal.close()

    journal = Journal(location, node_id=job.lease_owner)  # a restart under the same id: its job is queued again
    assert journal.resume() == 1
    job = journal.claim_job()
    assert [i.sop_instance_uid for i in journal.batch_instances(job.batch_id)] == [f"1.2.3.{n}" for n in range(3)]
    journal.complete_job(job.id, [("sr", "/results/sr.dcm", "9.9")], ["pacs"])
    assert journal.results(job.id) == [ResultRecord(1, job.id, "sr", "/results/sr.dcm", "9.9")]
    [delivery] = journal.due_deliveries(now=0)
    assert (delivery.destination, delivery.result_path, delivery.pipeline) == ("pacs", "/results/sr.dcm", "demo")
    journal.record_attempt(delivery.result_id, "pacs", "refused", retry_at=1000.0)
    assert journal.due_deliveries(now=999) == []  # not due before its backoff ends
    [delivery] = journal.due_deliveries(now=1000)
    assert (delivery.attempts, delivery.last_error, delivery.status) == (1, "refused", "pending")
    journal.record_attempt(delivery.result_id, "pacs", "refused again", retry_at=None)
    assert journal.queue_depths() == {"assembly": 0, "jobs": 0, "running": 0, "dispatch": 0, "dead_letter": 1}
    assert journal.requeue_dead_letters(study_uid="9.9.9") == 0  # another study
    assert journal.requeue_dead_letters(study_uid="1.2") == 1
    [delivery] = journal.due_deliveries(now=0)
    journal.record_attempt(delivery.result_id, "pacs", None)
    [delivered] = journal.deliveries(job.id)
    assert (delivered.status, delivered.attempts) == ("delivered", 1)

    # A late arrival re-opens the series; the next batch covers the whole series.
    journal.record_instance(_instance("1.2.3.9"))
    [late] = journal.pending_series()
    [second, study] = journal.create_batches("1.2", [(late, [])], [JobSpec("study-demo", "1", "e" * 64, 0)])
    assert (second.generation, study.generation) == (2, 1)  # the series' second close, the study's first
    assert journal.batch_routing(second.id) == "unrouted"
    assert len(journal.batch_instances(second.id)) == 4
    assert len(journal.batch_instances(study.id)) == 4  # the study batch covers every series of the study
    journal.close()


def test_every_query_of_status_replay_shadow_and_retention(location):
    """The journal's other readers and writers (radpipe status/replay/compare/retry, the
    runner's supersession, retention) give the same answers on both back ends."""
    journal = Journal(location)
    for n, series in enumerate(["1.2.3", "1.2.3", "1.2.4"]):
        journal.record_instance(InstanceRecord(f"1.2.9.{n}", "1.2.840.10008.5.1.4.1.1.2", "1.2", series,
                                               f"/spool/{n}.dcm", 10, "CT1", 100.0 + n))  # fmt: skip
    assert [(s.series_instance_uid, s.count, s.first_path) for s in journal.received_series(since=101.0)] == [
        ("1.2.3", 1, "/spool/1.dcm"),
        ("1.2.4", 1, "/spool/2.dcm"),
    ]
    assert [i.sop_instance_uid for i in journal.received_instances(since=101.0)] == ["1.2.9.1", "1.2.9.2"]
    assert journal.study_of_trace(trace_id("1.2")) == "1.2" and journal.study_of_trace("0" * 16) is None
    assert journal.study_received("1.2") == (3, 100.0, 102.0)
    live, shadow = JobSpec("live", "1", "a" * 64, 0), JobSpec("shadow", "1", "b" * 64, -100)
    pending = sorted(journal.pending_series(), key=lambda s: s.series_instance_uid)
    journal.create_batches("1.2", [(pending[0], [live, shadow]), (pending[1], [])], [])
    assert journal.claim_job(pipeline_sha256="b" * 64) is None  # the most urgent job is another version's
    first = journal.claim_job(pipeline_sha256="a" * 64)
    assert first.pipeline == "live" and journal.claim_job() is None  # the shadow waits for its live job
    journal.complete_job(first.id, [("sr", "/r/live.dcm", "9.1")], ["pacs", "gone"], [("nodule", 0.75, True)])
    second = journal.claim_job()
    assert (second.pipeline, journal.claim_job()) == ("shadow", None)
    journal.complete_job(second.id, [("sr", "/r/shadow.dcm", "9.2")], [], [("nodule", 0.25, False)])
    [pair] = journal.finding_pairs("live", "shadow")
    assert (pair.series_instance_uid, pair.live_probability, pair.shadow_present, pair.agree) == (
        "1.2.3",
        0.75,
        False,
        False,
    )
    assert journal.finding_pairs("live", "shadow", shadow_job=first.id) == []
    assert journal.finding_pairs("live", "shadow", since=time.time() + 60) == []
    elsewhere = journal.deliveries_elsewhere(["pacs"])  # claimed, then handed back untried
    assert [d.destination for d in elsewhere] == ["gone"] and journal.deliveries_elsewhere(["pacs"]) == []
    journal.release_deliveries(elsewhere)
    assert [d.destination for d in journal.deliveries(status="pending", study_uid="1.2")] == ["gone", "pacs"]
    assert [j.pipeline for j in journal.study_jobs("1.2")] == ["live", "shadow"]
    assert [j.id for j in journal.recent_jobs(limit=1)] == [second.id]
    assert journal.job(first.id).status == "done" and journal.job(10**6) is None

    # A late instance: the re-run's previous result is the first run's, and it fails.
    journal.record_instance(_instance("1.2.3.99"))
    [late] = journal.pending_series()
    [batch] = journal.create_batches("1.2", [(late, [live])], [])
    rerun = journal.claim_job()
    assert journal.previous_result(rerun) == ResultRecord(1, first.id, "sr", "/r/live.dcm", "9.1")
    journal.fail_job(rerun.id, "boom")
    assert journal.requeue_failed_jobs(study_uid="9.9") == 0
    assert journal.requeue_failed_jobs() == 1 and journal.queued_jobs() == 1
    journal.fail_job(journal.claim_job().id, "boom again")

    # Retention: nothing of a study with an undelivered result goes; once delivered, all of it.
    assert journal.purgeable_studies(older_than=time.time()) == []
    for delivery in journal.due_deliveries(now=time.time()):
        journal.record_attempt(delivery.result_id, delivery.destination, None)
    assert journal.purgeable_studies(older_than=50.0) == []  # received since
    assert journal.purgeable_studies(older_than=time.time()) == ["1.2"]
    journal.forget_study("1.2")
    assert journal.jobs() == [] and journal.received_instances() == [] and journal.batch_study(batch.id) is None
    assert journal.queue_depths() == {"assembly": 0, "jobs": 0, "running": 0, "dispatch": 0, "dead_letter": 0}
    journal.close()


def test_claimants_side_by_side_never_take_the_same_job(location):
    """Four claimants, each with its own connection (on PostgreSQL, its own pool: as four
    nodes), drain 40 jobs, finishing each: every job is claimed exactly once, and none
    while a more urgent one of its batch is unfinished."""
    journal = Journal(location)
    journal.record_instance(_instance("1.2.3.1"))
    [series] = journal.pending_series()
    journal.create_batches("1.2", [(series, [JobSpec(f"p{n}", "1", "f" * 64, n % 3) for n in range(40)])], [])
    claimants = [Journal(location) for _ in range(4)]
    start = threading.Barrier(len(claimants))
    claimed: list[list[int]] = [[] for _ in claimants]

    def drain(claimant: Journal, mine: list[int]) -> None:
        start.wait()
        while (job := claimant.claim_job()) is not None:
            mine.append(job.id)
            assert not [j for j in claimant.jobs() if j.priority > job.priority and j.status != "done"]
            claimant.complete_job(job.id, [], [], [])

    threads = [threading.Thread(target=drain, args=pair) for pair in zip(claimants, claimed, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for claimant in claimants:
        claimant.close()
    every = [job_id for mine in claimed for job_id in mine]
    assert sorted(every) == [job.id for job in journal.jobs()]  # each once, none left out
    assert {job.status for job in journal.jobs()} == {"done"}
    journal.close()


def test_two_nodes_closing_the_same_series_at_once_close_it_once(location):
    """Two nodes' assemblers (two journals, two ids) judge the same 12 series complete from
    the same rows and close each at the same moment: every series gets exactly one batch
    and one job per pipeline, from one node; the other's close creates nothing, and so
    does a close on a view older than the series' last close."""
    a, b = Journal(location, node_id="node-a"), Journal(location, node_id="node-b")
    specs = [JobSpec("live", "1", "a" * 64, 0), JobSpec("other", "1", "b" * 64, 0)]
    for series in range(12):
        for n in range(3):
            a.record_instance(_instance(f"1.2.{series}.{n}", f"1.2.{series}"))
    pending = a.pending_series()
    assert len(pending) == 12
    start = threading.Barrier(2)
    closed: dict[str, list] = {"node-a": [], "node-b": []}

    def close_each(node: Journal) -> None:
        for series in pending:
            start.wait(30)
            closed[node.node_id].extend(node.create_batches("1.2", [(series, specs)], []))

    threads = [threading.Thread(target=close_each, args=(node,)) for node in (a, b)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        batches = closed["node-a"] + closed["node-b"]
        assert sorted(batch.series_instance_uid for batch in batches) == sorted(s.series_instance_uid for s in pending)
        assert {batch.generation for batch in batches} == {1}
        jobs = a.jobs()
        assert sorted((j.batch_id, j.pipeline) for j in jobs) == sorted(
            (batch.id, spec.pipeline) for batch in batches for spec in specs
        )
        assert a.pending_series() == []
        a.record_instance(_instance("1.2.0.9", "1.2.0"))  # a late arrival: pending again, newer than the view
        assert b.create_batches("1.2", [(pending[0], specs)], []) == []
        assert len(a.jobs()) == len(jobs)
    finally:
        a.close()
        b.close()


def test_a_late_arrival_closes_the_next_generation_whose_jobs_wait_for_the_previous(location):
    """Instances arriving after a series was closed close it again as generation 2 (a study
    batch too); generation 2's job is claimed, by any node, only once generation 1's
    job of its pipeline is finished, and supersedes generation 1's result."""
    a, b = Journal(location, node_id="node-a"), Journal(location, node_id="node-b")
    live, study = JobSpec("live", "1", "a" * 64, 0), JobSpec("study", "1", "b" * 64, 0)
    closes = []
    for sop in ("1.2.3.1", "1.2.3.2"):
        a.record_instance(_instance(sop))
        [series] = a.pending_series()
        closes.append(a.create_batches("1.2", [(series, [live])], [study]))
    assert [[batch.generation for batch in batches] for batches in closes] == [[1, 1], [2, 2]]
    first = a.claim_job()
    first_study = b.claim_job()
    assert [(j.pipeline, j.generation) for j in (first, first_study)] == [("live", 1), ("study", 1)]
    assert a.claim_job() is None and b.claim_job() is None  # each generation 2 job waits for its generation 1
    assert a.complete_job(first.id, [("sr", "/r/1.dcm", "9.1")], ["pacs"])
    rerun = b.claim_job()
    assert (rerun.pipeline, rerun.generation, rerun.batch_id) == ("live", 2, closes[1][0].id)
    assert b.previous_result(rerun) == ResultRecord(1, first.id, "sr", "/r/1.dcm", "9.1")
    assert b.claim_job() is None  # the study's generation 1 still runs
    assert b.fail_job(first_study.id, "boom")
    study_rerun = b.claim_job()
    assert (study_rerun.pipeline, study_rerun.generation, b.previous_result(study_rerun)) == ("study", 2, None)
    assert [(j.pipeline, j.generation) for j in a.study_jobs("1.2")] == [("live", 1), ("study", 1), ("live", 2),
                                                                            ("study", 2)]  # fmt: skip
    a.close()
    b.close()


def _queue_jobs(journal: Journal, count: int, series: str = "1.2.3") -> None:
    """One series (one instance) with ``count`` jobs queued on it."""
    journal.record_instance(_instance(f"{series}.1", series))
    [series] = journal.pending_series()
    journal.create_batches("1.2", [(series, [JobSpec(f"p{n}", "1", "f" * 64, 0) for n in range(count)])], [])


def _side_by_side(nodes: Sequence[Journal], claim: Callable[[Journal], list]) -> list[list]:
    """Each node calls ``claim`` in its own thread, all starting together, until it gets
    nothing; what each got."""
    start = threading.Barrier(len(nodes))
    got: list[list] = [[] for _ in nodes]

    def drain(node: Journal, mine: list) -> None:
        start.wait()
        while claimed := claim(node):
            mine.extend(claimed)

    threads = [threading.Thread(target=drain, args=pair) for pair in zip(nodes, got, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return got


def test_a_claim_takes_one_job(location):
    """However the database plans the claim (PostgreSQL may re-run a picking subquery of
    ``id IN (...)`` per row, each run skipping the rows already locked), one claim leases
    one job: another left running without this node knowing would wait out its lease."""
    journal = Journal(location, node_id="node-a")
    _queue_jobs(journal, 6)
    for pipeline_sha256 in (None, "f" * 64):  # the runner's first claim, then one for the same pipeline
        assert journal.claim_job(pipeline_sha256) is not None
        assert [j.status for j in journal.jobs()].count("running") == (1 if pipeline_sha256 is None else 2)
    journal.close()


def test_two_nodes_claim_jobs_and_deliveries_each_exactly_once(location):
    """Two nodes (two journals, two ids) claim 30 jobs, then their 30 deliveries, side by
    side: each goes to exactly one node, leased to it, and status lists who holds what."""
    a, b = Journal(location, node_id="node-a"), Journal(location, node_id="node-b")
    _queue_jobs(a, 30)
    jobs = _side_by_side([a, b], lambda node: [job] if (job := node.claim_job()) else [])
    assert sorted(j.id for j in jobs[0] + jobs[1]) == [j.id for j in a.jobs()]
    assert {(j.lease_owner, j.attempts) for j in jobs[0]} <= {("node-a", 1)}
    assert {(j.lease_owner, j.attempts) for j in jobs[1]} <= {("node-b", 1)}
    assert {(lease.job_id, lease.owner) for lease in a.leases()} == {
        (j.id, node) for node, mine in zip(["node-a", "node-b"], jobs, strict=True) for j in mine
    }
    for node, mine in [(a, jobs[0]), (b, jobs[1])]:
        for job in mine:
            assert node.complete_job(job.id, [("sr", f"/r/{job.id}.dcm", f"9.{job.id}")], ["pacs"])
    assert a.leases() == []

    sent = _side_by_side([a, b], lambda node: node.due_deliveries(time.time(), "pacs", limit=4))
    assert sorted(d.key for d in sent[0] + sent[1]) == sorted(d.key for d in a.deliveries())
    assert {d.lease_owner for d in sent[0]} <= {"node-a"} and {d.lease_owner for d in sent[1]} <= {"node-b"}
    assert b.due_deliveries(time.time()) == []  # every one is held
    assert all(a.record_attempt(*d.key, None) for d in sent[0])
    assert not any(a.record_attempt(*d.key, None) for d in sent[1])  # node-b's, not node-a's to finish
    assert all(b.record_attempt(*d.key, None) for d in sent[1])
    assert {d.status for d in a.deliveries()} == {"delivered"}
    a.close()
    b.close()


def test_work_queued_by_one_node_wakes_the_others_workers(postgres_url):
    """PostgreSQL's NOTIFY: jobs queued by node-a's assembler wake node-b's runner, the
    deliveries of a job node-a finished wake node-b's senders, each as its transaction
    commits, not at the next poll; a series closed without a job wakes nobody."""
    a, b = Journal(postgres_url, node_id="node-a"), Journal(postgres_url, node_id="node-b")
    jobs_queued, deliveries_due = threading.Event(), threading.Event()
    b.listen({JOBS_QUEUED: jobs_queued.set, DELIVERIES_DUE: deliveries_due.set})
    with psycopg.connect(postgres_url, autocommit=True) as admin:  # node-b's listening connection is up

        def listening() -> bool:
            sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND query LIKE %s"
            return admin.execute(sql, (f"LISTEN %{DELIVERIES_DUE}%",)).fetchone() == (1,)

        wait_for(listening, timeout=30, what="node-b listening")

    a.record_instance(_instance("1.2.9.1", "1.2.9"))
    a.create_batches("1.2", [(a.pending_series()[0], [])], [])  # unrouted: no job
    _queue_jobs(a, 1)
    assert jobs_queued.wait(5)
    assert not deliveries_due.is_set()
    jobs_queued.clear()
    job = a.claim_job()
    assert job is not None and a.complete_job(job.id, [("sr", "/r/1.dcm", "9.1")], ["pacs"])
    assert deliveries_due.wait(5)
    assert not jobs_queued.is_set()
    a.close()
    b.close()


def test_an_expired_lease_goes_to_another_node_and_the_late_finish_is_refused(location):
    """node-a's lease runs out (no heartbeat): node-b claims the job and the delivery; node-a's
    late finish and try commit nothing, node-b's do. A job claimed MAX_JOB_CLAIMS times
    without a finish fails; a node restarting under its id takes its own work back at once."""
    a = Journal(location, node_id="node-a", lease_seconds=0.3)
    b = Journal(location, node_id="node-b", lease_seconds=0.3)
    _queue_jobs(a, 2)
    first = a.claim_job()
    assert b.claim_job().id != first.id and b.claim_job() is None  # first is held by node-a
    time.sleep(0.4)
    taken = b.claim_job()
    assert (taken.id, taken.lease_owner, taken.attempts) == (first.id, "node-b", 2)
    assert a.renew_leases() == 1  # the heartbeat finds it lost
    assert not a.complete_job(first.id, [("sr", "/r/late.dcm", "9.1")], ["pacs"])
    assert not a.fail_job(first.id, "late")
    assert a.results(first.id) == [] and a.job(first.id).status == "running"
    assert b.complete_job(taken.id, [("sr", "/r/sr.dcm", "9.1")], ["pacs"])
    done = a.job(first.id)
    assert (done.status, done.lease_owner, done.lease_until) == ("done", None, None)

    [delivery] = a.due_deliveries(time.time())
    assert b.due_deliveries(time.time()) == []
    time.sleep(0.4)
    [again] = b.due_deliveries(time.time())
    assert again.key == delivery.key and again.lease_owner == "node-b"
    assert not a.record_attempt(*delivery.key, "refused", retry_at=time.time())
    assert b.record_attempt(*again.key, None)
    assert a.deliveries()[0].attempts == 1

    # A poison job: every node that claims it dies before finishing (no heartbeat, no finish).
    [other] = [j for j in a.jobs() if j.status == "running"]
    for claims in range(2, MAX_JOB_CLAIMS + 1):
        time.sleep(0.4)
        assert a.claim_job().attempts == claims
    time.sleep(0.4)
    assert a.claim_job() is None
    failed = a.job(other.id)
    assert failed.status == "failed" and "claimed 3 times, never finished" in failed.error

    # node-a restarts under its id: its own running job is queued again at once, node-b's is
    # not (on SQLite, a journal of one node, every running job is).
    _queue_jobs(a, 2, series="1.2.4")
    mine, theirs = Journal(location, node_id="node-a"), Journal(location, node_id="node-b")
    mine_job, their_job = mine.claim_job(), theirs.claim_job()
    restarted = Journal(location, node_id="node-a")
    if isinstance(location, Path):
        assert restarted.resume() == 2
    else:
        assert restarted.resume() == 1
        assert restarted.claim_job().id == mine_job.id and restarted.claim_job() is None
        assert theirs.complete_job(their_job.id, [], [])
    for journal in (a, b, mine, theirs, restarted):
        journal.close()


def test_the_heartbeat_keeps_a_long_jobs_lease(location):
    """A job and a delivery held for four lease lengths: the heartbeat renews them, so the
    other node never takes them, and the finish commits; once handed back, they are free."""
    a = Journal(location, node_id="node-a", lease_seconds=0.4)
    b = Journal(location, node_id="node-b", lease_seconds=0.4)
    _queue_jobs(a, 2)
    job = a.claim_job()
    done = b.claim_job()
    assert b.complete_job(done.id, [("sr", "/r/sr.dcm", "9.1")], ["pacs"])
    [delivery] = a.due_deliveries(time.time())
    heartbeat = Heartbeat(a)
    heartbeat.start()
    try:
        deadline = time.monotonic() + 1.6
        while time.monotonic() < deadline:
            assert b.claim_job() is None and b.due_deliveries(time.time()) == []
            time.sleep(0.1)
    finally:
        heartbeat.stop()
    a.release_deliveries([delivery])
    [again] = b.due_deliveries(time.time())  # handed back: free at once
    assert again.key == delivery.key
    assert a.complete_job(job.id, [], [])
    a.release_jobs([job.id])  # finished: nothing to hand back
    assert a.job(job.id).status == "done"
    a.close()
    b.close()


def test_nodes_creating_the_schema_at_once_all_start(postgres_url):
    """Six nodes open one empty PostgreSQL database at the same moment: the advisory lock
    lets one create the tables while the others wait, and every one of them works."""
    journals = [Journal(postgres_url) for _ in range(6)]
    start = threading.Barrier(len(journals))
    errors: list[BaseException] = []

    def first_statement(journal: Journal) -> None:
        start.wait()
        try:
            journal.record_instance(_instance(f"1.2.3.{id(journal)}"))
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=first_statement, args=(journal,)) for journal in journals]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert journals[0].queue_depths()["assembly"] == 6
    for journal in journals:
        journal.close()


# -- a node on a PostgreSQL journal that goes away ------------------------------------------------


def send_each(port: int, paths: Sequence[Path]) -> list[int]:
    """C-STORE each file over one association; the statuses answered."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADPIPE")
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(path).Status) for path in paths]
    finally:
        assoc.release()


def _echo(port: int) -> int:
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADPIPE")
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def _scraped_journal_up(node: Node) -> float:
    """radpipe_journal_up as /metrics serves it (the scrape itself must answer)."""
    url = f"http://127.0.0.1:{node.config.metrics.port}/metrics"
    with urllib.request.urlopen(url, timeout=60) as response:
        families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}
    return families["radpipe_journal_up"].samples[0].value


def test_postgresql_stopped_mid_send_is_out_of_resources_and_nothing_acknowledged_is_lost(
    own_postgres, start_node, tmp_path, demo_study, caplog
):
    """PostgreSQL stops (pg_ctl stop -m fast) in the middle of a send: C-STORE answers 0xA700,
    never success without a committed row, while echo and /metrics keep answering; once it
    is back, the sender's retry and the rest are stored, and both series are processed.
    The outage is two lines (down with its cause, back), not a traceback per poll."""
    caplog.set_level(logging.INFO, logger="plugin.journal_pg")
    own_postgres.start()
    # A quiet period longer than the outage: each series is one batch, whatever the timing.
    write_pipeline(tmp_path / "pipelines", completion={"level": "series", "quiet_seconds": 5, "min_instances": 1})
    node = start_node(journal={"url": own_postgres.create_database()})
    first, second = demo_study.values()
    assert send_each(node.port, first[:12]) == [0x0000] * 12
    own_postgres.stop()
    assert send_each(node.port, first[12:13]) == [0xA700]
    assert _echo(node.port) == 0x0000
    assert _scraped_journal_up(node) == 0
    sample = node.metrics.registry.get_sample_value
    assert sample("radpipe_instances_rejected_total", {"reason": "journal_unavailable"}) == 1
    time.sleep(2)  # every worker polls the journal it cannot reach, and the pool reconnects

    own_postgres.start()
    assert send_each(node.port, [*first[12:], *second]) == [0x0000] * (len(first) - 12 + len(second))
    for path in [*first, *second]:  # every acknowledged instance: its row, and its file as journaled
        record = node.journal.instance(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
        assert record is not None and Path(record.path).stat().st_size == record.size

    def settled() -> bool:
        jobs = node.journal.jobs()
        return bool(jobs) and all(j.status == "done" for j in jobs) and node.journal.queue_depths()["assembly"] == 0

    wait_for(settled, timeout=180, what="every instance batched, every job done")
    reported = {
        str(
            pydicom.dcmread(sr)
            .CurrentRequestedProcedureEvidenceSequence[0]
            .ReferencedSeriesSequence[0]
            .SeriesInstanceUID
        )
        for sr in results(node.results_dir)
    }
    assert reported == {str(pydicom.dcmread(paths[0]).SeriesInstanceUID) for paths in (first, second)}
    assert _scraped_journal_up(node) == 1
    outage = [r.getMessage() for r in caplog.records if r.name == "plugin.journal_pg"]
    assert len(outage) == 2 and " unreachable: " in outage[0] and " reachable again after " in outage[1], outage
    assert [r for r in caplog.records if r.exc_info or r.name.startswith("psycopg")] == []


def test_a_connection_lost_in_use_is_the_outage_line_alone(own_postgres, caplog):
    """PostgreSQL stops while a connection is lent: its borrower gets JournalUnavailable and
    the log says "unreachable" once, without psycopg_pool's warning about discarding the
    broken connection (one per connection in use when the server stopped, without the cause)."""
    own_postgres.start()
    backend = PostgresBackend(own_postgres.create_database())
    try:
        with pytest.raises(JournalUnavailable), backend.reading() as db:
            own_postgres.stop()
            db.execute("SELECT 1")
        own_postgres.start()
        with backend.reading() as db:
            assert db.execute("SELECT 1").fetchone() == (1,)
    finally:
        backend.close()
    lines = [(r.name, r.levelno, r.getMessage()) for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0][0] == "plugin.journal_pg" and " unreachable: " in lines[0][2], lines


def test_node_started_while_postgresql_is_down_waits_and_says_so(own_postgres, tmp_path, caplog):
    """No server yet: the node neither exits nor listens; it logs that it waits, and
    /metrics says radpipe_journal_up 0. Once PostgreSQL is up, it starts and answers."""
    write_pipeline(tmp_path / "pipelines")
    config = NodeConfig.model_validate(node_config(tmp_path, journal={"url": own_postgres.url()}))
    node = Node(config, CollectorRegistry())
    starting = threading.Thread(target=node.start, name="starting node")
    try:
        starting.start()
        wait_for(lambda: "unreachable; waiting for it" in caplog.text, what="the waiting line")
        assert starting.is_alive() and node.servers == []
        assert _scraped_journal_up(node) == 0
        own_postgres.start()
        starting.join(120)
        assert not starting.is_alive() and node.servers
        assert _echo(node.port) == 0x0000
        assert _scraped_journal_up(node) == 1
    finally:
        node.stop()
        starting.join(60)


def test_a_node_killed_right_after_its_claim_leaves_the_job_to_another_node(
    postgres_url, tmp_path, demo_study, storescp, monkeypatch, radpipe, start_node
):
    """node-a, a process of its own, SIGKILLs itself right after claiming its job (the
    runner's test hook); radpipe status names it as the job's holder. node-b, on the same
    PostgreSQL journal and storage folder, takes the job over once node-a's lease expires:
    dcmtk's storescp, the destination, receives exactly one SR."""
    pacs_port, pacs_dir = storescp
    write_pipeline(tmp_path / "pipelines")
    shared = shared_journal(postgres_url, pacs_port)
    lease = {"id": "node-a", "lease_seconds": 2}
    config, node_a_config = write_node_config(tmp_path, node=lease, metrics={"port": 0}, **shared)
    port = node_a_config["node"]["port"]
    journal = Journal(postgres_url)
    try:
        monkeypatch.setenv("RADPIPE_TEST_KILL_AFTER_CLAIM", "1")
        node_a = serve(config, port, tmp_path / "node-a.log")
        monkeypatch.delenv("RADPIPE_TEST_KILL_AFTER_CLAIM")
        assert storescu(port, *demo_study["Demo chest CT, no nodules"]).returncode == 0
        assert node_a.wait(60) == -signal.SIGKILL
        [job] = journal.jobs()
        assert (job.status, job.lease_owner, job.attempts) == ("running", "node-a", 1)
        code, out = radpipe("status", "--config", str(config))
        assert code == 0 and f"job #{job.id} lung-nodule-demo: node-a until" in out

        start_node(node={"id": "node-b", "lease_seconds": 2}, **shared)  # same storage folder
        wait_for(lambda: [d.status for d in journal.deliveries(job.id)] == ["delivered"], what="node-b's SR sent")
        done = journal.job(job.id)
        assert (done.status, done.lease_owner, done.attempts) == ("done", None, 2)
        received = [pydicom.dcmread(path, stop_before_pixels=True) for path in pacs_dir.iterdir()]
        assert [ds.Modality for ds in received] == ["SR"]
    finally:
        journal.close()
