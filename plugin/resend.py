"""A SOP Instance UID received again: the same instance, or a conflict?

PACS re-send over whatever presentation context they negotiate, so the same instance
may come back in another transfer syntax (implicit VR, big endian, RLE, JPEG-LS...). It
is the same instance when its decoded data set is equal: every attribute's value, and
the pixel values once decoded. Only how it was encoded may differ. This runs only for a
UID already in the journal, never for a first receipt, so it costs nothing on the hot path.
"""

import struct
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from pydicom import Dataset
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.tag import BaseTag

from plugin.attributes import PIXEL_TAGS

# How the pixels are encoded (PIXEL_TAGS), not what they are: compared decoded instead.
NOT_COMPARED = {
    *PIXEL_TAGS,
    0x0028_0006,  # Planar Configuration: native colour layout; compressed data decodes to one layout
    0xFFFC_FFFC,  # Data Set Trailing Padding
}


def _data_set_bytes(part10: bytes) -> bytes:
    """The data set of a Part 10 file: what follows the preamble and the File Meta
    Information, whose first element (Group Length, UL) says how long it is (PS3.10 7.1)."""
    (length,) = struct.unpack_from("<I", part10, 140)
    return part10[144 + length :]


def _compared_tags(ds: Dataset) -> set[BaseTag]:
    """Every tag but group lengths and :data:`NOT_COMPARED`."""
    return {tag for tag in ds.keys() if tag.element != 0 and tag not in NOT_COMPARED}  # noqa: SIM118 (iterating yields elements)


def _as_vr(element: DataElement, vr: str) -> DataElement:
    """An element read as UN (implicit VR, unknown private tag) decoded as ``vr``."""
    raw = RawDataElement(element.tag, vr, len(element.value), element.value, 0, True, True)
    return convert_raw_data_element(raw)


def _same_elements(a: Dataset, b: Dataset) -> bool:
    tags = _compared_tags(a)
    if tags != _compared_tags(b):
        return False
    for tag in tags:
        x, y = a[tag], b[tag]
        if x.VR != y.VR and "UN" in (x.VR, y.VR):
            x, y = (_as_vr(x, y.VR), y) if x.VR == "UN" else (x, _as_vr(y, x.VR))
        if x.VR == "SQ" and y.VR == "SQ":
            if len(x.value) != len(y.value) or not all(map(_same_elements, x.value, y.value)):
                return False
        elif x.value != y.value:
            return False
    return True


def _same_pixels(a: Dataset, b: Dataset) -> bool:
    if not any(t in a for t in PIXEL_TAGS):
        return not any(t in b for t in PIXEL_TAGS)
    return np.array_equal(a.pixel_array, b.pixel_array)


def same_instance(stored: Path, received: bytes) -> bool:
    """Whether ``received`` (a Part 10 file as the node would store it) holds the same
    instance as the ``stored`` file: the same data set bytes, or, encoded differently,
    equal attribute values and equal decoded pixels. Raises if either cannot be decoded
    (then sameness cannot be shown)."""
    original = stored.read_bytes()
    if _data_set_bytes(original) == _data_set_bytes(received):
        return True  # the same bytes again (from any calling AE): nothing to decode
    a, b = pydicom.dcmread(BytesIO(original)), pydicom.dcmread(BytesIO(received))
    return _same_elements(a, b) and _same_pixels(a, b)
