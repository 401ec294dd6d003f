"""Journal rows read back exactly as written, and state survives reopening the database."""

import sqlite3

import pytest

from plugin.journal import SCHEMA, InstanceRecord, JobSpec, Journal, ResultRecord


def _instance(sop: str, series: str = "1.2.3", size: int = 10) -> InstanceRecord:
    return InstanceRecord(sop, "1.2.840.10008.5.1.4.1.1.2", "1.2", series, f"/spool/{sop}.dcm", size, "CT1", 100.0)


def test_instance_round_trip_and_replacement_of_a_lost_file(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    record = _instance("1.2.3.1")
    journal.record_instance(record)
    assert journal.instance("1.2.3.1") == record
    with pytest.raises(sqlite3.IntegrityError):  # a known UID is the node's call (plugin/resend.py), never a 2nd row
        journal.record_instance(_instance("1.2.3.1", size=11))
    replaced = _instance("1.2.3.1", size=12)  # its file was lost before the flush: received again
    journal.record_instance(replaced, replace=True)
    assert journal.instance("1.2.3.1") == replaced
    journal.close()


def test_journal_of_an_earlier_version_opens_with_its_rows(tmp_path):
    """radpipe 0.1 journals kept a sha256 per instance; the column goes, the rows stay."""
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript(SCHEMA.replace("path TEXT NOT NULL,", "path TEXT NOT NULL, sha256 TEXT NOT NULL,", 1))
    db.execute("INSERT INTO instances VALUES ('1.2.3.1', '1.2.840.10008.5.1.4.1.1.2', '1.2', '1.2.3', '/s', 'ab', 10,"
               " 'CT1', 100.0, NULL)")  # fmt: skip
    db.commit()
    db.close()
    journal = Journal(path)
    assert journal.instance("1.2.3.1") == InstanceRecord(
        "1.2.3.1", "1.2.840.10008.5.1.4.1.1.2", "1.2", "1.2.3", "/s", 10, "CT1", 100.0
    )
    journal.record_instance(_instance("1.2.3.2"))
    assert journal.queue_depths()["assembly"] == 2
    journal.close()


def test_batch_job_delivery_lifecycle_survives_reopen(tmp_path):
    journal = Journal(tmp_path / "j.sqlite")
    for n in range(3):
        journal.record_instance(_instance(f"1.2.3.{n}"))
    [series] = journal.pending_series()
    assert series.count == 3
    [batch] = journal.create_batches("1.2", [(series, [JobSpec("demo", "1", "f" * 64, 0)])], [])
    assert journal.pending_series() == []
    job = journal.claim_job()
    assert job is not None and job.status == "running" and job.batch_id == batch
    journal.close()

    journal = Journal(tmp_path / "j.sqlite")  # a restart: the running job is queued again
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
