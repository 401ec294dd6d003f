"""The journal: every state change of every instance, job and delivery, in SQLite (WAL)
or, with ``journal.url: postgresql://...``, in PostgreSQL (several nodes, one journal).

Each public method is one transaction, so after a crash the journal holds either the
whole change or none of it. All of the journal's SQL lives here, written once for both
back ends (``?`` placeholders, SQLite's column types): what differs between them (how to
connect, lock and claim, and PostgreSQL's types) is a small back-end object, SQLite's
below and PostgreSQL's in :mod:`plugin.journal_pg`.

Lifecycle:
  instance received (batch_id NULL = pending)
  -> batch created for its series (routed: one job per matching series-level pipeline;
     or unrouted), plus a study batch when a study-level pipeline matched; instances
     arriving after it make the series pending again, and its next batch is the next
     ``generation`` (1, 2, ...), whose job waits for the earlier generation's and whose
     result supersedes it
  -> job queued -> running -> done (results written; one delivery per result and destination) | failed
  -> delivery pending (retried with backoff) -> delivered | dead (dead letter; ``retry`` requeues)

Leases: a running job and a delivery being sent belong to one node (``lease_owner``, the
node's id) until ``lease_until``; the node's heartbeat (:meth:`Journal.renew_leases`)
pushes that back while it works on them. Any node may claim a job or delivery whose lease
has expired (its node died or hung); the late finish of the node that lost it is refused
(fenced: only the owner of the claim it finished commits). A job claimed
``MAX_JOB_CLAIMS`` times without a finish fails instead of killing one more node.

Several nodes' assemblers see the same pending instances and may judge the same series
complete at the same moment: :meth:`Journal.create_batches` closes a series only if
every instance its caller counted is still pending, checked under a lock on the study
(the back end's ``exclusive``) in the transaction that closes it, so exactly one node
closes it and the others create nothing. A lock per study, not per poll: nodes close
different studies side by side.

New work is announced: the transaction that queues jobs or deliveries notifies a channel
(:data:`JOBS_QUEUED`, :data:`DELIVERIES_DUE`; PostgreSQL's NOTIFY, sent at commit), and
:meth:`Journal.listen` wakes this node's workers when another node's does, so that a job
queued by one node's assembler is claimed by an infer node at once, not at its next poll
(polling stays, for a notification lost with a connection). SQLite's one node wakes its
workers in process.

A study's trace id (``logs.trace_id``) is not stored: it is a function of
``study_instance_uid``, computed where it is needed (:meth:`Journal.study_of_trace`).
"""

import logging
import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from plugin.logs import trace_id

SCHEMA = """
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    sop_class_uid TEXT NOT NULL,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    calling_ae TEXT NOT NULL,
    received_at REAL NOT NULL,
    batch_id INTEGER,
    attributes TEXT
);
CREATE INDEX IF NOT EXISTS instances_by_series ON instances (series_instance_uid, batch_id);
-- The assembler polls pending instances several times a second: this keeps that poll
-- proportional to what is pending, not to everything ever stored.
CREATE INDEX IF NOT EXISTS instances_pending ON instances (study_instance_uid, series_instance_uid)
    WHERE batch_id IS NULL;
CREATE TABLE IF NOT EXISTS batches (
    id INTEGER PRIMARY KEY,
    study_instance_uid TEXT NOT NULL,
    series_instance_uid TEXT,
    created_at REAL NOT NULL,
    routing TEXT NOT NULL,
    generation INTEGER NOT NULL DEFAULT 1
);
-- A close numbers its batch after the series' (or study's) earlier ones; a re-run finds
-- the result it supersedes: both look up the batches of one series.
CREATE INDEX IF NOT EXISTS batches_by_series ON batches (study_instance_uid, series_instance_uid);
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
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs (status, priority, id);
CREATE TABLE IF NOT EXISTS results (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL,
    sop_instance_uid TEXT NOT NULL
);
-- Retention asks, for every old file of the results folder, whether a row names it.
CREATE INDEX IF NOT EXISTS results_by_sop ON results (sop_instance_uid);
CREATE TABLE IF NOT EXISTS deliveries (
    result_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    first_attempt_at REAL,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    delivered_at REAL,
    lease_owner TEXT,
    lease_until REAL,
    PRIMARY KEY (result_id, destination)
);
-- What each classification job found, per finding: what a shadow pipeline is compared on.
-- (CREATE ... IF NOT EXISTS: a journal of an earlier radpipe gains it empty on open.)
CREATE TABLE IF NOT EXISTS findings (
    job_id INTEGER NOT NULL,
    label TEXT NOT NULL,
    probability REAL NOT NULL,
    present INTEGER NOT NULL,
    PRIMARY KEY (job_id, label)
);
-- Each destination's sender polls for its due deliveries several times a second: this
-- keeps that poll proportional to what is pending, not to everything ever delivered.
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (destination, next_attempt_at)
    WHERE status = 'pending';
"""
# One statement at a time: PostgreSQL's types replace SQLite's in each (plugin/journal_pg.py).
SCHEMA_STATEMENTS = [statement.strip() for statement in SCHEMA.split(";\n") if statement.strip()]
POSTGRESQL_SCHEMES = ("postgresql://", "postgres://")
# The columns added since to tables of an earlier radpipe's journal (added on open):
# what the receipt read of an instance's header (plugin/attributes.py), leases, and the
# generation of a batch (the how-manieth close of its series or study).
ADDED_COLUMNS = {
    "instances": ("attributes TEXT",),
    "jobs": ("attempts INTEGER NOT NULL DEFAULT 0", "lease_owner TEXT", "lease_until REAL"),
    "deliveries": ("lease_owner TEXT", "lease_until REAL"),
    "batches": ("generation INTEGER NOT NULL DEFAULT 1",),
}
# The generation a new batch of a series (a study batch: of the study) gets: one more than
# its latest batch's. ``CAST(? AS TEXT)``: typed, as PostgreSQL cannot infer a bare NULL's type.
_NEXT_GENERATION = (
    "SELECT COALESCE(MAX(generation), 0) + 1 FROM batches WHERE study_instance_uid = ?"
    " AND COALESCE(series_instance_uid, '') = COALESCE(CAST(? AS TEXT), '')"
)
# The channels of :meth:`Journal.listen`: jobs were queued (runners claim), deliveries
# became due (senders send).
JOBS_QUEUED, DELIVERIES_DUE = "radpipe_jobs", "radpipe_deliveries"
# How long a claim holds without a heartbeat: a dead node's work waits this long for
# another node. The heartbeat renews every third of it, so a node loses a lease only when
# it cannot reach the journal for two renewals in a row.
LEASE_SECONDS = 30.0
# A job whose lease expired this often (its node died or hung on it each time) fails
# with the reason, rather than taking one more node down: a poison input.
MAX_JOB_CLAIMS = 3

log = logging.getLogger(__name__)


def default_node_id() -> str:
    """``hostname-pid``: unique among processes sharing a journal, whatever their host.
    A node restarted under the same id takes its own leases back at once."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class InstanceRecord:
    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    path: str
    size: int
    calling_ae: str
    received_at: float
    batch_id: int | None = None
    attributes: str | None = None  # plugin/attributes.py's journal entry; None: read the file


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
class Batch:
    """A closed series (``series_instance_uid`` None: a study) and its ``generation``: 1
    for its first close, one more for each close after instances arrived again."""

    id: int
    series_instance_uid: str | None
    generation: int


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
    attempts: int = 0  # claims so far (the claim's fencing token)
    lease_owner: str | None = None
    lease_until: float | None = None
    generation: int = 1  # its batch's


@dataclass(frozen=True)
class ResultRecord:
    """One object a job wrote (``kind``: sr, kos or seg)."""

    id: int
    job_id: int
    kind: str
    path: str
    sop_instance_uid: str


@dataclass(frozen=True)
class FindingPair:
    """One finding of one series (``series_instance_uid`` None: a study) as a shadow
    pipeline and the live pipeline it shadows each reported it."""

    study_instance_uid: str
    series_instance_uid: str | None
    label: str
    live_probability: float
    live_present: bool
    shadow_probability: float
    shadow_present: bool

    @property
    def agree(self) -> bool:
        return self.live_present == self.shadow_present


@dataclass(frozen=True)
class Delivery:
    result_id: int
    job_id: int
    destination: str
    status: str
    attempts: int
    last_error: str | None
    first_attempt_at: float | None
    result_path: str
    kind: str  # the result's: sr, kos or seg (a job's results go to each destination one by one)
    pipeline: str
    study_instance_uid: str
    lease_owner: str | None = None
    lease_until: float | None = None

    @property
    def key(self) -> tuple[int, str]:
        return self.result_id, self.destination

    @property
    def name(self) -> str:
        """How log lines and ``status --trace`` name it: ``job 7 SEG -> pacs``."""
        return f"job {self.job_id} {self.kind.upper()} -> {self.destination}"


@dataclass(frozen=True)
class Lease:
    """Who holds a running job or a delivery being sent, and until when (``radpipe status``)."""

    job_id: int
    pipeline: str
    destination: str | None  # None: the job itself
    kind: str | None  # a delivery's result: sr, kos or seg
    owner: str
    until: float


class JournalUnavailable(Exception):
    """The journal's database cannot be reached now (PostgreSQL down or restarting, no
    pooled connection free in time). Nothing of the change was committed: a caller that
    can answer "later" does so (C-STORE 0xA700) and keeps running."""


class Cursor(Protocol):
    """What the journal reads from an executed statement (DB-API)."""

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...

    def fetchone(self) -> Any: ...

    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """The part of DB-API the journal's SQL runs on, with ``?`` placeholders."""

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Cursor: ...

    def executemany(self, sql: str, parameters: Iterable[Sequence[Any]], /) -> object: ...


class Backend(Protocol):
    """What differs between the journal's databases; the SQL itself does not."""

    # Several nodes share the journal (PostgreSQL); SQLite's file has one node.
    shared: bool

    def lock(self, table: str) -> str:
        """Appended to a SELECT that picks rows to claim: PostgreSQL's nodes claim side by
        side (FOR UPDATE SKIP LOCKED); SQLite's single writer needs nothing."""

    def exclusive(self, db: Connection, name: str) -> None:
        """Within a transaction: hold ``name`` until it ends, so that another node's
        transaction taking the same name waits for it (a check then a change, atomic
        across nodes). SQLite's transactions are serial already (BEGIN IMMEDIATE)."""

    def notify(self, db: Connection, channel: str) -> None:
        """Within a transaction: tell the nodes listening on ``channel`` once it commits."""

    def listen(self, wake: Mapping[str, Callable[[], None]]) -> None:
        """Until :meth:`close`: call ``wake[channel]`` whenever a notification on it arrives."""

    def prepare(self, create: Callable[[Connection], None]) -> None:
        """Have ``create`` (schema and migrations) run once, before the first statement
        of this process."""

    def ddl(self, statement: str) -> str:
        """A statement of :data:`SCHEMA` in this database's types."""

    def transaction(self) -> AbstractContextManager[Connection]:
        """One write transaction: committed at the end of the block, rolled back on error."""

    def reading(self) -> AbstractContextManager[Connection]:
        """A connection for reads."""

    def close(self) -> None: ...


