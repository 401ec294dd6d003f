"""Wiring: one running node = listener (and the optional STOW-RS endpoint) + assembler +
runner + dispatcher + metrics + the heartbeat of its leases, all sharing one journal.
``radpipe serve`` and the tests both start it through here."""

import logging
import time
from pathlib import Path
from threading import Event, Thread
from wsgiref.simple_server import WSGIServer

import pydicom
from prometheus_client import CollectorRegistry

from plugin.acceptor import AssociationServer
from plugin.assembler import Assembler
from plugin.config import NodeConfig
from plugin.dicomweb import StowServer, start_stow_server
from plugin.dispatch import Dispatcher
from plugin.durability import GroupSync
from plugin.journal import Journal, JournalUnavailable
from plugin.metrics import Metrics, serve_metrics
from plugin.models.artifact import ArtifactError
from plugin.models.pool import ModelPool
from plugin.node import Storage, StoreLimits, start_servers
from plugin.pipeline import Pipeline, load_pipelines
from plugin.prepare import Preparer
from plugin.quarantine import Quarantine
from plugin.reload import PipelineReloader
from plugin.retention import Retention
from plugin.router import Router
from plugin.runner import Runner
from plugin.spool import Spool
from plugin.worker import Worker

log = logging.getLogger(__name__)


class Heartbeat(Worker):
    """Renews the leases of the jobs and deliveries the node is working on, every third of
    the lease: another node takes them over only once this node stops renewing (it died,
    hung, or lost the journal for that long)."""

    def __init__(self, journal: Journal) -> None:
        super().__init__("heartbeat")
        self.interval = journal.lease_seconds / 3
        self._journal = journal

    def step(self) -> bool:
        self._journal.renew_leases()
        return False


def read_pipelines(config: NodeConfig) -> list[Pipeline]:
    """The configured pipelines. A missing or empty folder is an error in the log: the
    node would still answer every C-STORE with success, and store every series unrouted."""
    directory = config.pipelines.dir.absolute()
    exists = directory.is_dir()
    pipelines = load_pipelines(directory, set(config.destinations)) if exists else []
    if not pipelines:
        log.error(
            "pipelines folder %s %s: every series will be stored unrouted. Set pipelines.dir in the node config "
            "(a relative path is taken from the config file's folder) or RADPIPE_PIPELINES_DIR to your pipelines.",
            directory,
            "holds no pipeline" if exists else "does not exist",
        )
    return pipelines


