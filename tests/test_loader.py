"""Pixel loading decodes every compressed transfer syntax the node accepts, with real files."""

import numpy as np
import pydicom
import pytest

from plugin.loader import modality_frames
from tests.conftest import DEID_HUMANS, PYDICOM_DATA, PYDICOM_FILES

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
