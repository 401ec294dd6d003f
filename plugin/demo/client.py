"""``radpipe demo``: send a synthetic study to a running node and print what it found."""

import time
from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.uid import CTImageStorage
from pynetdicom import AE

from plugin.demo.series import synthetic_study
from plugin.outputs.sr import read_measurement_report


def send_files(paths: Sequence[Path], host: str, port: int, called_ae: str, calling_ae: str = "RADPIPE-DEMO") -> None:
    """C-STORE every file over one association; raise RuntimeError on any failure."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise RuntimeError(f"could not associate with {called_ae}@{host}:{port}; is `radpipe serve` running?")
    try:
        for path in paths:
            status = assoc.send_c_store(path)
            if status.get("Status") != 0x0000:
                raise RuntimeError(f"{path.name}: C-STORE answered {status.get('Status', 'nothing')}")
    finally:
        assoc.release()


def _result_series(sr: pydicom.Dataset) -> str:
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    return str(evidence.ReferencedSeriesSequence[0].SeriesInstanceUID)


def run_demo(
    host: str, port: int, called_ae: str, results_dir: Path, work_dir: Path, timeout: float, seed: int | None = None
) -> int:
    study = synthetic_study(work_dir, seed=int(time.time()) % 10_000 if seed is None else seed)
    series_uids = {}
    for description, paths in study.items():
        print(f"sending {len(paths)} slices: {description}")
        send_files(paths, host, port, called_ae)
        series_uids[str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)] = description
    study_uid = str(pydicom.dcmread(next(iter(study.values()))[0], stop_before_pixels=True).StudyInstanceUID)
    print(f"waiting up to {timeout:.0f} s for results in {results_dir / study_uid}")
    deadline = time.monotonic() + timeout
    reported: dict[str, pydicom.Dataset] = {}
    while time.monotonic() < deadline and len(reported) < len(series_uids):
        for path in sorted((results_dir / study_uid).glob("*.dcm")):
            sr = pydicom.dcmread(path)
            reported.setdefault(_result_series(sr), sr)
        time.sleep(0.2)
    for series_uid, description in series_uids.items():
        if series_uid not in reported:
            print(f"{description}: no result yet (is the node's results folder {results_dir}?)")
            continue
        for finding in read_measurement_report(reported[series_uid]):
            verdict = "PRESENT" if finding.present else "absent"
            print(f"{description}: {finding.finding.meaning} {verdict}, probability {finding.probability:.3f}")
    return 0 if len(reported) == len(series_uids) else 1
