"""Nothing acknowledged is lost: SIGKILL at varied points, restart, re-send, and check
that every acknowledged instance is kept and the PACS holds one current SR per series.
Also a load test: 8 concurrent associations x 250 instances."""

import random
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from plugin.config import NodeConfig
from plugin.demo.phantom import make_volume
from plugin.demo.series import write_ct_series
from plugin.outputs.sr import read_measurement_report
from tests.conftest import (
    JOURNAL_ERRORS,
    free_port,
    node_config,
    read_journal,
    serve,
    wait_for,
    with_new_uids,
    write_pipeline,
)
from tests.test_dispatch import start_pacs


def _send(paths: list[Path], port: int, acked: set[str], lock: threading.Lock) -> None:
    """One association; record every SOP Instance UID the node answered success for."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="RADPIPE")
    if not assoc.is_established:
        return
    try:
        for path in paths:
            if not assoc.is_established:
                return
            status = assoc.send_c_store(path)
            if status.get("Status") == 0x0000:
                with lock:
                    acked.add(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
    finally:
        if assoc.is_established:
            assoc.release()


def _send_all(series: list[list[Path]], port: int, acked: set[str]) -> list[threading.Thread]:
    lock = threading.Lock()
    threads = [threading.Thread(target=_send, args=(paths, port, acked, lock), name="sender") for paths in series]
    for thread in threads:
        thread.start()
    return threads


def _kill_when(point: str, journal: Path | str, rng: random.Random) -> None:
    """Wait for the moment to kill: during receive, during inference, or during dispatch."""
    if point == "receive":
        time.sleep(rng.uniform(0.05, 0.4))
        return
    deadline = time.monotonic() + 30
    sql = {
        "infer": "SELECT COUNT(*) FROM jobs WHERE status = 'running'",
        "dispatch": "SELECT COUNT(*) FROM results",
    }[point]
    while time.monotonic() < deadline:
        try:
            if read_journal(journal, sql)[0][0] > 0:
                return
        except JOURNAL_ERRORS:
            pass
        time.sleep(0.005)


@pytest.fixture(scope="module")
def small_series(tmp_path_factory) -> list[Path]:
    volume, _ = make_volume(np.random.default_rng(3), 6, n_nodules=1)
    return write_ct_series(
        tmp_path_factory.mktemp("small"),
        volume,
        study_uid=pydicom.uid.generate_uid(),
        series_number=1,
        series_description="crash test",
        seed=3,
    )


@pytest.mark.timeout(600)  # six kill-and-restart trials: twice the suite's per-test limit
def test_sigkill_at_varied_points_loses_nothing(tmp_path, small_series, dcmtk):
    received: list[pydicom.Dataset] = []
    pacs, pacs_port = start_pacs(received)
    port = free_port()
    write_pipeline(tmp_path / "pipelines")
    config = node_config(
        tmp_path,
        node={"port": port},
        metrics={"port": 0},
        destinations={"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        dispatch={"backoff_seconds": 0.2, "max_backoff_seconds": 0.5},
    )
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump(config))
    journal, log = NodeConfig.model_validate(config).journal_location, tmp_path / "node.log"
    rng = random.Random(20261129)
    acked: set[str] = set()
    all_series: list[list[Path]] = []
    node = serve(tmp_path / "radpipe.yaml", port, log)
    try:
        for trial, point in enumerate(["receive", "infer", "dispatch"] * 2):  # each point twice: 6 trials
            series = [with_new_uids(small_series, tmp_path / f"t{trial}s{i}") for i in range(3)]
            all_series += series
            senders = _send_all(series, port, acked)
            _kill_when(point, journal, rng)
            node.send_signal(signal.SIGKILL)
            node.wait(10)
            for sender in senders:
                sender.join(30)
            node = serve(tmp_path / "radpipe.yaml", port, log)  # restart; the sender re-sends what was not acked
            missing = [[p for p in paths if _uid(p) not in acked] for paths in series]
            for sender in _send_all([m for m in missing if m], port, acked):
                sender.join(60)
            assert all(_uid(p) in acked for paths in series for p in paths), f"trial {trial}: re-send failed"
            wait_for(lambda s=series: _current_srs(received, s) is not None, timeout=90, what=f"trial {trial} SRs")
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)
        pacs.shutdown()

    stored = {uid: path for uid, path in read_journal(journal, "SELECT sop_instance_uid, path FROM instances")}
    assert acked <= set(stored), "an acknowledged instance is missing from the journal"
    assert all(Path(stored[uid]).is_file() for uid in acked), "an acknowledged instance is missing from the spool"
    current = _current_srs(received, all_series)
    assert current is not None and len(current) == len(all_series)


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def _current_srs(received: list[pydicom.Dataset], series: list[list[Path]]) -> dict | None:
    """Per series, the one SR no other received SR supersedes, if it covers the whole series;
    None while any series lacks one. An SR received twice (a re-send) must be the same object."""
    srs: dict[str, pydicom.Dataset] = {}
    for sr in list(received):
        first = srs.setdefault(str(sr.SOPInstanceUID), sr)
        assert first == sr, "the same SOP Instance UID arrived with different content"
    superseded = {
        item.ReferencedSOPInstanceUID
        for sr in srs.values()
        for study in sr.get("PredecessorDocumentsSequence", [])
        for ref_series in study.ReferencedSeriesSequence
        for item in ref_series.ReferencedSOPSequence
    }
    current: dict[str, str] = {}
    for paths in series:
        expected = {_uid(p) for p in paths}
        series_uid = str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
        candidates = [
            uid
            for uid, sr in srs.items()
            if uid not in superseded
            and sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].SeriesInstanceUID
            == series_uid
        ]
        if len(candidates) != 1:
            return None
        if set(read_measurement_report(srs[candidates[0]])[0].source_sop_instance_uids) != expected:
            return None
        current[series_uid] = candidates[0]
    return current


def _small_instances(template: Path, out: Path, series_count: int, per_series: int) -> list[list[Path]]:
    """``series_count`` series of ``per_series`` 64x64 CT instances (fresh UIDs each)."""
    base = pydicom.dcmread(template)
    base.Rows = base.Columns = 64
    base.PixelData = np.random.default_rng(0).integers(-1000, 400, (64, 64), dtype=np.int16).tobytes()
    study = pydicom.uid.generate_uid()
    result = []
    for s in range(series_count):
        base.StudyInstanceUID, base.SeriesInstanceUID = study, pydicom.uid.generate_uid()
        folder = out / f"series{s}"
        folder.mkdir(parents=True)
        paths = []
        for i in range(per_series):
            base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
            base.InstanceNumber = i + 1
            base.ImagePositionPatient = [0, 0, float(i)]
            paths.append(folder / f"{i:04d}.dcm")
            base.save_as(paths[-1])
        result.append(paths)
    return result


def test_load_8_associations_x_250_instances(tmp_path, small_series, dcmtk):
    series = _small_instances(small_series[0], tmp_path / "load", series_count=8, per_series=250)
    port = free_port()
    write_pipeline(tmp_path / "pipelines")
    config = node_config(tmp_path, node={"port": port}, metrics={"port": 0})
    (tmp_path / "radpipe.yaml").write_text(yaml.safe_dump(config))
    node = serve(tmp_path / "radpipe.yaml", port, tmp_path / "node.log")
    acked: set[str] = set()
    try:
        start = time.monotonic()
        for sender in _send_all(series, port, acked):
            sender.join(300)
        elapsed = time.monotonic() - start
        assert len(acked) == 8 * 250, "every instance must be answered success"
        results = tmp_path / "data" / "results"
        wait_for(lambda: len(list(results.glob("*/*.dcm"))) == 8, timeout=120, what="8 SRs")
        peak_mib = int(Path(f"/proc/{node.pid}/status").read_text().split("VmHWM:")[1].split()[0]) / 1024
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(30)
    print(f"load: 2000 instances over 8 associations in {elapsed:.1f} s; node peak RSS {peak_mib:.0f} MiB")
    assert peak_mib < 1024, f"node peak RSS {peak_mib:.0f} MiB"
