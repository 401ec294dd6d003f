"""Results reach the destination by C-STORE; an unreachable destination is retried, then failed."""

from pathlib import Path

import pydicom
from pynetdicom import AE, AllStoragePresentationContexts, evt

from tests.conftest import free_port, storescu, wait_for


def start_pacs(received: list[pydicom.Dataset], port: int | None = None):
    """A minimal storage SCP standing in for the PACS; returns (server, port)."""

    def on_store(event):
        received.append(event.dataset)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.supported_contexts = AllStoragePresentationContexts
    port = port or free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    return server, port


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
