"""Results reach their destinations by C-STORE: each destination on its own sender, several
results per association, every failed try journaled with backoff; an unreachable
destination is retried, then dead-lettered."""

import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pydicom
import pydicom.data
from prometheus_client import CollectorRegistry
from pynetdicom import AE, AllStoragePresentationContexts, evt

from plugin.cli import lease_lines, study_path
from plugin.config import Destination, DispatchSection
from plugin.dispatch import Dispatcher
from plugin.journal import JobSpec, Journal, PendingSeries
from plugin.metrics import Metrics
from plugin.scu import DicomFile, StoreSCU, Timeouts
from tests.conftest import free_port, open_journal, storescu, wait_for, with_new_uids


def start_pacs(
    received: list[pydicom.Dataset],
    port: int | None = None,
    refuse: frozenset[str] = frozenset(),
    associations: list[object] | None = None,
):
    """A minimal storage SCP standing in for the PACS; returns (server, port). It answers
    0xA700 (out of resources) to the SOP Instance UIDs in ``refuse``, and appends each
    association it accepts to ``associations``."""

    def on_store(event):
        if event.request.AffectedSOPInstanceUID in refuse:
            return 0xA700
        received.append(event.dataset)
        return 0x0000

    handlers = [(evt.EVT_C_STORE, on_store)]
    if associations is not None:
        handlers.append((evt.EVT_ACCEPTED, associations.append))
    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = port or free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers)
    return server, port


@contextmanager
def silent_peer() -> Iterator[int]:
    """A hung PACS: its port accepts TCP connections (the kernel completes the handshake
    into the listen backlog) and nothing ever reads or answers. Yields the port."""
    with socket.create_server(("127.0.0.1", 0), backlog=16) as server:
        yield server.getsockname()[1]


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def queue_results(journal: Journal, paths: list[Path], destinations: list[str], kinds: list[str] | None = None) -> int:
    """Journal one finished job whose results are ``paths`` (of ``kinds``, all SRs by
    default), each queued for each of ``destinations``, as the runner does; returns the job id."""
    now = time.time()
    # No instance journaled: the series closes with the 0 pending instances it counts.
    series = PendingSeries("1.2.826.0.1.1", "1.2.826.0.1.1.1", 0, now, now, str(paths[0]))
    journal.create_batches(series.study_instance_uid, [(series, [JobSpec("demo", "1", "f" * 64, 0)])], [])
    job = journal.claim_job()
    assert job is not None
    kinds = kinds or ["sr"] * len(paths)
    journal.complete_job(
        job.id, [(kind, str(p), _sop_uid(p)) for kind, p in zip(kinds, paths, strict=True)], destinations
    )
    return job.id


@contextmanager
def dispatching(journal: Journal, destinations: dict[str, Destination], policy: DispatchSection) -> Iterator[Metrics]:
    """A running dispatcher (every sender started, as the node starts them); yields its metrics."""
    metrics = Metrics(CollectorRegistry())
    dispatcher = Dispatcher(journal, destinations, "RADPIPE", policy, metrics)
    workers = [dispatcher, *dispatcher.senders]
    for worker in workers:
        worker.start()
    try:
        yield metrics
    finally:
        for worker in workers:
            worker.stop()


def _pacs(port: int) -> Destination:
    return Destination(ae_title="PACS", host="127.0.0.1", port=port)


def test_result_is_delivered_to_the_pipelines_destination(start_node, demo_study, dcmtk):
    received: list[pydicom.Dataset] = []
    pacs, port = start_pacs(received)
    try:
        node = start_node(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}})
        assert storescu(node.port, *demo_study["Demo chest CT, nodules"]).returncode == 0
        wait_for(lambda: received, what="the SR at the PACS")
        [job] = node.journal.jobs()
        [delivery] = wait_for(lambda: [d for d in node.journal.deliveries(job.id) if d.status == "delivered"])
        assert delivery.attempts == 1
        [result] = node.journal.results(job.id)
        assert received[0].SOPInstanceUID == result.sop_instance_uid
        assert received[0].SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
        assert node.metrics.registry.get_sample_value("radpipe_results_delivered_total", {"destination": "pacs"}) == 1
    finally:
        pacs.shutdown()


