"""``radpipe demo``: send a synthetic study to a running node and print what it found.

Both demo pipelines report on each series: ``lung-nodule-demo`` says whether a nodule is
present, ``lung-nodule-seg-demo`` outlines and measures each one, printed here next to what
the phantom drew (its truth), so the figures can be judged, not only read.
"""

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom

from plugin.config import Destination
from plugin.demo.series import TruthNodule, write_synthetic_study
from plugin.outputs.sr import ReportedLesion, read_measurement_report, read_volumetric_measurement_report
from plugin.scu import DeliveryError, DicomFile, StoreSCU, Timeouts

CLASSIFIER, SEGMENTER = "lung-nodule-demo", "lung-nodule-seg-demo"
SETTLE_SECONDS = 20.0  # how long to wait for the other pipeline once each series has one result
SEND_TIMEOUTS = Timeouts(connect=10, acse=30, dimse=60, network=60)


def send_files(paths: Sequence[Path], host: str, port: int, called_ae: str, calling_ae: str = "RADPIPE-DEMO") -> None:
    """C-STORE every file over one association, as the dispatcher sends results; raise
    DeliveryError on any failure."""
    files = [DicomFile.read(path) for path in paths]
    scu = StoreSCU(Destination(ae_title=called_ae, host=host, port=port), calling_ae, SEND_TIMEOUTS)
    with scu.associate(files) as association:
        for file in files:
            association.store(file)


def _result_key(sr: pydicom.Dataset) -> tuple[str, str] | None:
    """(source series UID, demo pipeline) of an SR written by one of the demo pipelines; None for anything else."""
    if sr.get("Modality") != "SR":
        return None
    pipeline = next(
        (p for p in (CLASSIFIER, SEGMENTER) if str(sr.SeriesDescription).startswith(f"radpipe {p} v")), None
    )
    if pipeline is None:
        return None
    evidence = sr.CurrentRequestedProcedureEvidenceSequence[0]
    return str(evidence.ReferencedSeriesSequence[0].SeriesInstanceUID), pipeline


def _nearest(lesion: ReportedLesion, truth: Sequence[TruthNodule]) -> int | None:
    """The index of the truth nodule whose centroid lies within its diameter of the lesion's."""
    if lesion.centroid is None or not truth:
        return None
    distances = [float(np.linalg.norm(np.subtract(lesion.centroid, t.centroid))) for t in truth]
    index = int(np.argmin(distances))
    return index if distances[index] <= truth[index].diameter_mm else None


def _print_lesions(description: str, sr: pydicom.Dataset, truth: Sequence[TruthNodule]) -> None:
    lesions = read_volumetric_measurement_report(sr)
    print(f"{description}: {len(lesions)} lesion(s) outlined; the phantom drew {len(truth)} nodule(s)")
    matched = set()
    for lesion in lesions:
        line = f"  lesion {lesion.identifier}: {lesion.volume_mm3:.0f} mm3, diameter {lesion.diameter_mm:.1f} mm"
        index = _nearest(lesion, truth)
        if index is None:
            print(f"{line}: no nodule there (false positive)")
            continue
        matched.add(index)
        nodule = truth[index]
        print(f"{line}; truth nodule {index + 1}: {nodule.volume_mm3:.0f} mm3, diameter {nodule.diameter_mm:.1f} mm")
    for index, nodule in enumerate(truth):
        if index not in matched:
            print(
                f"  truth nodule {index + 1}: {nodule.volume_mm3:.0f} mm3, diameter {nodule.diameter_mm:.1f} mm: missed"
            )


def _collect(results: Path, expected: set[tuple[str, str]], timeout: float) -> dict[tuple[str, str], pydicom.Dataset]:
    """The demo pipelines' SRs in the study's ``results`` folder, by (source series, pipeline):
    all of ``expected``, or what came within ``timeout`` s, or within ``SETTLE_SECONDS`` of
    every series having one (a node may run only one of the two pipelines)."""
    deadline = time.monotonic() + timeout
    series = {uid for uid, _ in expected}
    reported: dict[tuple[str, str], pydicom.Dataset] = {}
    seen: set[Path] = set()
    while time.monotonic() < deadline and not expected <= reported.keys():
        for path in sorted(set(results.glob("*.dcm")) - seen):
            seen.add(path)
            result = pydicom.dcmread(path)
            key = _result_key(result)
            if key is not None:
                reported.setdefault(key, result)
        if series <= {uid for uid, _ in reported}:
            deadline = min(deadline, time.monotonic() + SETTLE_SECONDS)
        time.sleep(0.2)
    return reported


def run_demo(
    host: str, port: int, called_ae: str, results_dir: Path, work_dir: Path, timeout: float, seed: int | None = None
) -> int:
    study = write_synthetic_study(work_dir, seed=int(time.time()) % 10_000 if seed is None else seed)
    series = {}
    for item in study:
        print(f"sending {len(item.paths)} slices: {item.description}")
        try:
            send_files(item.paths, host, port, called_ae)
        except DeliveryError as e:
            print(f"not sent: {e}; is `radpipe serve` running there?", file=sys.stderr)
            return 2
        series[str(pydicom.dcmread(item.paths[0], stop_before_pixels=True).SeriesInstanceUID)] = item
    study_uid = str(pydicom.dcmread(study[0].paths[0], stop_before_pixels=True).StudyInstanceUID)
    print(f"waiting up to {timeout:.0f} s for results in {results_dir / study_uid}")
    reported = _collect(results_dir / study_uid, {(uid, p) for uid in series for p in (CLASSIFIER, SEGMENTER)}, timeout)
    for uid, item in series.items():
        if not any(key[0] == uid for key in reported):
            print(f"{item.description}: no result yet (is the node's results folder {results_dir}?)")
        if (uid, CLASSIFIER) in reported:
            for finding in read_measurement_report(reported[uid, CLASSIFIER]):
                verdict = "PRESENT" if finding.present else "absent"
                print(f"{item.description}: {finding.finding.meaning} {verdict}, probability {finding.probability:.3f}")
        if (uid, SEGMENTER) in reported:
            _print_lesions(item.description, reported[uid, SEGMENTER], item.nodules())
    return 0 if {uid for uid, _ in reported} == series.keys() else 1
