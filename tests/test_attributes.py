"""Parse once (invariant 7): what the receipt journals of a header is what the runner reads
back, and the pixels it decodes at the journaled offset are the file's, for every real
file the node accepts."""

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag
from pydicom.uid import UID

from plugin.attributes import JOURNALED, header_values, journal_entry, read_journal_entry
from plugin.journal import InstanceRecord
from plugin.loader import Source, decoded_frames, modality_frames, read_images
from plugin.node import Refusal, _parse, check_pixel_module
from tests.conftest import DEID_HUMANS, PYDICOM_DATA, PYDICOM_FILES, results, storescu, wait_for

FILES = sorted(
    p for p in [*PYDICOM_FILES.rglob("*.dcm"), *PYDICOM_DATA.rglob("*.dcm"), *DEID_HUMANS.rglob("*")] if p.is_file()
)


@pytest.fixture(autouse=True)
def as_the_node_reads(monkeypatch):
    """The node judges values itself (plugin/app.py): pydicom reads them without checks."""
    monkeypatch.setattr(pydicom.config.settings, "reading_validation_mode", pydicom.config.IGNORE)


def _data_set_start(path: Path) -> int:
    """Where the data set starts in the file ``path``: after its preamble and File Meta
    Information, as the node's own file starts it after those it wrote."""
    with path.open("rb") as f:
        pydicom.filereader.read_preamble(f, force=True)
        pydicom.filereader._read_file_meta_info(f)
        return f.tell()


def _received(path: Path) -> tuple[pydicom.Dataset, str | None] | None:
    """The whole file as pydicom reads it, and the node's journal entry for it; None if
    pydicom cannot decode its pixels or the node refuses it."""
    try:
        whole = pydicom.dcmread(path)
        whole.pixel_array  # noqa: B018 (what the comparison needs)
    except Exception:
        return None
    syntax = UID(whole.file_meta.TransferSyntaxUID)
    data = path.read_bytes()
    try:
        header, pixels = _parse(data, _data_set_start(path), syntax)
        values = header_values(header)
        check_pixel_module(values, pixels, syntax.is_encapsulated, 2**31)
    except Refusal:
        return None
    return whole, journal_entry(values, header, pixels, syntax)


def test_journaled_headers_and_pixels_are_the_files_own(tmp_path):
    located = 0
    for path in FILES:
        received = _received(path)
        if received is None or received[1] is None:
            continue
        whole, entry = received
        journaled = read_journal_entry(entry)
        for keyword in JOURNALED:
            assert str(journaled.header.get(keyword)) == str(whole.get(keyword) if keyword in whole else None), (
                path.name,
                keyword,
            )
        if journaled.pixel_data is None:
            continue
        # Everything before the Pixel Data value blanked: only that value may be read.
        data = bytearray(path.read_bytes())
        data[: journaled.pixel_data.offset] = bytes(journaled.pixel_data.offset)
        blanked = tmp_path / path.name
        blanked.write_bytes(data)
        frames = decoded_frames(Source(journaled.header, str(blanked), journaled.pixel_data))
        np.testing.assert_array_equal(frames, modality_frames(whole), err_msg=path.name)
        located += 1
    assert located >= 90  # native and compressed, little endian: most of the corpus


@pytest.mark.parametrize(("bits", "signed", "shape"), [(8, 1, (1, 3, 3)), (8, 0, (3, 3, 5)), (32, 1, (2, 2, 3))])
def test_native_pixels_read_as_they_lie_are_pydicoms(tmp_path, bits, signed, shape):
    """The kinds of native pixels the corpus lacks: signed 8 and 32 bits, and an odd
    length with its pad byte (9 and 45 bytes), decoded at the journaled offset without
    pydicom's decoder, against pydicom's own array."""
    frames, rows, columns = shape
    pixels = (
        np.random.default_rng(bits)
        .integers(-100 if signed else 0, 100, shape)
        .astype(f"{'i' if signed else 'u'}{bits // 8}")
    )
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = pydicom.uid.SecondaryCaptureImageStorage, pydicom.uid.generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = rows, columns, frames, 1
    ds.PhotometricInterpretation, ds.PixelRepresentation = "MONOCHROME2", signed
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.RescaleSlope, ds.RescaleIntercept = 2, -3
    ds.PixelData = pixels.tobytes() + b"\0" * (pixels.nbytes % 2)
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    path = tmp_path / "native.dcm"
    ds.save_as(path, enforce_file_format=True)
    whole, entry = _received(path)
    journaled = read_journal_entry(entry)
    assert journaled.pixel_data is not None
    frames_read = decoded_frames(Source(journaled.header, str(path), journaled.pixel_data))
    np.testing.assert_array_equal(frames_read, modality_frames(whole))
    np.testing.assert_array_equal(frames_read, pixels.astype(np.float32) * 2 - 3)


