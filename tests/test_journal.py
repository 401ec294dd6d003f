"""Journal rows read back exactly as written, and state survives reopening the database:
every test on both back ends, SQLite and PostgreSQL (a real server, tests/postgres.py)."""

import sqlite3
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

import psycopg
import pydicom
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from plugin.app import Node
from plugin.config import NodeConfig
from plugin.journal import SCHEMA_STATEMENTS, InstanceRecord, JobSpec, Journal, ResultRecord
from plugin.journal_pg import ddl
from plugin.logs import trace_id
from tests.conftest import node_config, results, wait_for, write_pipeline

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
    """radpipe 0.1 journals kept a sha256 per instance; the column goes, the rows stay."""
    old = [s.replace("path TEXT NOT NULL,", "path TEXT NOT NULL, sha256 TEXT NOT NULL,", 1) for s in SCHEMA_STATEMENTS]
    _execute(location, [*old, "INSERT INTO instances VALUES ('1.2.3.1', '1.2.840.10008.5.1.4.1.1.2', '1.2', '1.2.3',"
                              " '/s', 'ab', 10, 'CT1', 100.0, NULL)"])  # fmt: skip
    journal = Journal(location)
    assert journal.instance("1.2.3.1") == InstanceRecord(
        "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.3", "/s", 10, "CT1", 100.0
    )
    journal.record_instance(_instance("1.2.3.2"))
    assert journal.queue_depths()["assembly"] == 2
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
    assert job is not None and job.status == "running" and job.batch_id == batch
    journal.close()

    journal = Journal(location)  # a restart: the running job is queued again
    assert journal.requeue_running_jobs() == 1
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
    journal.record_attempt(delivery.result_id, "pacs", None)
    [delivered] = journal.deliveries(job.id)
    assert (delivered.status, delivered.attempts) == ("delivered", 1)

    # A late arrival re-opens the series; the next batch covers the whole series.
    journal.record_instance(_instance("1.2.3.9"))
    [late] = journal.pending_series()
    [second, study] = journal.create_batches("1.2", [(late, [])], [JobSpec("study-demo", "1", "e" * 64, 0)])
    assert journal.batch_routing(second) == "unrouted"
    assert len(journal.batch_instances(second)) == 4
    assert len(journal.batch_instances(study)) == 4  # the study batch covers every series of the study
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
    second = journal.claim_job()
    assert (first.pipeline, second.pipeline, journal.claim_job()) == ("live", "shadow", None)
    journal.complete_job(first.id, [("sr", "/r/live.dcm", "9.1")], ["pacs", "gone"], [("nodule", 0.75, True)])
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
    assert [d.destination for d in journal.deliveries_elsewhere(["pacs"])] == ["gone"]
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
    for delivery in journal.deliveries(status="pending"):
        journal.record_attempt(delivery.result_id, delivery.destination, None)
    assert journal.purgeable_studies(older_than=50.0) == []  # received since
    assert journal.purgeable_studies(older_than=time.time()) == ["1.2"]
    journal.forget_study("1.2")
    assert journal.jobs() == [] and journal.received_instances() == [] and journal.batch_study(batch) is None
    assert journal.queue_depths() == {"assembly": 0, "jobs": 0, "running": 0, "dispatch": 0, "dead_letter": 0}
    journal.close()


def test_claimants_side_by_side_never_take_the_same_job(location):
    """Four claimants, each with its own connection (on PostgreSQL, its own pool: as four
    nodes), drain 40 jobs: every job is claimed exactly once."""
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

    threads = [threading.Thread(target=drain, args=pair) for pair in zip(claimants, claimed, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    for claimant in claimants:
        claimant.close()
    every = [job_id for mine in claimed for job_id in mine]
    assert sorted(every) == [job.id for job in journal.jobs()]  # each once, none left out
    assert {job.status for job in journal.jobs()} == {"running"}
    journal.close()


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


def _send(port: int, paths: Sequence[Path]) -> list[int]:
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
    own_postgres, start_node, tmp_path, demo_study
):
    """PostgreSQL stops (pg_ctl stop -m fast) in the middle of a send: C-STORE answers 0xA700,
    never success without a committed row, while echo and /metrics keep answering; once it
    is back, the sender's retry and the rest are stored, and both series are processed."""
    own_postgres.start()
    # A quiet period longer than the outage: each series is one batch, whatever the timing.
    write_pipeline(tmp_path / "pipelines", completion={"level": "series", "quiet_seconds": 5, "min_instances": 1})
    node = start_node(journal={"url": own_postgres.create_database()})
    first, second = demo_study.values()
    assert _send(node.port, first[:12]) == [0x0000] * 12
    own_postgres.stop()
    assert _send(node.port, first[12:13]) == [0xA700]
    assert _echo(node.port) == 0x0000
    assert _scraped_journal_up(node) == 0
    sample = node.metrics.registry.get_sample_value
    assert sample("radpipe_instances_rejected_total", {"reason": "journal_unavailable"}) == 1

    own_postgres.start()
    assert _send(node.port, [*first[12:], *second]) == [0x0000] * (len(first) - 12 + len(second))
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
