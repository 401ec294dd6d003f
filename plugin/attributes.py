"""What the receipt reads once of an instance's header and journals (invariant 7).

The C-STORE handler parses the header up to Pixel Data for its checks. From that parse
it keeps the attributes that sorting, preprocessing and the results need
(:data:`JOURNALED`), as the file encodes them, and where the Pixel Data's value starts in
the spool file. The runner builds each image's header from the journal and reads its
pixels at that offset, instead of parsing every file twice (headers to sort, then whole to
decode): a native grey image's as the journaled values say (:class:`NativeGrey`), others
with pydicom's decoder. A series' first image, whose header the results copy the patient
and study from, is still read from its file, once per job.

Values are read from pydicom's raw elements, before pydicom converts them (converting
the twenty of them cost more than the whole parse), and rebuilt as raw elements: the
header the runner gets reads exactly as the file's would.
"""

import json
import struct
from dataclasses import dataclass

from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID

PIXEL_DATA = 0x7FE0_0010
# Pixel Data, Float Pixel Data, Double Float Pixel Data: where ``stop_before_pixels`` stops.
PIXEL_TAGS = {PIXEL_DATA, 0x7FE0_0008, 0x7FE0_0009}
# Explicit VRs these may be written with; each has a 4-byte length (PS3.5 7.1.2).
PIXEL_VRS = {b"OB", b"OW", b"OF", b"OD", b"UN"}

# Keyword -> VR. US values are kept as integers, the others as their text.
JOURNALED = {
    "SOPClassUID": "UI",
    "SOPInstanceUID": "UI",
    "StudyInstanceUID": "UI",
    "SeriesInstanceUID": "UI",
    "FrameOfReferenceUID": "UI",
    "InstanceNumber": "IS",
    "ImagePositionPatient": "DS",
    "ImageOrientationPatient": "DS",
    "PixelSpacing": "DS",
    "SliceThickness": "DS",
    "Rows": "US",
    "Columns": "US",
    "NumberOfFrames": "IS",
    "SamplesPerPixel": "US",
    "PhotometricInterpretation": "CS",
    "PlanarConfiguration": "US",
    "BitsAllocated": "US",
    "BitsStored": "US",
    "HighBit": "US",
    "PixelRepresentation": "US",
    "RescaleSlope": "DS",
    "RescaleIntercept": "DS",
}
_TAGS = {keyword: Tag(keyword) for keyword in JOURNALED}
# A header with these needs what is not journaled (lookup tables): the runner reads its file.
NOT_JOURNALED_WITH = ("ModalityLUTSequence",)


@dataclass(frozen=True)
class PixelDataElement:
    """A top-level pixel data element: its tag, where its value starts in the file (None:
    not known), and its length (encapsulated: its items' without the Sequence Delimiter)."""

    tag: int
    offset: int | None
    length: int


def pixel_data_element(data: bytes, position: int, transfer_syntax: UID) -> PixelDataElement | None:
    """The pixel data element whose tag starts at ``position`` of ``data`` (where pydicom's
    ``stop_before_pixels`` stopped); None if what starts there is not one. Raises
    ValueError for encapsulated pixel data that ends before its Sequence Delimiter."""
    order = "<" if transfer_syntax.is_little_endian else ">"
    if len(data) < position + 12:
        return None
    group, element = struct.unpack_from(order + "HH", data, position)
    tag = group << 16 | element
    if tag not in PIXEL_TAGS:
        return None
    if transfer_syntax.is_implicit_VR:
        header = 8
    elif data[position + 4 : position + 6] in PIXEL_VRS:
        header = 12
    else:
        return None
    (length,) = struct.unpack_from(order + "I", data, position + header - 4)
    if length == 0xFFFF_FFFF:
        length = _fragments_length(data, position + header)
    return PixelDataElement(tag, position + header, length)


def _fragments_length(data: bytes, start: int) -> int:
    """How many bytes of encapsulated pixel data's items precede its Sequence Delimiter
    (PS3.5 A.4): walked item by item, nothing copied. Raises ValueError if they run past
    the end or something else stands among them."""
    position = start
    while position + 8 <= len(data):
        group, element, length = struct.unpack_from("<HHI", data, position)
        if (group, element) == (0xFFFE, 0xE0DD):
            return position - start
        if (group, element) != (0xFFFE, 0xE000) or length == 0xFFFF_FFFF:
            break
        position += 8 + length
    raise ValueError("the encapsulated Pixel Data is truncated or malformed: no Sequence Delimiter after its items")