class SqliteBackend:
    """One connection and one lock for the node's threads: SQLite has one writer at a time
    anyway, and BEGIN IMMEDIATE makes a claim exclusive (other processes on the same file
    wait for it) without any row locks."""

    shared = False

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # WAL + NORMAL: a commit is atomic and survives a process crash; what must also
        # survive power loss before the node answers (a received instance) is flushed by
        # the node's group sync. Anything else lost that way is redone idempotently.
        self._db.execute("PRAGMA synchronous=NORMAL")

    def prepare(self, create: Callable[[Connection], None]) -> None:
        # Statement by statement (autocommit): on an existing journal every one is a no-op
        # that takes no write lock, so a reader (radpipe status) opens it beside a busy node.
        with self._lock:
            create(self._db)

    def ddl(self, statement: str) -> str:
        return statement

    def lock(self, table: str) -> str:
        return ""

    def exclusive(self, db: Connection, name: str) -> None:
        pass

    def notify(self, db: Connection, channel: str) -> None:
        pass  # one node: its workers wake each other in process

    def listen(self, wake: Mapping[str, Callable[[], None]]) -> None:
        pass

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def reading(self) -> Iterator[Connection]:
        with self._lock:
            yield self._db

    def close(self) -> None:
        with self._lock:
            self._db.close()


