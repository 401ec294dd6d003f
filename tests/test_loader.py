"""Pixel loading decodes every compressed transfer syntax the node accepts, with real files; what it
cannot decode fails its job with a named reason in one line."""

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate

from plugin.loader import modality_frames
from plugin.prepare import Preparer, WorkerDied
from tests.conftest import DEID_HUMANS, PYDICOM_DATA, PYDICOM_FILES, storescu, wait_for, with_new_uids
from tests.test_batching import _break_pixel_data

REFERENCE = PYDICOM_FILES / "MR_small.dcm"


@pytest.mark.parametrize(
    "name",
    ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"],
    ids=["rle", "jpeg-ls", "jpeg2000"],
)
def test_lossless_syntaxes_decode_to_the_uncompressed_pixels(name):
    expected = modality_frames(pydicom.dcmread(REFERENCE))
    np.testing.assert_array_equal(modality_frames(pydicom.dcmread(PYDICOM_FILES / name)), expected)


@pytest.mark.parametrize(
    ("path", "shape"),
    [
        (DEID_HUMANS / "ctbrain1.dcm", (1, 456, 510)),  # JPEG baseline
        (PYDICOM_DATA / "JPEG-LL.dcm", (1, 1024, 256)),  # JPEG lossless
        (PYDICOM_DATA / "693_J2KR.dcm", (1, 512, 512)),  # JPEG 2000, CT
        (PYDICOM_DATA / "emri_small_RLE.dcm", (10, 64, 64)),  # RLE, multi-frame
        (PYDICOM_DATA / "OBXXXX1A_rle.dcm", (1, 600, 800)),  # RLE, palette colour
        (PYDICOM_DATA / "US1_J2KR.dcm", (1, 480, 640)),  # JPEG 2000, YBR colour
    ],
    ids=lambda v: getattr(v, "name", ""),
)
def test_compressed_files_decode_to_float_frames(path, shape):
    frames = modality_frames(pydicom.dcmread(path))
    assert frames.shape == shape
    assert frames.dtype == np.float32
    assert np.isfinite(frames).all() and frames.std() > 0


def test_ct_values_are_hounsfield_units():
    frames = modality_frames(pydicom.dcmread(PYDICOM_DATA / "693_J2KR.dcm"))
    assert frames.min() < -900  # air, after RescaleIntercept


def test_a_frame_no_decoder_accepts_is_one_error_without_logged_tracebacks(caplog):
    ds = pydicom.dcmread(PYDICOM_DATA / "693_J2KR.dcm")
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(2000)])  # a codestream no decoder accepts
    with pytest.raises(RuntimeError, match="Unable to decode"):
        modality_frames(ds)
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []


def _dying_worker(self, sources, steps):
    raise WorkerDied("a decode worker process died: as a decoder crashing on this input would")
    yield


@pytest.mark.parametrize("reason", ["decode_failed", "worker_died"])
def test_a_job_failing_on_its_pixels_fails_with_a_named_reason_in_one_line(
    start_node, tmp_path, demo_study, dcmtk, caplog, monkeypatch, reason
):
    node = start_node()
    series = with_new_uids(demo_study["Demo chest CT, nodules"][:2], tmp_path / "series")
    if reason == "decode_failed":
        for path in series:
            _break_pixel_data(path)
    else:
        monkeypatch.setattr(Preparer, "images", _dying_worker)
    assert storescu(node.port, *series, options=("-xv",)).returncode == 0
    [job] = wait_for(lambda: [j for j in node.journal.jobs() if j.status == "failed"], what="the failed job")
    assert job.error.startswith(f"{reason}: ") and "\n" not in job.error
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []
