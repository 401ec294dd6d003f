"""Wiring: one running node = what its roles need (``node.roles``: the listener and the
optional STOW-RS endpoint; assembler and retention; runner and its models; dispatcher) +
metrics + the heartbeat of its leases, all sharing one journal.
``radpipe serve`` and the tests both start it through here.

The stages that read pipelines or run models are imported only by a node whose roles
include them: a receive-only node never imports torch nor reads a model artifact.

A node listens first and loads afterwards (issue 15, cold start): once the journal has
resumed, it answers C-ECHO and C-STORE (each instance fsync'd and journaled before its
success, as always), and a :class:`PipelineLoading` thread imports the pipeline stages
(torch, highdicom: seconds), reads the pipelines, starts the assembler, the runner and the
reloader, and warms every model, during the quiet period of the series arriving meanwhile.
A job claimed before its model is ready waits for it in ``ModelPool.get``."""

import logging
import time
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path
from threading import Event, Lock, Thread
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

import pydicom
from prometheus_client import CollectorRegistry

from plugin.acceptor import AssociationServer
from plugin.config import ROLES, NodeConfig, Role
from plugin.dicomweb import StowServer, start_stow_server
from plugin.dispatch import Dispatcher
from plugin.durability import GroupSync
from plugin.journal import DELIVERIES_DUE, JOBS_QUEUED, Journal, JournalUnavailable
from plugin.metrics import Metrics, serve_metrics
from plugin.node import Storage, StoreLimits, start_servers
from plugin.quarantine import Quarantine
from plugin.retention import Retention
from plugin.spool import Spool
from plugin.worker import Worker

if TYPE_CHECKING:
    from plugin.models.pool import ModelPool
    from plugin.pipeline import Pipeline
    from plugin.router import Router

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


class PipelineLoading(Worker):
    """Runs ``load`` once, after the node listens (module doc); ``done`` is set when it
    returned or raised, ``error`` is what it raised (the node then stops: see
    :meth:`Node.start`)."""

    def __init__(self, load: Callable[[], None]) -> None:
        super().__init__("pipeline-loading")
        self._load = load
        self.done = Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            self._load()
        except Exception as e:  # raised again by Node.wait_ready, or handed to radpipe serve
            self.error = e
        finally:
            self.done.set()


