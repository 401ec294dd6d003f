"""Re-sends: a PACS sends an instance again over whatever presentation context it
negotiates. The same content in another transfer syntax is answered success and starts no
re-run; the same SOP Instance UID with other pixels is refused and quarantined."""

import json
import logging
import subprocess
import time
from pathlib import Path

import numpy as np
import pydicom

from tests.conftest import storescu, wait_for

SUCCESS = "Received Store Response (Success)"


def _encoded(tool: str, paths: list[Path], out_dir: Path, *options: str) -> list[Path]:
    """Copies of ``paths`` re-encoded by a dcmtk tool (dcmcrle, dcmcjpls, ...): same
    attributes, same pixel values, other bytes."""
    out_dir.mkdir()
    copies = [out_dir / path.name for path in paths]
    for path, copy in zip(paths, copies, strict=True):
        subprocess.run([tool, *options, str(path), str(copy)], check=True, capture_output=True, timeout=60)
    return copies


def _send(port: int, paths: list[Path], *options: str) -> str:
    out = storescu(port, *paths, options=("-v", *options))
    return out.stderr + out.stdout


def test_same_instance_in_other_transfer_syntaxes_is_success_and_no_rerun(start_node, demo_study, tmp_path, dcmtk):
    node = start_node()
    series = demo_study["Demo chest CT, no nodules"][:6]
    assert _send(node.port, series).count(SUCCESS) == len(series)
    wait_for(lambda: [j for j in node.journal.jobs() if j.status == "done"], what="the first run")
    stored = {p: Path(node.journal.instance(str(pydicom.dcmread(p).SOPInstanceUID)).path).read_bytes() for p in series}

    resends = {
        "implicit VR little endian": (series, ("-xi",)),
        "explicit VR big endian": (series, ("-xb",)),
        "RLE lossless": (_encoded("dcmcrle", series, tmp_path / "rle"), ("-xr",)),
        "JPEG-LS lossless": (_encoded("dcmcjpls", series, tmp_path / "jls"), ("-xt",)),
    }
    for name, (paths, options) in resends.items():
        transfer_syntax = pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID
        assert transfer_syntax.is_encapsulated == name.endswith("lossless"), (name, transfer_syntax)
        output = _send(node.port, paths, *options)
        assert output.count(SUCCESS) == len(series), (name, output[-2000:])
    assert node.quarantine.count() == 0
    assert node.journal.queue_depths()["assembly"] == 0  # nothing pending: no re-run can start
    time.sleep(2.5)  # over the pipeline's quiet period (1 s): a re-run would have been queued by now
    assert len(node.journal.jobs()) == 1
    # The first copy stays as it was received.
    for path, data in stored.items():
        assert Path(node.journal.instance(str(pydicom.dcmread(path).SOPInstanceUID)).path).read_bytes() == data


def test_same_uid_with_other_pixels_is_refused_and_quarantined_with_its_uid(
    start_node, demo_study, tmp_path, dcmtk, caplog
):
    node = start_node()
    original = demo_study["Demo chest CT, nodules"][0]
    assert SUCCESS in _send(node.port, [original])
    changed = pydicom.dcmread(original)
    pixels = changed.pixel_array.copy()
    pixels[100, 100] += 1
    changed.PixelData = pixels.astype(np.int16).tobytes()
    conflicting = tmp_path / "conflict.dcm"
    changed.save_as(conflicting, enforce_file_format=True)

    for options in ((), ("-xi",)):  # as sent first, and re-encoded: decoded pixels decide, not bytes
        assert "Error: DataSetDoesNotMatchSOPClass" in _send(node.port, [conflicting], *options)
    assert node.quarantine.count("duplicate_conflict") == 2
    refusals = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(refusals) == 2, refusals  # one line per refused C-STORE, naming where its bytes are kept
    assert all("refused (duplicate_conflict)" in m and "kept as quarantine/duplicate_conflict/" in m for m in refusals)
    notes = [json.loads(p.read_text()) for p in (node.quarantine.root / "duplicate_conflict").glob("*.json")]
    for note in notes:
        assert note["reason"] == "duplicate_conflict"
        assert note["sop_instance_uid"] == str(changed.SOPInstanceUID)
        assert note["source"] == "STORESCU"  # the calling AE
    assert (
        node.metrics.registry.get_sample_value("radpipe_instances_rejected_total", {"reason": "duplicate_conflict"})
        == 2
    )
