"""Hostile and broken input: each case is refused or fails its job with a named reason,
is quarantined, and the node keeps serving (echo, and a valid series in the same association)."""

import shutil
import struct
import subprocess

import pydicom
import pynetdicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from plugin.models.architectures import DemoCNN
from plugin.models.artifact import save_artifact
from tests.conftest import PYDICOM_DATA, PYDICOM_FILES, wait_for, write_pipeline


def _garbage_codestream(ds):
    ds.SeriesInstanceUID = generate_uid()
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(2000)])


def _variant(source, path, change, transfer_syntax=ExplicitVRLittleEndian):
    """A copy of ``source`` with fresh UIDs, changed by ``change(ds)``, written as-is."""
    ds = pydicom.dcmread(source, force=True)
    ds.SOPInstanceUID = generate_uid()
    with pydicom.config.disable_value_validation():
        change(ds)
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = transfer_syntax
        dcmwrite(path, ds, enforce_file_format=True)
    return path


def _raw(source, path, mangle):
    """``source``'s file meta followed by ``mangle(dataset bytes)``: bytes no writer would produce."""
    data = source.read_bytes()
    meta_end = 132 + 12 + struct.unpack("<I", data[140:144])[0]  # preamble+DICM, then group length element
    path.write_bytes(data[:meta_end] + mangle(data[meta_end:]))
    return path