def test_a_pixel_module_refusal_names_the_attribute():
    """pydicom's badVR.dcm has NumberOfFrames '1A': the refusal says which attribute and
    what it holds (it used to give Python's int() error), and a missing one by its name."""
    data = (PYDICOM_FILES / "badVR.dcm").read_bytes()
    syntax = UID(pydicom.dcmread(PYDICOM_FILES / "badVR.dcm", stop_before_pixels=True).file_meta.TransferSyntaxUID)
    header, pixels = _parse(data, _data_set_start(PYDICOM_FILES / "badVR.dcm"), syntax)
    values = header_values(header)
    with pytest.raises(Refusal, match=r"^NumberOfFrames '1A' is not an integer$"):
        check_pixel_module(values, pixels, syntax.is_encapsulated, 2**31)
    del values["Columns"]
    with pytest.raises(Refusal, match=r"^incomplete image pixel module: no Columns$"):
        check_pixel_module(values, pixels, syntax.is_encapsulated, 2**31)


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_jpeg_ls_lossless.dcm", "emri_small_RLE.dcm"])
def test_a_row_without_journaled_attributes_reads_its_file(name):
    path = PYDICOM_FILES / name if (PYDICOM_FILES / name).exists() else PYDICOM_DATA / name
    whole, entry = _received(path)
    record = InstanceRecord("1.2.3", str(whole.SOPClassUID), "1.2", "1.2.3", str(path), 0, "CT1", 0.0)
    [journaled] = read_images([InstanceRecord(**{**record.__dict__, "attributes": entry})])
    [from_file] = read_images([record])
    assert from_file.pixel_data is None and journaled.pixel_data is not None
    np.testing.assert_array_equal(decoded_frames(journaled), decoded_frames(from_file))


def test_the_node_journals_where_each_instances_pixels_lie(start_node, demo_study):
    node = start_node()
    paths = demo_study["Demo chest CT, nodules"]
    assert storescu(node.port, *paths).returncode == 0
    rows = node.journal.received_instances()
    assert len(rows) == len(paths)
    for row in rows:
        journaled = read_journal_entry(row.attributes)
        stored = pydicom.dcmread(row.path)
        assert journaled.pixel_data.read(row.path) == stored.PixelData
        assert journaled.header.ImagePositionPatient == stored.ImagePositionPatient
    wait_for(lambda: results(node.results_dir), what="the series' SR")


def _slice(path: Path, uid: str, number: str, position: list[float] | None, orientation: list[float]) -> Path:
    """A small CT image of pydicom's, made one slice of a series with these values."""
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.SOPInstanceUID, ds.ImageOrientationPatient = uid, orientation
    del ds.ImagePositionPatient
    if position is not None:
        ds.ImagePositionPatient = position
    # as written, even where it is no number (pydicom would refuse to set it)
    raw = (number + " " * (len(number) % 2)).encode()
    ds[0x0020_0013] = RawDataElement(Tag(0x0020_0013), "IS", len(raw), raw, 0, False, True)
    ds.save_as(path)
    return path


def test_images_are_ordered_along_the_slice_normal_from_the_journal_as_from_their_files(tmp_path):
    """An oblique series shuffled: read back in order along its normal (not by z, nor by
    InstanceNumber), from the journal as from the files. Where the geometry is missing
    InstanceNumber orders, one that is not a number counts as absent, and ties go by UID."""
    oblique = [0.8, 0.6, 0.0, 0.0, 0.0, 1.0]  # the normal is (0.6, -0.8, 0)
    normal = np.cross(oblique[:3], oblique[3:])
    rng = np.random.default_rng(0)
    made = []
    for i, step in enumerate(rng.permutation(6)):
        # z falls as the slices go along the normal, and InstanceNumber runs the other way
        position = list(normal * float(step) * 2.5 + [0.0, 0.0, -float(step)])
        made.append((step, _slice(tmp_path / f"a{i}.dcm", f"1.2.3.{i + 1}", str(9 - i), position, oblique)))
    unplaced = [
        _slice(tmp_path / "b0.dcm", "1.2.4.2", "2", None, oblique),
        _slice(tmp_path / "b1.dcm", "1.2.4.9", "1A", None, oblique),  # counts as absent: first
        _slice(tmp_path / "b2.dcm", "1.2.4.1", "2", None, oblique),  # ties with b0: by UID
    ]

    def records(paths: list[Path], journaled: bool) -> list[InstanceRecord]:
        rows = []
        for path in paths:
            whole, entry = _received(path)
            record = InstanceRecord("1.2.3", str(whole.SOPClassUID), "1.2", "1.2.3", str(path), 0, "CT1", 0.0)
            rows.append(dataclasses.replace(record, attributes=entry if journaled else None))
        return rows

    expected = [str(path) for _, path in sorted(made)]
    for journaled in (True, False):
        ordered = read_images(records([p for _, p in made], journaled))
        assert [s.path for s in ordered] == expected, journaled
        numbered = read_images(records(unplaced, journaled))
        assert [s.path for s in numbered] == [str(unplaced[i]) for i in (1, 2, 0)], journaled
        by_number = read_images(records([p for _, p in made], journaled), sort="instance_number")
        assert [s.path for s in by_number] == [str(made[i][1]) for i in reversed(range(6))], journaled