def test_a_silent_destination_does_not_delay_a_working_one(start_node, demo_study, dcmtk):
    """A PACS that accepts TCP and never answers, configured beside a working one: the
    working one has the result within seconds of the job; the silent one's try ends at
    the ACSE timeout and is journaled for a retry."""
    received: list[pydicom.Dataset] = []
    pacs, port = start_pacs(received)
    try:
        with silent_peer() as silent_port:
            node = start_node(
                destinations={  # "hung" sorts first: a single dispatcher would try it first
                    "hung": {"ae_title": "HUNG", "host": "127.0.0.1", "port": silent_port},
                    "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port},
                },
                dispatch={"acse_timeout_seconds": 2, "backoff_seconds": 30},
            )
            assert storescu(node.port, *demo_study["Demo chest CT, no nodules"]).returncode == 0
            wait_for(lambda: received, timeout=120, what="the SR at the working PACS")
            arrived = time.time()
            [job] = node.journal.jobs()
            assert job.finished_at is not None
            latency = arrived - job.finished_at
            print(f"dispatch with one silent destination: delivered to the working one {latency:.2f} s after the job")
            assert latency < 5, f"the working destination waited {latency:.1f} s for the silent one"

            [hung] = wait_for(
                lambda: [d for d in node.journal.deliveries(job.id) if d.destination == "hung" and d.attempts],
                timeout=15,
                what="the silent destination's try to time out",
            )
            assert hung.status == "pending" and "HUNG@127.0.0.1" in (hung.last_error or "")
            sample = node.metrics.registry.get_sample_value
            assert sample("radpipe_dispatch_failures_total", {"destination": "hung"}) == 1
            assert sample("radpipe_results_delivered_total", {"destination": "pacs"}) == 1
    finally:
        pacs.shutdown()


def test_several_results_go_over_one_association(tmp_path, demo_study):
    """Four results due at once: one association; the one the PACS refuses is journaled
    for a retry and the others still go over the same association."""
    paths = with_new_uids(demo_study["Demo chest CT, no nodules"][:4], tmp_path / "results")
    refused = _sop_uid(paths[1])
    received: list[pydicom.Dataset] = []
    associations: list[object] = []
    pacs, port = start_pacs(received, refuse=frozenset({refused}), associations=associations)
    journal = open_journal(tmp_path)
    try:
        job_id = queue_results(journal, paths, ["pacs"])
        with dispatching(journal, {"pacs": _pacs(port)}, DispatchSection(backoff_seconds=30)) as metrics:
            wait_for(lambda: all(d.attempts for d in journal.deliveries(job_id)), timeout=30, what="every result tried")
        by_uid = {r.id: r.sop_instance_uid for r in journal.results(job_id)}
        outcome = {by_uid[d.result_id]: (d.status, d.attempts) for d in journal.deliveries(job_id)}
        assert outcome == {_sop_uid(p): ("pending" if _sop_uid(p) == refused else "delivered", 1) for p in paths}
        assert [d.last_error for d in journal.deliveries(job_id, status="pending")] == ["C-STORE answered 0xA700"]
        assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(set(by_uid.values()) - {refused})
        assert len(associations) == 1
        assert metrics.registry.get_sample_value("radpipe_results_delivered_total", {"destination": "pacs"}) == 3
        assert metrics.registry.get_sample_value("radpipe_dispatch_failures_total", {"destination": "pacs"}) == 1
    finally:
        journal.close()
        pacs.shutdown()


def test_log_lines_and_trace_name_which_of_a_jobs_results_each_is_about(tmp_path, demo_study, caplog):
    """A job's SR and SEG go to the PACS one by one: when the PACS takes one and refuses the
    other, the operator reads which was delivered and which will be tried again, in the
    log and in ``status`` (its leases, ``--trace``), not two contradicting lines about "job N"."""
    caplog.set_level(logging.INFO, logger="plugin.dispatch")
    paths = with_new_uids(demo_study["Demo chest CT, no nodules"][:2], tmp_path / "results")
    pacs, port = start_pacs([], refuse=frozenset({_sop_uid(paths[1])}))
    journal = open_journal(tmp_path)
    try:
        job_id = queue_results(journal, paths, ["pacs"], kinds=["sr", "seg"])
        held = journal.due_deliveries(time.time(), "pacs")  # as a sender holds them while it sends
        assert [line.split(":")[0] for line in lease_lines(journal)[1:]] == [
            f"  job #{job_id} demo SEG -> pacs",
            f"  job #{job_id} demo SR -> pacs",
        ]
        journal.release_deliveries(held)
        with dispatching(journal, {"pacs": _pacs(port)}, DispatchSection(backoff_seconds=30)):
            wait_for(lambda: all(d.attempts for d in journal.deliveries(job_id)), timeout=30, what="both tried")
        lines = [r.getMessage() for r in caplog.records if r.name == "plugin.dispatch"]
        assert f"job {job_id} SR -> pacs: delivered" in lines
        assert f"job {job_id} SEG -> pacs: try 1 failed (C-STORE answered 0xA700); next in 30 s" in lines
        trace = study_path(journal, "1.2.826.0.1.1")
        assert f"  job {job_id} SR -> pacs: delivered, 1 tries" in trace
        assert f"  job {job_id} SEG -> pacs: pending, 1 tries  C-STORE answered 0xA700" in trace
    finally:
        journal.close()
        pacs.shutdown()


class _SlowCheckpoint(threading.Event):
    """The association's reactor thread preempted right after passing its checkpoint,
    before it lowers its "paused" flag: pynetdicom 3.0.4's send_c_store takes it to be
    paused then."""

    def wait(self, timeout: float | None = None) -> bool:
        passed = super().wait(timeout)
        time.sleep(0.05)
        return passed