@pytest.fixture
def corpus(tmp_path, demo_study):
    """{case: (file, expected C-STORE status, expected rejection reason or None)}."""
    ct = demo_study["Demo chest CT, no nodules"][0]
    d = tmp_path / "corpus"
    d.mkdir()

    def set_(**values):
        return lambda ds: [setattr(ds, k, v) for k, v in values.items()]

    def without(*keywords):
        return lambda ds: [delattr(ds, k) for k in keywords]

    return {
        "not_dicom": (
            _raw(ct, d / "garbage.dcm", lambda b: b"\x07\x00" + bytes(range(256)) * 40),
            0xC210,
            "undecodable",
        ),
        "truncated_file": (_raw(ct, d / "truncated.dcm", lambda b: b[: len(b) // 2]), 0xA900, "pixel_data_mismatch"),
        "missing_pixel_data": (_variant(ct, d / "nopix.dcm", without("PixelData")), 0xA900, "missing_pixel_data"),
        "truncated_pixel_data": (
            _variant(ct, d / "shortpix.dcm", lambda ds: setattr(ds, "PixelData", ds.PixelData[:1000])),
            0xA900,
            "pixel_data_mismatch",
        ),
        "rows_columns_mismatch": (_variant(ct, d / "rows.dcm", set_(Rows=1024)), 0xA900, "pixel_data_mismatch"),
        "bit_depth": (_variant(ct, d / "bits.dcm", set_(BitsAllocated=12)), 0xA900, "unsupported_pixel_format"),
        "photometric": (
            _variant(ct, d / "cmyk.dcm", set_(PhotometricInterpretation="CMYK")),
            0xA900,
            "unsupported_pixel_format",
        ),
        "absurd_size": (
            _variant(ct, d / "huge.dcm", set_(Rows=65535, Columns=65535, NumberOfFrames=4000)),
            0xA900,
            "absurd_size",
        ),
        "invalid_uid": (_variant(ct, d / "baduid.dcm", set_(SeriesInstanceUID="1.2.abc")), 0xA900, "invalid_uid"),
        "missing_uid": (_variant(ct, d / "nouid.dcm", without("StudyInstanceUID")), 0xA900, "invalid_uid"),
        "duplicate_conflict": (
            _variant(
                ct,
                d / "dup.dcm",
                lambda ds: (
                    setattr(ds, "SOPInstanceUID", pydicom.dcmread(ct).SOPInstanceUID),
                    setattr(ds, "PixelData", bytes(len(ds.PixelData))),
                ),
            ),
            0xA900,
            "duplicate_conflict",
        ),
        # Accepted: valid non-image objects are stored (unrouted), broken compressed data fails its job.
        "structured_report": (_variant(PYDICOM_FILES / "test-SR.dcm", d / "sr.dcm", lambda ds: None), 0x0000, None),
        "rtstruct": (_variant(PYDICOM_FILES / "rtstruct.dcm", d / "rtstruct.dcm", lambda ds: None), 0x0000, None),
        # A JPEG 2000 file cut short (pydicom-data's own broken sample).
        "truncated_j2k": (
            shutil.copy(PYDICOM_DATA / "emri_small_jpeg_2k_lossless_too_short.dcm", d / "short.dcm"),
            0xC210,
            "undecodable",
        ),
        # Well-formed encapsulation around a codestream no decoder accepts: found by the job.
        "undecodable_j2k": (
            _variant(PYDICOM_DATA / "693_J2KR.dcm", d / "bad.j2k.dcm", _garbage_codestream, JPEG2000Lossless),
            0x0000,
            None,
        ),
    }


def test_hostile_corpus_is_refused_or_quarantined_and_the_node_keeps_serving(
    start_node, tmp_path, corpus, demo_study, monkeypatch
):
    # Send each file's bytes as they are on disk (pynetdicom would otherwise decode and re-encode them).
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    broken = tmp_path / "broken-model"
    save_artifact(
        broken,
        DemoCNN(in_channels=3),
        {  # expects 3 channels; gets 1: its forward raises
            "architecture": {"id": "demo-cnn", "params": {"in_channels": 3}},
            "input": {},
            "classes": ["normal", "nodule"],
        },
    )
    write_pipeline(tmp_path / "pipelines", match={"Modality": "CT"})  # the undecodable CT too, not only synthetic ones
    write_pipeline(
        tmp_path / "pipelines",
        name="raises",
        model={"artifact": str(broken)},
        match={"SeriesDescription": {"regex": "no nodules"}},
    )
    node = start_node()

    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(Verification)
    for path, _, _ in corpus.values():
        meta = pydicom.filereader.read_file_meta_info(path)
        ae.add_requested_context(meta.MediaStorageSOPClassUID, meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="RADPIPE")
    assert assoc.is_established
    try:
        # The valid series first (so the duplicate has an original), then every hostile case.
        valid = demo_study["Demo chest CT, no nodules"]
        assert all(assoc.send_c_store(p).Status == 0 for p in valid)
        statuses = {case: assoc.send_c_store(path).get("Status") for case, (path, _, _) in corpus.items()}
        assert assoc.send_c_echo().Status == 0
    finally:
        assoc.release()

    assert statuses == {case: status for case, (_, status, _) in corpus.items()}
    reasons = [reason for _, _, reason in corpus.values() if reason]
    for reason in set(reasons):
        count = node.metrics.registry.get_sample_value("radpipe_instances_rejected_total", {"reason": reason})
        assert count == reasons.count(reason), reason
        assert node.quarantine.count(reason) == reasons.count(reason), reason

    def finished():
        jobs = node.journal.jobs()
        return len(jobs) >= 3 and all(j.status in ("done", "failed") for j in jobs) and jobs

    jobs = {(j.pipeline, j.status): j for j in wait_for(finished, what="the valid series' jobs and the failing ones")}
    assert set(jobs) == {("lung-nodule-demo", "done"), ("lung-nodule-demo", "failed"), ("raises", "failed")}
    assert "RuntimeError" in jobs["raises", "failed"].error  # the model raised; the valid series still got its SR
    assert "cannot decode pixel data" in jobs["lung-nodule-demo", "failed"].error
    assert node.quarantine.count("decode_failed") == 1
    failed = node.metrics.registry.get_sample_value("radpipe_jobs_total", {"pipeline": "raises", "status": "failed"})
    assert failed == 1
    for case in ("structured_report", "rtstruct"):
        uid = str(pydicom.dcmread(corpus[case][0]).SOPInstanceUID)
        record = wait_for(lambda uid=uid: node.journal.instance(uid) and node.journal.instance(uid).batch_id)
        assert node.journal.batch_routing(record) == "unrouted"
    echo = subprocess.run(["echoscu", "-aec", "RADPIPE", "127.0.0.1", str(node.port)], capture_output=True)
    assert echo.returncode == 0