class Journal:
    """Thread-safe access to the journal: ``location`` is the SQLite file's path, or a
    ``postgresql://`` URL (a libpq connection URI). ``node_id`` owns the leases this
    journal claims, each for ``lease_seconds`` unless renewed."""

    def __init__(self, location: Path | str, node_id: str | None = None, lease_seconds: float = LEASE_SECONDS) -> None:
        self.node_id = node_id or default_node_id()
        self.lease_seconds = lease_seconds
        # What this process claimed and has not finished: the heartbeat renews these only.
        # A job is held with its claim's ``attempts``, the token its finish is fenced on.
        self._held_jobs: dict[int, int] = {}
        self._held_deliveries: set[tuple[int, str]] = set()
        self._held_lock = threading.Lock()
        self._backend: Backend
        if isinstance(location, str) and location.startswith(POSTGRESQL_SCHEMES):
            from plugin.journal_pg import PostgresBackend  # psycopg only where it is used

            self._backend = PostgresBackend(location)
        else:
            self._backend = SqliteBackend(Path(location))
        self._backend.prepare(self._create)

    def _create(self, db: Connection) -> None:
        for statement in SCHEMA_STATEMENTS:
            db.execute(self._backend.ddl(statement))
        self._migrate(db)

    def _migrate(self, db: Connection) -> None:
        """Bring a journal written by an earlier radpipe to this schema, keeping every row."""
        columns = {column[0] for column in db.execute("SELECT * FROM instances WHERE 1 = 0").description}
        if "sha256" in columns:  # radpipe <= 0.1 hashed every instance; sameness is now decided by content
            db.execute("ALTER TABLE instances DROP COLUMN sha256")
        appended: set[str] = set()
        for table, added in ADDED_COLUMNS.items():  # appended, rows kept (none leased)
            columns = {column[0] for column in db.execute(f"SELECT * FROM {table} WHERE 1 = 0").description}
            for column in added:
                if column.split()[0] not in columns:
                    db.execute(self._backend.ddl(f"ALTER TABLE {table} ADD COLUMN {column}"))
                    appended.add(column.split()[0])
        if "generation" in appended:  # the batches of each series (or study) numbered in order
            db.execute(
                "UPDATE batches SET generation = (SELECT COUNT(*) FROM batches earlier"
                " WHERE earlier.study_instance_uid = batches.study_instance_uid AND earlier.id <= batches.id"
                " AND COALESCE(earlier.series_instance_uid, '') = COALESCE(batches.series_instance_uid, ''))"
            )

    def listen(self, wake: Mapping[str, Callable[[], None]]) -> None:
        """Wake this node's workers when another node queues work for them: ``wake`` maps
        :data:`JOBS_QUEUED` or :data:`DELIVERIES_DUE` to a worker's ``wake``."""
        self._backend.listen(wake)

    def close(self) -> None:
        self._backend.close()

    def _all(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        with self._backend.reading() as db:
            return db.execute(sql, parameters).fetchall()

    def _one(self, sql: str, parameters: Sequence[Any] = ()) -> Any:
        with self._backend.reading() as db:
            return db.execute(sql, parameters).fetchone()

    def _change(self, sql: str, parameters: Sequence[Any] = ()) -> int:
        """One statement in a transaction of its own; how many rows it changed."""
        with self._backend.transaction() as db:
            return int(db.execute(sql, parameters).rowcount)

    # -- instances ---------------------------------------------------------------------

    def record_instance(self, record: InstanceRecord, replace: bool = False) -> None:
        """Journal a stored instance, pending. With ``replace`` (the instance's file was
        lost before it was flushed), its earlier row is replaced and it is pending again.
        Whether a known SOP Instance UID is the same instance is the node's call."""
        with self._backend.transaction() as db:
            if replace:
                db.execute("DELETE FROM instances WHERE sop_instance_uid = ?", (record.sop_instance_uid,))
            db.execute(
                "INSERT INTO instances VALUES (?, ?, ?, ?, ?, ?, ?, ?, NULL, ?)",
                (
                    record.sop_instance_uid,
                    record.sop_class_uid,
                    record.study_instance_uid,
                    record.series_instance_uid,
                    record.path,
                    record.size,
                    record.calling_ae,
                    record.received_at,
                    record.attributes,
                ),
            )

    def instance(self, sop_instance_uid: str) -> InstanceRecord | None:
        row = self._one("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_instance_uid,))
        return InstanceRecord(*row) if row else None

    def pending_series(self) -> list[PendingSeries]:
        rows = self._all(
            "SELECT study_instance_uid, series_instance_uid, COUNT(*), MIN(received_at),"
            " MAX(received_at), MIN(path) FROM instances WHERE batch_id IS NULL"
            " GROUP BY study_instance_uid, series_instance_uid"
        )
        return [PendingSeries(*row) for row in rows]

    def received_series(self, since: float = 0.0) -> list[PendingSeries]:
        """Every series with instances received at or after ``since`` (epoch seconds), pending
        or not, in order of arrival; ``first_path`` is the instance the assembler would route on."""
        rows = self._all(
            "SELECT study_instance_uid, series_instance_uid, COUNT(*), MIN(received_at),"
            " MAX(received_at), MIN(path) FROM instances WHERE received_at >= ?"
            " GROUP BY study_instance_uid, series_instance_uid ORDER BY MIN(received_at), series_instance_uid",
            (since,),
        )
        return [PendingSeries(*row) for row in rows]

    def received_instances(self, since: float = 0.0) -> list[InstanceRecord]:
        """Every instance received at or after ``since`` (epoch seconds), pending or not."""
        rows = self._all(
            "SELECT * FROM instances WHERE received_at >= ? ORDER BY received_at, sop_instance_uid", (since,)
        )
        return [InstanceRecord(*row) for row in rows]

    def create_batches(
        self, study_uid: str, series: Sequence[tuple[PendingSeries, Sequence[JobSpec]]], study_jobs: Sequence[JobSpec]
    ) -> list[Batch]:
        """Close pending series into batches and queue their jobs, in one transaction.

        Each series gets a batch with its series-level ``jobs`` (none: journaled as
        unrouted); ``study_jobs`` get one study batch over everything received for the
        study so far. Returns the batches, the study batch last.

        Nodes sharing the journal each decide from the same rows that a series is
        complete, so closing checks first, under the study's lock (the back end's
        ``exclusive``), that every instance each ``series`` counted is still pending: if
        another node closed any of them first, nothing is created and the result is empty."""
        now = time.time()
        closed = []
        with self._backend.transaction() as db:
            self._backend.exclusive(db, f"study {study_uid}")
            for pending, _ in series:
                still = db.execute(
                    "SELECT COUNT(*) FROM instances WHERE series_instance_uid = ? AND batch_id IS NULL"
                    " AND received_at <= ?",
                    (pending.series_instance_uid, pending.last_received),
                ).fetchone()[0]
                if still != pending.count:
                    return []

            def batch(series_uid: str | None, jobs: Sequence[JobSpec]) -> Batch:
                generation = int(db.execute(_NEXT_GENERATION, (study_uid, series_uid)).fetchone()[0])
                batch_id = int(
                    db.execute(
                        "INSERT INTO batches (study_instance_uid, series_instance_uid, created_at, routing, generation)"
                        " VALUES (?, ?, ?, ?, ?) RETURNING id",
                        (study_uid, series_uid, now, "routed" if jobs else "unrouted", generation),
                    ).fetchone()[0]
                )
                db.executemany(
                    "INSERT INTO jobs (batch_id, pipeline, pipeline_version, pipeline_sha256, priority,"
                    " status, created_at) VALUES (?, ?, ?, ?, ?, 'queued', ?)",
                    [(batch_id, j.pipeline, j.pipeline_version, j.pipeline_sha256, j.priority, now) for j in jobs],
                )
                return Batch(batch_id, series_uid, generation)

            for pending, jobs in series:
                closed.append(batch(pending.series_instance_uid, jobs))
                db.execute(
                    "UPDATE instances SET batch_id = ? WHERE series_instance_uid = ? AND batch_id IS NULL",
                    (closed[-1].id, pending.series_instance_uid),
                )
            if study_jobs:
                closed.append(batch(None, study_jobs))
            if study_jobs or any(jobs for _, jobs in series):
                self._backend.notify(db, JOBS_QUEUED)
        return closed

    def batch_study(self, batch_id: int) -> str | None:
        row = self._one("SELECT study_instance_uid FROM batches WHERE id = ?", (batch_id,))
        return row[0] if row else None

    def study_of_trace(self, trace: str) -> str | None:
        """The Study Instance UID whose trace id is ``trace``, among the journaled ones."""
        rows = self._all("SELECT study_instance_uid FROM instances UNION SELECT study_instance_uid FROM batches")
        return next((uid for (uid,) in rows if trace_id(uid) == trace), None)

    def study_received(self, study_uid: str) -> tuple[int, float | None, float | None]:
        """How many instances of the study were received, the first and the last when."""
        row = self._one(
            "SELECT COUNT(*), MIN(received_at), MAX(received_at) FROM instances WHERE study_instance_uid = ?",
            (study_uid,),
        )
        return row[0], row[1], row[2]

    # A job as :class:`JobRecord` reads it: its row and its batch's generation.
    _JOB = "SELECT j.*, b.generation FROM jobs j JOIN batches b ON b.id = j.batch_id"

    def study_jobs(self, study_uid: str) -> list[JobRecord]:
        rows = self._all(f"{self._JOB} WHERE b.study_instance_uid = ? ORDER BY j.id", (study_uid,))
        return [JobRecord(*row) for row in rows]

    def batch_routing(self, batch_id: int) -> str | None:
        row = self._one("SELECT routing FROM batches WHERE id = ?", (batch_id,))
        return row[0] if row else None

    def batch_instances(self, batch_id: int) -> list[InstanceRecord]:
        """Every instance of the batch's series (or, for a study batch, study) received up
        to this batch: a re-run after late arrivals sees the whole series, not only the
        late instances."""
        rows = self._all(
            "SELECT i.* FROM instances i JOIN batches b ON i.study_instance_uid = b.study_instance_uid"
            " WHERE b.id = ? AND i.batch_id IS NOT NULL AND i.batch_id <= b.id"
            " AND (b.series_instance_uid IS NULL OR i.series_instance_uid = b.series_instance_uid)"
            " ORDER BY i.sop_instance_uid",
            (batch_id,),
        )
        return [InstanceRecord(*row) for row in rows]

    # -- jobs --------------------------------------------------------------------------

    # The same pipeline's unfinished jobs on earlier generations of a job's series or study.
    _EARLIER_UNFINISHED = (
        "SELECT 1 FROM jobs earlier JOIN batches eb ON eb.id = earlier.batch_id JOIN batches mine"
        " ON mine.id = jobs.batch_id WHERE earlier.pipeline = jobs.pipeline"
        " AND earlier.status IN ('queued', 'running') AND eb.study_instance_uid = mine.study_instance_uid"
        " AND COALESCE(eb.series_instance_uid, '') = COALESCE(mine.series_instance_uid, '')"
        " AND eb.generation < mine.generation"
    )
    # The same batch's unfinished jobs of more urgent pipelines (a shadow's live one).
    _MORE_URGENT_UNFINISHED = (
        "SELECT 1 FROM jobs urgent WHERE urgent.batch_id = jobs.batch_id AND urgent.priority > jobs.priority"
        " AND urgent.status IN ('queued', 'running')"
    )

    def claim_job(self, pipeline_sha256: str | None = None) -> JobRecord | None:
        """Lease the most urgent job that is queued, or running on an expired lease, to
        this node and return it; with ``pipeline_sha256``, only if that job was routed to
        this pipeline version. Safe with several claimants: each job goes to one (the back
        end's ``lock``). Expired jobs already claimed ``MAX_JOB_CLAIMS`` times fail first.
        A job waits while its pipeline's job on an earlier generation of its series (or
        study) is queued or running: the later SR supersedes the earlier one, so it is
        written after it, whichever node or lane runs each. It also waits while a job of
        a more urgent pipeline on its batch is: a shadow is compared with its live
        pipeline's finished job."""
        now = time.time()
        expired = "status = 'running' AND COALESCE(lease_until, 0) < ?"
        with self._backend.transaction() as db:
            abandoned = db.execute(
                "UPDATE jobs SET status = 'failed', finished_at = ?, error = ?, lease_owner = NULL, lease_until = NULL"
                f" WHERE id IN (SELECT id FROM jobs WHERE {expired} AND attempts >= ?{self._backend.lock('jobs')})"
                " RETURNING id, pipeline",
                (now, f"abandoned: claimed {MAX_JOB_CLAIMS} times, never finished", now, MAX_JOB_CLAIMS),
            ).fetchall()
            row = db.execute(
                # id = (...), not id IN (...): PostgreSQL may run an IN's subquery once per
                # row, each run skipping the rows the last one locked, and so lease them all
                "UPDATE jobs SET status = 'running', started_at = ?, attempts = attempts + 1, lease_owner = ?,"
                f" lease_until = ? WHERE id = (SELECT id FROM jobs WHERE (status = 'queued' OR ({expired}))"
                f" AND NOT EXISTS ({self._EARLIER_UNFINISHED}) AND NOT EXISTS ({self._MORE_URGENT_UNFINISHED})"
                f" ORDER BY priority DESC, id LIMIT 1{self._backend.lock('jobs')})"
                " AND (CAST(? AS TEXT) IS NULL OR pipeline_sha256 = ?)"
                " RETURNING *, (SELECT generation FROM batches WHERE batches.id = jobs.batch_id)",
                (now, self.node_id, now + self.lease_seconds, now, pipeline_sha256, pipeline_sha256),
            ).fetchone()
        for job_id, pipeline in abandoned:
            log.error("job %d (%s) failed: claimed %d times, never finished", job_id, pipeline, MAX_JOB_CLAIMS)
        if row is None:
            return None
        job = JobRecord(*row)
        with self._held_lock:
            self._held_jobs[job.id] = job.attempts
        return job

    def job(self, job_id: int) -> JobRecord | None:
        row = self._one(f"{self._JOB} WHERE j.id = ?", (job_id,))
        return JobRecord(*row) if row else None

    def jobs(self) -> list[JobRecord]:
        return [JobRecord(*row) for row in self._all(f"{self._JOB} ORDER BY j.id")]

    def complete_job(
        self,
        job_id: int,
        results: Sequence[tuple[str, str, str]],
        destinations: Sequence[str],
        findings: Sequence[tuple[str, float, bool]] = (),
    ) -> bool:
        """The job's results (kind, path, SOP Instance UID) are on disk: mark the job done,
        keep its ``findings`` (label, probability, present) and queue one delivery per
        result and destination. False, nothing journaled, when this node's claim of the
        job is no longer its lease (fenced: another node took it over)."""
        with self._finishing(job_id) as (db, fence):
            sql = f"UPDATE jobs SET status = 'done', finished_at = ?,{self._FENCED}"
            if not db.execute(sql, (time.time(), *fence)).rowcount:
                return False
            db.executemany(
                "INSERT INTO findings (job_id, label, probability, present) VALUES (?, ?, ?, ?)",
                [(job_id, label, probability, int(present)) for label, probability, present in findings],
            )
            for kind, path, sop_uid in results:
                result_id = db.execute(
                    "INSERT INTO results (job_id, kind, path, sop_instance_uid) VALUES (?, ?, ?, ?) RETURNING id",
                    (job_id, kind, path, sop_uid),
                ).fetchone()[0]
                db.executemany(
                    "INSERT INTO deliveries (result_id, destination, status) VALUES (?, ?, 'pending')",
                    [(result_id, d) for d in destinations],
                )
            if results and destinations:
                self._backend.notify(db, DELIVERIES_DUE)
        return True

    # A finish commits only on the claim this process holds: its owner and its attempts.
    _FENCED = (
        " lease_owner = NULL, lease_until = NULL"
        " WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?"
    )

    @contextmanager
    def _finishing(self, job_id: int) -> Iterator[tuple[Connection, tuple[int, str, int | None]]]:
        """A transaction finishing a claimed job, with the parameters of ``_FENCED`` for it;
        the job is no longer held after it, whatever came of it."""
        with self._held_lock:
            fence = (job_id, self.node_id, self._held_jobs.get(job_id))
        try:
            with self._backend.transaction() as db:
                yield db, fence
        finally:
            with self._held_lock:
                self._held_jobs.pop(job_id, None)

    def results(self, job_id: int) -> list[ResultRecord]:
        rows = self._all("SELECT * FROM results WHERE job_id = ? ORDER BY id", (job_id,))
        return [ResultRecord(*row) for row in rows]

    def finding_pairs(
        self, live: str, shadow: str, since: float = 0.0, shadow_job: int | None = None
    ) -> list[FindingPair]:
        """Every finding that ``shadow`` and ``live`` both reported on the same batch (its
        shadow job finished since ``since``; with ``shadow_job``, of that job only)."""
        rows = self._all(
            "SELECT b.study_instance_uid, b.series_instance_uid, sf.label, lf.probability, lf.present,"
            " sf.probability, sf.present FROM jobs sj"
            " JOIN jobs lj ON lj.batch_id = sj.batch_id AND lj.pipeline = ? AND lj.status = 'done'"
            " JOIN batches b ON b.id = sj.batch_id JOIN findings sf ON sf.job_id = sj.id"
            " JOIN findings lf ON lf.job_id = lj.id AND lf.label = sf.label"
            " WHERE sj.pipeline = ? AND sj.status = 'done' AND sj.finished_at >= ?"
            " AND (CAST(? AS BIGINT) IS NULL OR sj.id = ?)"  # typed: PostgreSQL cannot infer a bare NULL's type
            " ORDER BY sj.id, sf.label",
            (live, shadow, since, shadow_job, shadow_job),
        )
        return [
            FindingPair(study, series, label, live_p, bool(live_present), shadow_p, bool(shadow_present))
            for study, series, label, live_p, live_present, shadow_p, shadow_present in rows
        ]

    def fail_job(self, job_id: int, error: str) -> bool:
        """Mark a claimed job failed; False (fenced, as :meth:`complete_job`) if its lease was lost."""
        with self._finishing(job_id) as (db, fence):
            sql = f"UPDATE jobs SET status = 'failed', finished_at = ?, error = ?,{self._FENCED}"
            return bool(db.execute(sql, (time.time(), error, *fence)).rowcount)

    def resume(self) -> int:
        """On start: what this node held when it stopped is free again at once, instead of
        when its lease expires: on PostgreSQL, the leases of this node id; on SQLite (one
        node per journal), every lease. Jobs run again (their result UIDs are
        deterministic). How many jobs were requeued."""
        mine, params = (" AND lease_owner = ?", (self.node_id,)) if self._backend.shared else ("", ())
        with self._backend.transaction() as db:
            db.execute(
                f"UPDATE deliveries SET lease_owner = NULL, lease_until = NULL WHERE status = 'pending'{mine}", params
            )
            sql = "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL WHERE status = 'running'"
            sql += mine
            return int(db.execute(sql, params).rowcount)

    def renew_leases(self) -> int:
        """The heartbeat: push back the lease of every job and delivery this process holds.
        Those it no longer owns (expired and taken by another node) are let go; how many."""
        with self._held_lock:
            jobs, deliveries = dict(self._held_jobs), set(self._held_deliveries)
        if not jobs and not deliveries:
            return 0
        until = time.time() + self.lease_seconds
        with self._backend.transaction() as db:
            kept = {
                (job_id, attempts)
                for job_id, attempts in db.execute(
                    f"UPDATE jobs SET lease_until = ? WHERE status = 'running' AND lease_owner = ?"
                    f" AND id IN ({', '.join('?' * len(jobs)) or 'NULL'}) RETURNING id, attempts",
                    (until, self.node_id, *jobs),
                ).fetchall()
            }
            sent = {
                (result_id, destination)
                for result_id, destination in db.execute(
                    "UPDATE deliveries SET lease_until = ? WHERE status = 'pending' AND lease_owner = ?"
                    f" AND {self._keys(len(deliveries))} RETURNING result_id, destination",
                    (until, self.node_id, *(value for key in deliveries for value in key)),
                ).fetchall()
            }
        lost_jobs = [job_id for job_id, attempts in jobs.items() if (job_id, attempts) not in kept]
        lost_deliveries = deliveries - sent
        with self._held_lock:
            for job_id in lost_jobs:
                self._held_jobs.pop(job_id, None)
            self._held_deliveries -= lost_deliveries
        for job_id in lost_jobs:
            log.warning("job %d: lease lost (expired and claimed by another node); its result will be dropped", job_id)
        for result_id, destination in lost_deliveries:
            log.warning("result %d -> %s: lease lost (expired and claimed by another node)", result_id, destination)
        return len(lost_jobs) + len(lost_deliveries)

    @staticmethod
    def _keys(count: int) -> str:
        """A WHERE term matching ``count`` deliveries by (result_id, destination), given as
        ``2 * count`` parameters (a row-value IN over VALUES: both databases take it)."""
        if not count:
            return "1 = 0"
        return f"(result_id, destination) IN (VALUES {', '.join(['(?, ?)'] * count)})"

    def release_jobs(self, job_ids: Iterable[int]) -> None:
        """Hand back claimed jobs this node will not finish (it is stopping, or lost the
        journal mid-job): queued again at once, the claim not counted. Jobs already
        finished are skipped."""
        with self._held_lock:
            held = [(job_id, self._held_jobs.pop(job_id)) for job_id in job_ids if job_id in self._held_jobs]
        if held:
            with self._backend.transaction() as db:
                db.executemany(
                    "UPDATE jobs SET status = 'queued', attempts = attempts - 1, lease_owner = NULL, lease_until = NULL"
                    " WHERE id = ? AND status = 'running' AND lease_owner = ? AND attempts = ?",
                    [(job_id, self.node_id, attempts) for job_id, attempts in held],
                )
                self._backend.notify(db, JOBS_QUEUED)  # another node may take them at once

    def release_deliveries(self, deliveries: Iterable[Delivery]) -> None:
        """Hand back claimed deliveries this node did not try (it is stopping, or its round
        ended early): due again at once for any node. Those already tried are skipped."""
        self._release_deliveries(d.key for d in deliveries)

    def _release_deliveries(self, keys: Iterable[tuple[int, str]]) -> None:
        with self._held_lock:
            held = [key for key in keys if key in self._held_deliveries]
            self._held_deliveries.difference_update(held)
        if held:
            with self._backend.transaction() as db:
                db.execute(
                    "UPDATE deliveries SET lease_owner = NULL, lease_until = NULL"
                    f" WHERE lease_owner = ? AND {self._keys(len(held))}",
                    (self.node_id, *(value for key in held for value in key)),
                )

    def leases(self) -> list[Lease]:
        """Every job running and delivery being sent under a lease, by job."""
        rows = self._all(
            "SELECT * FROM (SELECT id AS job_id, pipeline, NULL AS destination, NULL AS kind, lease_owner, lease_until"
            " FROM jobs WHERE status = 'running' AND lease_owner IS NOT NULL"
            " UNION ALL SELECT r.job_id, j.pipeline, d.destination, r.kind, d.lease_owner, d.lease_until"
            " FROM deliveries d JOIN results r ON r.id = d.result_id JOIN jobs j ON j.id = r.job_id"
            " WHERE d.status = 'pending' AND d.lease_owner IS NOT NULL) leased"
            " ORDER BY job_id, COALESCE(destination, ''), COALESCE(kind, '')"
        )
        return [Lease(*row) for row in rows]

    # -- deliveries --------------------------------------------------------------------

    _DELIVERY = (
        "SELECT d.result_id, r.job_id, d.destination, d.status, d.attempts, d.last_error, d.first_attempt_at,"
        " r.path, r.kind, j.pipeline, b.study_instance_uid, d.lease_owner, d.lease_until FROM deliveries d"
        " JOIN results r ON r.id = d.result_id JOIN jobs j ON j.id = r.job_id JOIN batches b ON b.id = j.batch_id"
    )

    def _claim_deliveries(self, where: str, params: Sequence[object], order: str) -> list[Delivery]:
        """Lease to this node the pending deliveries ``where`` selects (in ``order``) whose
        lease, if any, has expired; each goes to one claimant (the back end's ``lock``)."""
        now = time.time()
        until = now + self.lease_seconds
        with self._backend.transaction() as db:
            rows = db.execute(
                f"{self._DELIVERY} WHERE d.status = 'pending' AND COALESCE(d.lease_until, 0) < ? AND {where}"
                f" ORDER BY {order}{self._backend.lock('d')}",
                (now, *params),
            ).fetchall()
            claimed = [replace(Delivery(*row), lease_owner=self.node_id, lease_until=until) for row in rows]
            db.executemany(
                "UPDATE deliveries SET lease_owner = ?, lease_until = ? WHERE result_id = ? AND destination = ?",
                [(self.node_id, until, *d.key) for d in claimed],
            )
        with self._held_lock:
            self._held_deliveries.update(d.key for d in claimed)
        return claimed

    def due_deliveries(self, now: float, destination: str | None = None, limit: int | None = None) -> list[Delivery]:
        """Lease to this node the pending deliveries whose next attempt is due (to
        ``destination``, or to any) and that no other node holds, most urgent pipeline
        first; at most ``limit`` of them. Each must be finished by :meth:`record_attempt`
        or handed back by :meth:`release_deliveries`."""
        where = "d.next_attempt_at <= ? AND (CAST(? AS TEXT) IS NULL OR d.destination = ?)"
        order = "j.priority DESC, d.result_id" + (" LIMIT ?" if limit is not None else "")
        params = (now, destination, destination, *([limit] if limit is not None else []))
        return self._claim_deliveries(where, params, order)

    def deliveries_elsewhere(self, destinations: Collection[str]) -> list[Delivery]:
        """Lease to this node the pending deliveries to any destination but
        ``destinations``: those to a destination the config no longer has."""
        where = f"d.destination NOT IN ({', '.join('?' * len(destinations))})" if destinations else "1 = 1"
        return self._claim_deliveries(where, list(destinations), "d.result_id")

    def deliveries(
        self, job_id: int | None = None, status: str | None = None, study_uid: str | None = None
    ) -> list[Delivery]:
        where: list[str] = []
        params: list[object] = []
        if study_uid is not None:
            where.append("b.study_instance_uid = ?")
            params.append(study_uid)
        if job_id is not None:
            where.append("r.job_id = ?")
            params.append(job_id)
        if status is not None:
            where.append("d.status = ?")
            params.append(status)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        rows = self._all(f"{self._DELIVERY}{clause} ORDER BY d.result_id, d.destination", params)
        return [Delivery(*row) for row in rows]

    def record_attempt(
        self, result_id: int, destination: str, error: str | None, retry_at: float | None = None
    ) -> bool:
        """One C-STORE attempt of a claimed delivery: ``error`` None means the destination
        answered success; otherwise the delivery is retried at ``retry_at``, or
        dead-lettered when None. False, nothing journaled, when this node no longer holds
        its lease (fenced: another node took it over)."""
        now = time.time()
        status = "delivered" if error is None else ("pending" if retry_at is not None else "dead")
        try:
            return bool(
                self._change(
                    "UPDATE deliveries SET status = ?, attempts = attempts + 1, last_error = ?,"
                    " first_attempt_at = COALESCE(first_attempt_at, ?), next_attempt_at = ?, delivered_at = ?,"
                    " lease_owner = NULL, lease_until = NULL"
                    " WHERE result_id = ? AND destination = ? AND status = 'pending' AND lease_owner = ?",
                    (
                        status,
                        error,
                        now,
                        retry_at or 0,
                        now if error is None else None,
                        result_id,
                        destination,
                        self.node_id,
                    ),
                )
            )
        finally:
            with self._held_lock:
                self._held_deliveries.discard((result_id, destination))

    # ``CAST(? AS TEXT) IS NULL``: typed, as PostgreSQL cannot infer a bare NULL's type.
    _OF_STUDY = "SELECT id FROM batches WHERE CAST(? AS TEXT) IS NULL OR study_instance_uid = ?"

    def requeue_dead_letters(self, study_uid: str | None = None) -> int:
        """Give dead-lettered deliveries (of one study, or all) a fresh start."""
        return self._change(
            "UPDATE deliveries SET status = 'pending', attempts = 0, first_attempt_at = NULL,"
            " next_attempt_at = 0 WHERE status = 'dead' AND result_id IN (SELECT r.id FROM results r"
            f" JOIN jobs j ON j.id = r.job_id WHERE j.batch_id IN ({self._OF_STUDY}))",
            (study_uid, study_uid),
        )

    def requeue_failed_jobs(self, study_uid: str | None = None) -> int:
        """Run failed jobs (of one study, or all) again."""
        return self._change(
            "UPDATE jobs SET status = 'queued', error = NULL, attempts = 0"
            f" WHERE status = 'failed' AND batch_id IN ({self._OF_STUDY})",
            (study_uid, study_uid),
        )

    def previous_result(self, job: JobRecord, kind: str = "sr") -> ResultRecord | None:
        """The result of the same pipeline on the latest earlier generation of the same
        series (or study) that has one: what a re-run after late arrivals supersedes."""
        row = self._one(
            "SELECT r.* FROM results r JOIN jobs j ON j.id = r.job_id JOIN batches b ON b.id = j.batch_id"
            " JOIN batches mine ON mine.id = ? WHERE j.pipeline = ? AND r.kind = ? AND b.generation < mine.generation"
            " AND b.study_instance_uid = mine.study_instance_uid"
            " AND COALESCE(b.series_instance_uid, '') = COALESCE(mine.series_instance_uid, '')"
            " ORDER BY b.generation DESC, j.id DESC LIMIT 1",
            (job.batch_id, job.pipeline, kind),
        )
        return ResultRecord(*row) if row else None

    # -- retention ---------------------------------------------------------------------

    def purgeable_studies(self, older_than: float) -> list[str]:
        """Studies whose every instance is batched, every job finished and every result
        delivered, with nothing received since ``older_than``. Anything undelivered
        (pending or dead-lettered) keeps its study."""
        with self._backend.reading() as db:
            rows = db.execute(
                "SELECT study_instance_uid FROM instances GROUP BY study_instance_uid"
                " HAVING MAX(received_at) < ? AND COUNT(batch_id) = COUNT(*)",
                (older_than,),
            ).fetchall()
            studies = []
            for (study_uid,) in rows:
                busy = db.execute(
                    "SELECT (SELECT COUNT(*) FROM jobs j JOIN batches b ON b.id = j.batch_id"
                    "        WHERE b.study_instance_uid = ? AND j.status IN ('queued', 'running'))"
                    " + (SELECT COUNT(*) FROM deliveries d JOIN results r ON r.id = d.result_id"
                    "    JOIN jobs j ON j.id = r.job_id JOIN batches b ON b.id = j.batch_id"
                    "    WHERE b.study_instance_uid = ? AND d.status != 'delivered')",
                    (study_uid, study_uid),
                ).fetchone()[0]
                if not busy:
                    studies.append(study_uid)
        return studies

    def forget_study(self, study_uid: str) -> None:
        """Delete every row of a purged study, in one transaction."""
        with self._backend.transaction() as db:
            batches = "SELECT id FROM batches WHERE study_instance_uid = ?"
            jobs = f"SELECT id FROM jobs WHERE batch_id IN ({batches})"
            results = f"SELECT id FROM results WHERE job_id IN ({jobs})"
            db.execute(f"DELETE FROM deliveries WHERE result_id IN ({results})", (study_uid,))
            db.execute(f"DELETE FROM findings WHERE job_id IN ({jobs})", (study_uid,))
            db.execute(f"DELETE FROM results WHERE job_id IN ({jobs})", (study_uid,))
            db.execute(f"DELETE FROM jobs WHERE batch_id IN ({batches})", (study_uid,))
            db.execute("DELETE FROM batches WHERE study_instance_uid = ?", (study_uid,))
            db.execute("DELETE FROM instances WHERE study_instance_uid = ?", (study_uid,))

    def journaled_uids(self, uids: Sequence[str]) -> set[str]:
        """Which of ``uids`` a row names as a received instance's or a result's SOP
        Instance UID (the name of its file in the spool or the results folder)."""
        if not uids:
            return set()
        marks = ", ".join("?" * len(uids))
        rows = self._all(
            f"SELECT sop_instance_uid FROM instances WHERE sop_instance_uid IN ({marks})"
            f" UNION SELECT sop_instance_uid FROM results WHERE sop_instance_uid IN ({marks})",
            (*uids, *uids),
        )
        return {uid for (uid,) in rows}

    # -- monitoring --------------------------------------------------------------------

    def queue_depths(self) -> dict[str, int]:
        """Work waiting in each queue: pending instances, queued/running jobs, deliveries
        waiting to be sent, and dead letters."""
        with self._backend.reading() as db:
            pending = db.execute("SELECT COUNT(*) FROM instances WHERE batch_id IS NULL").fetchone()[0]
            jobs = dict(db.execute("SELECT status, COUNT(*) FROM jobs GROUP BY status").fetchall())
            deliveries = dict(db.execute("SELECT status, COUNT(*) FROM deliveries GROUP BY status").fetchall())
        return {
            "assembly": pending,
            "jobs": jobs.get("queued", 0),
            "running": jobs.get("running", 0),
            "dispatch": deliveries.get("pending", 0),
            "dead_letter": deliveries.get("dead", 0),
        }

    def queued_jobs(self) -> int:
        return int(self._one("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")[0])

    def recent_jobs(self, limit: int = 20) -> list[JobRecord]:
        return [JobRecord(*row) for row in self._all(f"{self._JOB} ORDER BY j.id DESC LIMIT ?", (limit,))]