class _LateReader(queue.Queue):
    """The sending thread preempted between sending its request and reading the answer."""

    def get(self, block: bool = True, timeout: float | None = None):
        if block:
            time.sleep(0.1)
        return super().get(block, timeout)


def test_each_send_gets_its_answer_when_the_reactor_lingers_past_its_checkpoint(storescp):
    """pynetdicom's association reactor reads the DIMSE queue after its checkpoint; a send
    made while it is between the two can have its C-STORE response taken by the reactor,
    and then waits out the DIMSE timeout (2 in 4,500 SR sends to storescp). StoreAssociation
    stops the reactor at the checkpoint first. Here both threads are slowed where the race
    lies: without that pause the first send fails. Requests go out with TCP_NODELAY."""
    port, received = storescp
    file = DicomFile.read(Path(pydicom.data.get_testdata_file("CT_small.dcm")))
    with StoreSCU(_pacs(port), "RADPIPE", Timeouts(10, 10, 2, 10)).associate([file]) as association:
        reactor = association._association
        assert reactor.dul.socket.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        reactor.dimse.msg_queue = _LateReader()
        checkpoint, reactor._reactor_checkpoint = reactor._reactor_checkpoint, _SlowCheckpoint()
        reactor._reactor_checkpoint.set()
        checkpoint.set()  # a reactor waiting on the old one moves to the slow one
        for _ in range(5):
            association.store(file)  # raises on no answer within the DIMSE timeout
    assert [path.name for path in received.iterdir()] == [f"CT.{file.sop_instance_uid}"]


def test_a_result_that_is_not_dicom_is_journaled_with_backoff(tmp_path, demo_study, caplog):
    """A result file overwritten with garbage (outside the network errors the dispatcher
    used to catch): one failed try, journaled with its backoff, one log line without a
    traceback; the good result beside it is delivered."""
    caplog.set_level(logging.INFO, logger="plugin.dispatch")
    good, bad = with_new_uids(demo_study["Demo chest CT, no nodules"][:2], tmp_path / "results")
    received: list[pydicom.Dataset] = []
    pacs, port = start_pacs(received)
    journal = open_journal(tmp_path)
    try:
        job_id = queue_results(journal, [good, bad], ["pacs"])
        bad.write_bytes(b"not a DICOM file")
        with dispatching(journal, {"pacs": _pacs(port)}, DispatchSection(backoff_seconds=30)) as metrics:
            wait_for(lambda: all(d.attempts for d in journal.deliveries(job_id)), timeout=10, what="both tried")
            time.sleep(1)  # five polls of the old dispatcher, which retried such a failure on each
            [failed] = journal.deliveries(job_id, status="pending")
            assert failed.attempts == 1 and "not a DICOM file" in (failed.last_error or "")
            assert journal.due_deliveries(time.time()) == []  # waiting for its backoff
            assert metrics.registry.get_sample_value("radpipe_dispatch_failures_total", {"destination": "pacs"}) == 1
        assert [str(ds.SOPInstanceUID) for ds in received] == [_sop_uid(good)]
    finally:
        journal.close()
        pacs.shutdown()
    lines = [r for r in caplog.records if r.name == "plugin.dispatch" and r.levelno >= logging.WARNING]
    assert len(lines) == 1 and lines[0].exc_info is None, [r.getMessage() for r in lines]


def test_a_result_for_a_destination_no_longer_configured_is_dead_lettered(tmp_path, demo_study):
    paths = with_new_uids(demo_study["Demo chest CT, no nodules"][:1], tmp_path / "results")
    journal = open_journal(tmp_path)
    try:
        job_id = queue_results(journal, paths, ["removed"])
        with dispatching(journal, {}, DispatchSection()) as metrics:
            [dead] = wait_for(lambda: journal.deliveries(job_id, status="dead"), timeout=15, what="a dead letter")
        assert dead.attempts == 1 and "'removed' is not configured" in (dead.last_error or "")
        assert metrics.registry.get_sample_value("radpipe_dispatch_failures_total", {"destination": "removed"}) == 1
    finally:
        journal.close()


def test_unreachable_destination_is_retried_then_dead_lettered(start_node, demo_study, dcmtk):
    closed_port = free_port()
    node = start_node(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": closed_port}})
    assert storescu(node.port, *demo_study["Demo chest CT, no nodules"]).returncode == 0
    job = wait_for(lambda: node.journal.jobs() and node.journal.jobs()[0].status == "done" and node.journal.jobs()[0])
    [delivery] = wait_for(lambda: node.journal.deliveries(status="dead"), what="a dead letter")
    assert delivery.attempts == 3
    assert "PACS@127.0.0.1" in delivery.last_error
    assert node.metrics.registry.get_sample_value("radpipe_dispatch_failures_total", {"destination": "pacs"}) == 3
    # The result stays in the results folder for a later retry.
    assert all(Path(r.path).is_file() for r in node.journal.results(job.id))
