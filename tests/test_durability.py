"""Durable delivery, supersession, back-pressure, retention and the status/retry commands."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import yaml

from plugin.outputs.sr import read_measurement_report
from tests.conftest import free_port, results, storescu, wait_for, with_new_uids
from tests.test_dispatch import start_pacs

RADPIPE = [os.path.join(os.path.dirname(sys.executable), "radpipe")]
FAST_RETRY = {"backoff_seconds": 0.2, "max_backoff_seconds": 0.5, "tries": None}


def test_outage_results_queue_then_all_delivered_once(start_node, tmp_path, demo_study, dcmtk):
    port = free_port()
    node = start_node(
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}}, dispatch=FAST_RETRY
    )
    series = [with_new_uids(demo_study["Demo chest CT, no nodules"][:3], tmp_path / f"s{i}") for i in range(3)]
    for paths in series:
        assert storescu(node.port, *paths).returncode == 0
    wait_for(lambda: node.journal.queue_depths()["dispatch"] == 3, what="3 results waiting for the PACS")
    wait_for(lambda: all(d.attempts >= 2 for d in node.journal.deliveries()), what="retries while down")

    received: list[pydicom.Dataset] = []
    pacs, _ = start_pacs(received, port=port)
    try:
        wait_for(lambda: node.journal.queue_depths()["dispatch"] == 0, what="the queue to drain")
        time.sleep(1.5)  # more than the backoff: nothing may arrive twice
    finally:
        pacs.shutdown()
    uids = [str(ds.SOPInstanceUID) for ds in received]
    assert sorted(uids) == sorted({r.sop_instance_uid for j in node.journal.jobs() for r in node.journal.results(j.id)})
    assert len(uids) == len(set(uids)) == 3


def test_late_arrival_supersedes_the_previous_sr(start_node, tmp_path, demo_study, dcmtk):
    node = start_node()
    series = demo_study["Demo chest CT, nodules"]
    assert storescu(node.port, *series[:-2]).returncode == 0
    [first] = wait_for(lambda: results(node.results_dir), what="first SR")
    assert storescu(node.port, *series[-2:]).returncode == 0
    second = wait_for(lambda: [p for p in results(node.results_dir) if p != first], what="superseding SR")
    old, new = pydicom.dcmread(first), pydicom.dcmread(second[0])
    assert new.SOPInstanceUID != old.SOPInstanceUID
    [predecessor] = new.PredecessorDocumentsSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert predecessor.ReferencedSOPInstanceUID == old.SOPInstanceUID
    assert len(read_measurement_report(new)[0].source_sop_instance_uids) == len(series)


def test_disk_floor_answers_out_of_resources_and_recovers(start_node, tmp_path, demo_study, dcmtk):
    balloon = tmp_path / "balloon"
    subprocess.run(["fallocate", "-l", "256M", str(balloon)], check=True)
    free_mb = os.statvfs(tmp_path).f_bavail * os.statvfs(tmp_path).f_frsize // 2**20
    node = start_node(storage={"min_free_mb": free_mb + 128})
    out = storescu(node.port, demo_study["Demo chest CT, nodules"][0], options=("-v",))
    assert "Received Store Response (Refused: OutOfResources" in out.stderr
    assert subprocess.run(["echoscu", "-aec", "RADPIPE", "127.0.0.1", str(node.port)]).returncode == 0
    balloon.unlink()  # space frees: the node accepts again by itself
    out = storescu(node.port, demo_study["Demo chest CT, nodules"][0], options=("-v",))
    assert "Received Store Response (Success)" in out.stderr
    count = node.metrics.registry.get_sample_value("radpipe_instances_rejected_total", {"reason": "out_of_resources"})
    assert count == 1


def test_retention_purges_delivered_studies_only(start_node, tmp_path, demo_study, dcmtk):
    received: list[pydicom.Dataset] = []
    pacs, port = start_pacs(received)
    try:
        node = start_node(destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": port}})
        delivered = demo_study["Demo chest CT, nodules"][:2]
        assert storescu(node.port, *delivered).returncode == 0
        wait_for(lambda: received, what="delivery")
    finally:
        pacs.shutdown()
    undelivered = with_new_uids(demo_study["Demo chest CT, no nodules"][:2], tmp_path / "undelivered")
    assert storescu(node.port, *undelivered).returncode == 0
    wait_for(lambda: node.journal.deliveries(status="pending"), what="an undelivered result")
    retention = next(w for w in node.workers if w.name == "retention")
    [purged] = retention.purge(older_than=time.time() + 1)
    assert purged == str(pydicom.dcmread(delivered[0]).StudyInstanceUID)
    assert not (node.spool.root / purged).exists() and not (node.results_dir / purged).exists()
    kept = str(pydicom.dcmread(undelivered[0]).StudyInstanceUID)
    assert (node.spool.root / kept).is_dir()


def test_status_and_retry_commands(start_node, tmp_path, demo_study, dcmtk):
    node = start_node(
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}},
        dispatch={"tries": 1},
    )
    assert storescu(node.port, *demo_study["Demo chest CT, nodules"][:2]).returncode == 0
    wait_for(lambda: node.journal.deliveries(status="dead"), what="a dead letter")
    config = tmp_path / "radpipe.yaml"
    config.write_text(
        yaml.safe_dump({"storage": {"dir": str(node.config.storage.dir)}, "journal": {"url": node.config.journal.url}})
    )
    status = subprocess.run([*RADPIPE, "status", "--config", str(config)], capture_output=True, text=True)
    assert status.returncode == 0, status.stderr
    assert "dead_letter=1" in status.stdout and "dead letters: 1" in status.stdout
    assert " SR -> pacs: 1 tries" in status.stdout
    retry = subprocess.run(
        [*RADPIPE, "retry", "--dead-letter", "--config", str(config)], capture_output=True, text=True
    )
    assert retry.stdout.strip() == "requeued 1 dead-lettered deliveries"
    wait_for(lambda: node.journal.deliveries(status="dead"), what="dead again after the retry")
    assert node.journal.deliveries()[0].attempts == 1  # a fresh start, then one more try
    assert Path(node.journal.deliveries()[0].result_path).is_file()
