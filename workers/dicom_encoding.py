"""Faster writing of a dataset with one large, repetitive sequence, byte for byte what
pydicom writes.

A SEG of a 300-slice CT has hundreds of per-frame functional group items, each a dozen
nested elements, most of them identical from frame to frame (codes, SOP class UIDs);
pydicom encodes every element anew, after walking them all once more to resolve
ambiguous VRs, and spends about 0.3 s. Here each distinct leaf element is encoded once
by pydicom itself and reused, and only the sequence and item headers (tag, length) are
packed directly; the sequence becomes a raw element holding those bytes, which pydicom
writes as they are. The ambiguous VRs are resolved beforehand everywhere else (pixel
data: OB or OW) and the dataset is marked as already in its target encoding, so pydicom
does not decode the raw bytes again to check them. ``tests/unit/test_results.py``
compares the bytes with pydicom's own.
"""

from __future__ import annotations

import struct

from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    correct_ambiguous_vr,
    correct_ambiguous_vr_element,
    write_data_element,
)

__all__ = ["prepare_fast_write"]

_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)


def _leaf(elem: DataElement, encodings: list[str], cache: dict[tuple[object, ...], bytes]) -> bytes:
    key = (elem.tag, elem.VR, repr(elem.value))
    encoded = cache.get(key)
    if encoded is None:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_data_element(buffer, elem, encodings)
        encoded = cache[key] = buffer.getvalue()
    return encoded


def _dataset(ds: Dataset, encodings: list[str], cache: dict[tuple[object, ...], bytes]) -> bytes:
    parts = []
    for elem in ds:
        if elem.VR == "SQ":
            items = _items(elem, encodings, cache)
            group, number = elem.tag >> 16, elem.tag & 0xFFFF
            parts.append(struct.pack("<HH2sHI", group, number, b"SQ", 0, len(items)) + items)
        else:
            parts.append(_leaf(elem, encodings, cache))
    return b"".join(parts)


def _items(
    elem: DataElement, encodings: list[str], cache: dict[tuple[object, ...], bytes]
) -> bytes:
    encoded = []
    for item in elem.value:
        if getattr(item, "is_undefined_length_sequence_item", False) or elem.is_undefined_length:
            raise ValueError(f"{elem.tag}: undefined lengths are not pre-encoded")
        content = _dataset(item, encodings, cache)
        encoded.append(_ITEM + struct.pack("<I", len(content)) + content)
    return b"".join(encoded)


def prepare_fast_write(ds: Dataset, keyword: str) -> None:
    """Make ``ds`` quick to write as Explicit VR Little Endian: sequence ``keyword``
    pre-encoded, ambiguous VRs resolved, the encoding recorded as already done.

    Raises
    ------
    ValueError
        If ``ds`` is to be written in another transfer syntax, or the sequence uses
        undefined lengths.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or syntax.is_implicit_VR or not syntax.is_little_endian:
        raise ValueError(f"{keyword} is pre-encoded only for explicit VR little endian")
    elem = ds[keyword]
    encodings = convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")
    value = _items(elem, encodings, {})
    for other in ds:
        if other.tag == elem.tag:
            continue
        if other.VR == "SQ":
            for item in other.value:
                correct_ambiguous_vr(item, True, [item, ds])
        elif " or " in other.VR:
            correct_ambiguous_vr_element(other, ds, True)
    ds[elem.tag] = RawDataElement(elem.tag, "SQ", len(value), value, 0, False, True)
    ds.set_original_encoding(False, True, ds._character_set)