def _value(dataset: Dataset, keyword: str, vr: str) -> str | int | None:
    """One journaled value; None when absent, empty or not of its VR (what the runner
    would then find: the attribute missing)."""
    raw = dataset.get_item(_TAGS[keyword])
    if raw is None:
        return None
    if isinstance(raw, RawDataElement) and raw.VR in (None, vr):
        value = raw.value
        if vr != "US":
            text = value.decode("latin-1").strip(" \0") if value else ""
            return text or None
        if value is None or len(value) != 2:
            return None
        return int(struct.unpack("<H" if raw.is_little_endian else ">H", value)[0])
    try:  # converted already, or written with another VR (UN): pydicom's reading of it
        converted = dataset[_TAGS[keyword]].value
    except Exception:
        return None
    if vr == "US":
        return converted if isinstance(converted, int) else None
    if converted is None:
        return None
    text = "\\".join(map(str, converted)) if isinstance(converted, MultiValue | list) else str(converted)
    return text or None


def header_values(dataset: Dataset) -> dict[str, str | int]:
    """The :data:`JOURNALED` attributes that ``dataset`` holds."""
    values = {keyword: _value(dataset, keyword, vr) for keyword, vr in JOURNALED.items()}
    return {keyword: value for keyword, value in values.items() if value is not None}


@dataclass(frozen=True)
class NativeGrey:
    """How a native little-endian grey image's pixels lie: they are its Pixel Data value as
    it is (PS3.5 8.1.1), so the runner reads them as an array, without pydicom. From the
    journaled values: converting them to a header's attributes cost more than the read."""

    dtype: str  # numpy's, for BitsAllocated and PixelRepresentation
    shape: tuple[int, int, int]  # NumberOfFrames, Rows, Columns
    rescale: tuple[float, float] | None  # RescaleSlope and RescaleIntercept, when both are there


def native_grey(values: dict[str, str | int], transfer_syntax: UID) -> NativeGrey | None:
    """``values``' :class:`NativeGrey`; None for what needs pydicom's decoder (encapsulated,
    bit-packed or colour pixels) and for a value that does not read as a number, which
    pydicom's reading then judges."""
    bits, rows, columns = values.get("BitsAllocated"), values.get("Rows"), values.get("Columns")
    if transfer_syntax.is_encapsulated or values.get("SamplesPerPixel", 1) != 1 or bits not in (8, 16, 32):
        return None
    if not isinstance(rows, int) or not isinstance(columns, int) or not isinstance(bits, int):
        return None
    try:
        frames = int(values.get("NumberOfFrames", 1)) or 1
        rescale = None
        if "RescaleSlope" in values and "RescaleIntercept" in values:
            rescale = float(values["RescaleSlope"]), float(values["RescaleIntercept"])
    except ValueError:
        return None
    signed = values.get("PixelRepresentation") == 1
    return NativeGrey(f"<{'i' if signed else 'u'}{bits // 8}", (frames, rows, columns), rescale)


@dataclass(frozen=True)
class PixelData:
    """Where an image's Pixel Data value lies in its file, the transfer syntax it is
    encoded in and, for a native grey image, how its pixels lie."""

    offset: int
    length: int
    transfer_syntax: str
    native: NativeGrey | None = None

    def read(self, path: str) -> bytes:
        with open(path, "rb") as file:
            file.seek(self.offset)
            return file.read(self.length)


def journal_entry(
    values: dict[str, str | int], dataset: Dataset, pixels: PixelDataElement | None, transfer_syntax: UID
) -> str | None:
    """What the journal keeps of an instance (JSON); None where the runner must read its
    file instead (lookup tables, which are not journaled, or a palette)."""
    if any(keyword in dataset for keyword in NOT_JOURNALED_WITH) or values.get("PhotometricInterpretation") == (
        "PALETTE COLOR"
    ):
        return None
    location = None
    # Big endian (retired) is decoded from the file: pydicom swaps by the element's VR.
    if (
        pixels is not None
        and pixels.tag == PIXEL_DATA
        and pixels.offset is not None
        and transfer_syntax.is_little_endian
    ):
        location = {"offset": pixels.offset, "length": pixels.length, "transfer_syntax": str(transfer_syntax)}
    return json.dumps({"attributes": values, "pixel_data": location})


@dataclass(frozen=True)
class JournaledHeader:
    """An instance's header as the journal holds it, where its pixels are, and the
    journaled values themselves (what :func:`header_values` reads of a header)."""

    header: Dataset
    pixel_data: PixelData | None
    values: dict[str, str | int]


def read_journal_entry(entry: str) -> JournaledHeader:
    """The header :func:`journal_entry` kept, as raw elements that pydicom converts when
    read, like a file's."""
    stored = json.loads(entry)
    elements: dict[BaseTag, DataElement | RawDataElement] = {}
    for keyword, value in stored["attributes"].items():
        tag, vr = _TAGS[keyword], JOURNALED[keyword]
        raw = struct.pack("<H", value) if vr == "US" else str(value).encode("latin-1")
        if len(raw) % 2:
            raw += b"\0" if vr == "UI" else b" "
        elements[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    values, location = stored["attributes"], stored["pixel_data"]
    if location is None:
        return JournaledHeader(Dataset(elements), None, values)
    native = native_grey(values, UID(location["transfer_syntax"]))
    return JournaledHeader(Dataset(elements), PixelData(**location, native=native), values)
