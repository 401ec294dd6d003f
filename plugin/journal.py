"""The journal: every state change of every instance, job and delivery, in SQLite (WAL).

Each public method is one transaction, so after a crash the journal holds either the
whole change or none of it. All SQL lives here and sticks to what PostgreSQL also
accepts, so another backend can replace this module without touching its callers.

Lifecycle:
  instance received (batch_id NULL = pending)
  -> batch created for its series (routed: one job per matching pipeline; or unrouted)
  -> job queued -> running -> done (result written, one delivery per destination) | failed
  -> delivery pending -> delivered | failed
"""

import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    batch_id INTEGER
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_instance_uid, batch_id);
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    created_at REAL NOT NULL,
    routing TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    batch_id INTEGER NOT NULL,
    pipeline TEXT NOT NULL,
    pipeline_version TEXT NOT NULL,
    pipeline_sha256 TEXT NOT NULL,
    priority INTEGER NOT NULL,
    status TEXT NOT NULL,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    result_path TEXT,
    result_sop_instance_uid TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, priority, id);
CREATE TABLE IF NOT EXISTS deliveries (
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    delivered_at REAL,
    PRIMARY KEY (job_id, destination)
);
"""


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: str
    sha256: str
    size: int
    calling_ae: str
    received_at: float
    batch_id: int | None = None


@dataclass(frozen=True)
class PendingSeries:
    """A series with instances not yet assigned to any batch."""

    study_instance_uid: str
    series_instance_uid: str
    count: int
    first_received: float
    last_received: float
    first_path: str


@dataclass(frozen=True)
class JobSpec:
    """What the router asks for: run ``pipeline`` (at this version) on a batch."""

    pipeline: str
    pipeline_version: str
    pipeline_sha256: str
    priority: int


@dataclass(frozen=True)
class JobRecord:
    id: int
    batch_id: int
    pipeline: str
    pipeline_version: str
    pipeline_sha256: str
    priority: int
    status: str
    error: str | None
    created_at: float
    started_at: float | None
    finished_at: float | None
    result_path: str | None
    result_sop_instance_uid: str | None


@dataclass(frozen=True)
class Delivery:
    job_id: int
    destination: str
    status: str
    attempts: int
    last_error: str | None
    result_path: str
    pipeline: str


class Journal:
    """Thread-safe access to the journal database (one connection, one lock)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a commit is on disk before we answer
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- instances ---------------------------------------------------------------------

    def record_instance(self, record: InstanceRecord) -> bool:
        """Journal a stored instance. Returns False when the identical instance (same
        SOP Instance UID and content hash) is already journaled, so a re-send is a no-op;
        different content under a known UID makes the instance pending again."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT sha256 FROM instances WHERE sop_instance_uid = ?", (record.sop_instance_uid,)
            ).fetchone()
            if row is not None and row[0] == record.sha256:
                return False
            db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (record.sop_instance_uid,))
            db.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL)",
                (
                    record.sop_instance_uid,
                    record.sop_class_uid,
                    record.study_instance_uid,
                    record.series_instance_uid,
                    record.path,
                    record.sha256,
                    record.size,
                    record.calling_ae,
                    record.received_at,
                ),
            )
            return True

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,)).fetchone()
        return InstanceRecord(*row) if row else None

    def pending_series(self) -> list[PendingSeries]:
        with self._lock:
            rows = self._db.execute(
                "SELECT study_instance_uid, series_instance_uid, COUNT(*), MIN(received_at),"
                " MAX(received_at), MIN(path) FROM instances WHERE batch_id IS NULL"
                " GROUP BY study_instance_uid, series_instance_uid"
            ).fetchall()
        return [PendingSeries(*row) for row in rows]

    def create_batch(self, series: PendingSeries, jobs: Sequence[JobSpec]) -> int:
        """Close the series' pending instances into a batch and queue ``jobs`` for it
        (no jobs: the batch is journaled as unrouted)."""
        now = time.time()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO batches (study_instance_uid, series_instance_uid, created_at, routing)"
                " VALUES (?, ?, ?, ?)",
                (series.study_instance_uid, series.series_instance_uid, now, "routed" if jobs else "unrouted"),
            )
            batch_id = int(cursor.lastrowid or 0)
            db.execute(
                "UPDATE instances SET batch_id = ? WHERE series_instance_uid = ? AND batch_id IS NULL",
                (batch_id, series.series_instance_uid),
            )
            db.executemany(
                "INSERT INTO jobs (batch_id, pipeline, pipeline_version, pipeline_sha256, priority,"
                " status, created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                [(batch_id, j.pipeline, j.pipeline_version, j.pipeline_sha256, j.priority, now) for j in jobs],
            )
        return batch_id

    def batch_routing(self, batch_id: int) -> str | None:
        with self._lock:
            row = self._db.execute("SELECT routing FROM batches WHERE id = ?", (batch_id,)).fetchone()
        return row[0] if row else None

    def batch_instances(self, batch_id: int) -> list[InstanceRecord]:
        """Every instance of the batch's series received up to this batch: a re-run after
        late arrivals sees the whole series, not only the late instances."""
        with self._lock:
            rows = self._db.execute(
                "SELECT i.* FROM instances i JOIN batches b ON i.series_instance_uid = b.series_instance_uid"
                " WHERE b.id = ? AND i.batch_id IS NOT NULL AND i.batch_id <= b.id"
                " ORDER BY i.sop_instance_uid",
                (batch_id,),
            ).fetchall()
        return [InstanceRecord(*row) for row in rows]

    # -- jobs --------------------------------------------------------------------------

    def claim_job(self) -> JobRecord | None:
        """Mark the most urgent queued job as running and return it."""
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE status = 'queued' ORDER BY priority DESC, id LIMIT 1"
            ).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', started_at = ? WHERE id = ?", (time.time(), row[0]))
            return JobRecord(*db.execute("SELECT * FROM jobs WHERE id = ?", (row[0],)).fetchone())

    def job(self, job_id: int) -> JobRecord | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return JobRecord(*row) if row else None

    def jobs(self) -> list[JobRecord]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY id").fetchall()
        return [JobRecord(*row) for row in rows]

    def complete_job(
        self, job_id: int, result_path: str, result_sop_instance_uid: str, destinations: Sequence[str]
    ) -> None:
        """The result is on disk: mark the job done and queue one delivery per destination."""
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status = 'done', finished_at = ?, result_path = ?,"
                " result_sop_instance_uid = ? WHERE id = ?",
                (time.time(), result_path, result_sop_instance_uid, job_id),
            )
            db.executemany(
                "INSERT INTO deliveries (job_id, destination, status) VALUES (?, ?, 'pending')",
                [(job_id, d) for d in destinations],
            )

    def fail_job(self, job_id: int, error: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ? WHERE id = ?",
                (time.time(), error, job_id),
            )

    def requeue_running_jobs(self) -> int:
        """On start: jobs a crash interrupted run again (their result UIDs are deterministic)."""
        with self._transaction() as db:
            return db.execute("UPDATE jobs SET status = 'queued' WHERE status = 'running'").rowcount

    # -- deliveries --------------------------------------------------------------------

    def pending_deliveries(self) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT d.job_id, d.destination, d.status, d.attempts, d.last_error, j.result_path, j.pipeline"
                " FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.status = 'pending'"
                " ORDER BY j.priority DESC, d.job_id"
            ).fetchall()
        return [Delivery(*row) for row in rows]

    def deliveries(self, job_id: int) -> list[Delivery]:
        with self._lock:
            rows = self._db.execute(
                "SELECT d.job_id, d.destination, d.status, d.attempts, d.last_error, j.result_path, j.pipeline"
                " FROM deliveries d JOIN jobs j ON j.id = d.job_id WHERE d.job_id = ? ORDER BY d.destination",
                (job_id,),
            ).fetchall()
        return [Delivery(*row) for row in rows]

    def record_delivery(self, job_id: int, destination: str, attempts: int, error: str | None) -> None:
        """``error`` None: the destination answered success; else the delivery failed."""
        with self._transaction() as db:
            db.execute(
                "UPDATE deliveries SET status = ?, attempts = ?, last_error = ?, delivered_at = ?"
                " WHERE job_id = ? AND destination = ?",
                (
                    "delivered" if error is None else "failed",
                    attempts,
                    error,
                    time.time() if error is None else None,
                    job_id,
                    destination,
                ),
            )

    # -- monitoring --------------------------------------------------------------------

    def queue_depths(self) -> dict[str, int]:
        """Work waiting in each queue: pending instances, queued/running jobs, deliveries."""
        with self._lock:
            pending = self._db.execute("SELECT COUNT(*) FROM instances WHERE batch_id IS NULL").fetchone()[0]
            jobs = dict(self._db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
            deliveries = self._db.execute("SELECT COUNT(*) FROM deliveries WHERE status = 'pending'").fetchone()[0]
        return {
            "assembly": pending,
            "jobs": jobs.get("queued", 0),
            "running": jobs.get("running", 0),
            "dispatch": deliveries,
        }