class Node:
    def __init__(self, config: NodeConfig, registry: CollectorRegistry | None = None) -> None:
        # The node judges received values itself (UIDs, the pixel module) and answers a
        # named status; pydicom's check of each value it reads would only warn, quoting it.
        pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
        self.config = config
        self.metrics = Metrics(registry)
        storage = config.storage.dir
        # PostgreSQL: connects when the server answers
        self.journal = Journal(config.journal_location, config.node.id, config.node.lease_seconds)
        self.spool = Spool(storage / "spool")
        self.quarantine = Quarantine(storage / "quarantine")
        self.group_sync = GroupSync(storage)
        self.metrics.observe_state(self.journal.queue_depths, self.spool.free_bytes)
        self.router = Router(read_pipelines(config))
        self.pool = ModelPool(self.metrics, storage / "compiled")
        assembler = Assembler(self.journal, self.router, self.metrics)
        runner = Runner(
            self.journal,
            self.router,
            self.pool,
            config.results_dir,
            list(config.destinations),
            self.quarantine,
            self.metrics,
            Preparer(config.runner.workers),
        )
        dispatcher = Dispatcher(self.journal, config.destinations, config.node.ae_title, config.dispatch, self.metrics)
        assembler.next_stage, runner.next_stage = runner, dispatcher
        self.workers: list[Worker] = [
            assembler,
            runner,
            dispatcher,
            *dispatcher.senders,  # one per destination: a dead PACS holds up no other
            PipelineReloader(config.pipelines.dir, self.router, set(config.destinations), self.pool, self.metrics),
            Retention(self.journal, self.spool, config.results_dir, config.storage.retention_days),
        ]
        self.heartbeat = Heartbeat(self.journal)
        self.servers: list[AssociationServer] = []
        self.stow_server: StowServer | None = None
        self.metrics_server: tuple[WSGIServer, Thread] | None = None
        self._stopping = Event()

    @property
    def results_dir(self) -> Path:
        return self.config.results_dir

    def start(self) -> None:
        """Warm every model, wait for the journal, resume interrupted work, then start
        listening. Returns without starting anything more if :meth:`stop` is called while
        it waits for the journal."""
        for pipeline in self.router.pipelines:
            self.metrics.add_pipeline_labels(pipeline.name, pipeline.destinations_in(list(self.config.destinations)))
            try:
                self.pool.get(pipeline)
            except ArtifactError as e:  # its jobs will fail with the same message; others run
                log.error("pipeline %s: model not loaded: %s", pipeline.name, e)
            log.info("pipeline %s v%s loaded from %s", pipeline.name, pipeline.version, pipeline.source)
        if self.config.metrics.port:  # first: radpipe_journal_up tells while the node waits for its journal
            self.metrics_server = serve_metrics(self.metrics, self.config.metrics.host, self.config.metrics.port)
            log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.metrics_server[0].server_port)
        resumed = self._wait_for_journal()
        if resumed is None:
            return
        if resumed:
            log.info("resuming %d job(s) of node %s interrupted by its last shutdown", resumed, self.config.node.id)
        self.heartbeat.start()
        for worker in self.workers:
            worker.start()
        limits = StoreLimits(
            min_free_bytes=self.config.storage.min_free_mb * 2**20,
            max_instance_bytes=self.config.storage.max_instance_mb * 2**20,
            max_queued_jobs=self.config.node.max_queued_jobs,
        )
        storage = Storage(self.spool, self.journal, self.group_sync, self.quarantine, self.metrics, limits)
        self.servers = start_servers(self.config.node, storage)
        self.stow_server = start_stow_server(self.config.node, storage, self.config.storage.dir)

    def _wait_for_journal(self, longest: float = 30.0) -> int | None:
        """Take back what this node held when it last stopped (``Journal.resume``: other
        nodes' work is theirs until their leases expire), as soon as the journal answers:
        a node started while its PostgreSQL is down waits for it, saying so once (the
        journal tells how the outage goes on), rather than exiting (and being restarted in
        a loop). How many jobs were requeued; None if stopped."""
        delay = 1.0
        while not self._stopping.is_set():
            try:
                return self.journal.resume()
            except JournalUnavailable as e:
                if delay == 1.0:
                    log.warning("journal %s unreachable; waiting for it before listening: %s",
                                self.config.journal.model_dump()["url"], e)  # fmt: skip
            self._stopping.wait(delay)
            delay = min(2 * delay, longest)
        return None

    @property
    def port(self) -> int:
        """The main listener's port (TLS when configured)."""
        return int(self.servers[0].server_address[1])

    def stop(self) -> None:
        """Graceful shutdown within ``node.shutdown_seconds``: stop accepting, let the
        workers finish their current step (each hands back what it claimed and did not
        finish; the heartbeat keeps their leases until then), close the journal. A job
        still running at the deadline keeps its lease until it expires (or this node
        starts again under the same id)."""
        deadline = time.monotonic() + self.config.node.shutdown_seconds
        self._stopping.set()
        for server in self.servers:
            server.stop(max(0.0, deadline - time.monotonic()))  # one deadline for every listener and worker
        if self.stow_server is not None:
            self.stow_server.stop(max(0.0, deadline - time.monotonic()))
        if self.metrics_server is not None:
            self.metrics_server[0].shutdown()
            self.metrics_server[0].server_close()
            self.metrics_server[1].join(5)
        for worker in self.workers:
            worker.stopping.set()
        for worker in self.workers:
            worker.stop(max(0.0, deadline - time.monotonic()))
        self.heartbeat.stop()
        stuck = [w.name for w in self.workers if w.is_alive()]
        if stuck:
            log.warning("shutdown deadline reached with %s still busy; their work resumes on restart", stuck)
            return  # the journal stays open for them; the process is exiting anyway
        self.journal.close()
        self.group_sync.close()