def read_pipelines(config: NodeConfig) -> "list[Pipeline]":
    """The configured pipelines. A missing or empty folder is an error in the log: the
    node would still answer every C-STORE with success, and store every series unrouted."""
    from plugin.pipeline import load_pipelines

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
        self.roles = frozenset(config.node.roles)
        self.metrics = Metrics(registry)
        storage = config.storage.dir
        # PostgreSQL: connects when the server answers
        self.journal = Journal(config.journal_location, config.node.id, config.node.lease_seconds)
        self.spool = Spool(storage / "spool")
        self.quarantine = Quarantine(storage / "quarantine")
        self.group_sync = GroupSync(storage) if "receive" in self.roles else None
        self.metrics.observe_state(self.journal.queue_depths, self.spool.free_bytes)
        # Made by the loading (start): the stages that read pipelines import torch.
        self.router: Router | None = None
        self.pool: ModelPool | None = None
        # The roles' stages, in the order data flows (each wakes the next after it did work),
        # and the workers that serve them; the assembler and the runner join once loaded.
        self._stages: dict[Role, Worker] = {}
        helpers: list[Worker] = []
        if "assemble" in self.roles:
            helpers.append(
                Retention(self.journal, self.spool, config.results_dir, config.storage.retention_days, self.quarantine)
            )
        if "dispatch" in self.roles:
            dispatcher = Dispatcher(
                self.journal, config.destinations, config.node.ae_title, config.dispatch, self.metrics
            )
            self._stages["dispatch"] = dispatcher
            helpers += dispatcher.senders  # one per destination: a dead PACS holds up no other
        self.workers: list[Worker] = [*self._stages.values(), *helpers]
        self.loading = PipelineLoading(self._load) if self.roles & {"assemble", "infer"} else None
        self.ready = Event()  # every stage started and every model warmed (or its failure logged)
        self.heartbeat = Heartbeat(self.journal)
        self.servers: list[AssociationServer] = []
        self.stow_server: StowServer | None = None
        self.metrics_server: tuple[WSGIServer, Thread] | None = None
        self._stopping = Event()
        self._starting = Lock()  # held while workers start: stop() sees them all, or none start
        self._failed: Callable[[], None] | None = None  # start's ``failed``
        self._settle: Callable[[], None] | None = None  # start's ``settle``

    def _pipeline_workers(self) -> "tuple[dict[Role, Worker], list[Worker]]":
        """The assembler and the runner, as the roles ask, on the configured pipelines (the
        router), and the reloader that keeps the router (and the models) up to date. Only an
        ``infer`` node has a model pool: loading models is the runner's need alone."""
        from plugin.assembler import Assembler
        from plugin.reload import PipelineReloader
        from plugin.router import Router

        config = self.config
        router = self.router = Router(read_pipelines(config))
        stages: dict[Role, Worker] = {}
        helpers: list[Worker] = []
        if "assemble" in self.roles:
            stages["assemble"] = Assembler(self.journal, router, self.metrics)
        if "infer" in self.roles:
            from plugin.models.pool import ModelPool
            from plugin.prepare import Preparer
            from plugin.runner import Lanes, Runner

            self.pool = ModelPool(self.metrics, config.storage.dir / "compiled")
            self.metrics.observe_baselines(lambda: [band for p in router.pipelines for band in p.bands()])
            lanes = Lanes()
            runners = [
                Runner(
                    self.journal,
                    router,
                    self.pool,
                    config.results_dir,
                    list(config.destinations),
                    self.quarantine,
                    self.metrics,
                    Preparer(workers),
                    lanes,
                )
                for workers in config.runner.lane_workers
            ]
            stages["infer"] = runners[0]  # the stage; the other lanes share its wake-up and next stage
            helpers += runners[1:]
        destinations = set(config.destinations)
        helpers.append(PipelineReloader(config.pipelines.dir, router, destinations, self.pool, self.metrics))
        return stages, helpers

    @property
    def results_dir(self) -> Path:
        return self.config.results_dir

    def start(
        self,
        wait_ready: bool = True,
        failed: Callable[[], None] | None = None,
        settle: Callable[[], None] | None = None,
    ) -> None:
        """Wait for the journal, resume interrupted work, start the workers that need no
        pipeline and, for ``receive``, listen; then (``assemble``/``infer``) load in the
        background: the pipeline stages and every model (module doc). With ``wait_ready``
        (the default) return once that is done, raising what the loading raised (an
        invalid pipeline: :class:`~plugin.pipeline.PipelineError`); without, return at once
        and call ``failed`` if the loading raises (``radpipe serve`` then stops, and
        reports :attr:`load_error`). ``settle`` runs once all is loaded, before the node
        says it is ready (``radpipe serve`` hides what loading made from the garbage
        collector). Returns without starting anything more if :meth:`stop` is called while
        it waits for the journal."""
        log.info("node %s roles: %s", self.config.node.id, ",".join(self.config.node.roles))
        if self.config.metrics.port:  # first: radpipe_journal_up tells while the node waits for its journal
            self.metrics_server = serve_metrics(
                self.metrics, self.config.metrics.host, self.config.metrics.port, self.config.node.id
            )
            log.info("metrics on http://%s:%d/metrics", self.config.metrics.host, self.metrics_server[0].server_port)
        self._settle = settle
        resumed = self._wait_for_journal()
        if resumed is None:
            return
        if resumed:
            log.info("resuming %d job(s) of node %s interrupted by its last shutdown", resumed, self.config.node.id)
        self.heartbeat.start()
        with self._starting:
            for worker in self.workers:
                worker.start()
        if self.loading is None:
            self.journal.listen(self._woken_by())
            self._become_ready()
        if "receive" in self.roles:
            assert self.group_sync is not None  # made for the receive role
            limits = StoreLimits(
                min_free_bytes=self.config.storage.min_free_mb * 2**20,
                max_instance_bytes=self.config.storage.max_instance_mb * 2**20,
                max_queued_jobs=self.config.node.max_queued_jobs,
            )
            storage = Storage(self.spool, self.journal, self.group_sync, self.quarantine, self.metrics, limits)
            self.servers = start_servers(self.config.node, storage)
            self.stow_server = start_stow_server(self.config.node, storage, self.config.storage.dir)
        if self.loading is None:
            return
        self._failed = failed
        self.loading.start()
        if wait_ready:
            self.wait_ready()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Until the pipeline stages run and every model is warmed; raises what the loading
        raised, or TimeoutError."""
        if self.loading is not None:
            if not self.loading.done.wait(timeout):
                raise TimeoutError(f"node {self.config.node.id} still loading after {timeout} s")
            if self.loading.error is not None:
                raise self.loading.error

    @property
    def load_error(self) -> Exception | None:
        """What the background loading raised (an invalid pipeline), if anything."""
        return None if self.loading is None else self.loading.error

    def _woken_by(self) -> dict[str, Callable[[], None]]:
        """Work another node queued (PostgreSQL's NOTIFY) wakes the stage that takes it."""
        return {
            channel: self._stages[role].wake for channel, role in ((JOBS_QUEUED, "infer"), (DELIVERIES_DUE, "dispatch"))
            if role in self._stages
        }  # fmt: skip

    def _load(self) -> None:
        """The loading (in :class:`PipelineLoading`'s thread): build the pipeline stages,
        start them, then warm each pipeline's model. A job the runner claims meanwhile waits
        in ``ModelPool.get`` for its model (loaded once, by whichever thread asks first); a
        model that cannot be loaded is logged and fails its jobs, the node runs on. Anything
        else it raises (an invalid pipeline) goes to ``failed``."""
        try:
            self._start_pipeline_workers()
            self._load_pipelines()
        except Exception:
            if self._failed is not None:
                self._failed()
            raise
        self._become_ready()
        log.info("node %s ready: its pipelines' stages run and their models are loaded", self.config.node.id)

    def _become_ready(self) -> None:
        if self._settle is not None:
            self._settle()
        self.ready.set()

    def _start_pipeline_workers(self) -> None:
        stages, helpers = self._pipeline_workers()
        assert self.router is not None  # made by _pipeline_workers
        for pipeline in self.router.pipelines:
            self.metrics.add_pipeline_labels(pipeline.name, pipeline.destinations_in(list(self.config.destinations)))
            log.info("pipeline %s v%s loaded from %s", pipeline.name, pipeline.version, pipeline.source)
        with self._starting:
            if self._stopping.is_set():
                return
            merged = {**self._stages, **stages}
            self._stages = {role: merged[role] for role in ROLES if role in merged}  # in the order data flows
            for role, following in pairwise(ROLES):  # assemble -> infer -> dispatch (receive has no stage)
                if role in self._stages and following in self._stages:
                    self._stages[role].next_stage = self._stages[following]
            self.workers = [*stages.values(), *self.workers, *helpers]
            for worker in [*stages.values(), *helpers]:
                worker.start()
            self.journal.listen(self._woken_by())

    def _load_pipelines(self) -> None:
        """Each pipeline's model warmed, and highdicom's module tables read (0.3-0.5 s, which
        the first result would otherwise wait for), where this node infers."""
        if self.pool is None or self.router is None:
            return
        from plugin.models.artifact import ArtifactError
        from plugin.outputs.conformance import load_tables

        load_tables()

        for pipeline in self.router.pipelines:
            if self._stopping.is_set():
                return
            try:
                self.pool.get(pipeline)
            except ArtifactError as e:  # its jobs will fail with the same message; others run
                log.error("pipeline %s: model not loaded: %s", pipeline.name, e)

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
        log.info("node %s stopping: no new associations; its workers finish their current step", self.config.node.id)
        with self._starting:  # a loading still under way starts nothing more
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
        if self.loading is not None:  # warming a model: it stops after that one
            self.loading.stop(max(0.0, deadline - time.monotonic()))
        for worker in self.workers:
            worker.stop(max(0.0, deadline - time.monotonic()))
        self.heartbeat.stop()
        stuck = [w.name for w in [*self.workers, *filter(None, [self.loading])] if w.is_alive()]
        if stuck:
            log.warning("shutdown deadline reached with %s still busy; their work resumes on restart", stuck)
            return  # the journal stays open for them; the process is exiting anyway
        self.journal.close()
        if self.group_sync is not None:
            self.group_sync.close()
        log.info("node %s stopped", self.config.node.id)
