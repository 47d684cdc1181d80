"""Pre-encoding of large, repetitive sequences, byte for byte what pydicom writes.

A SEG of a 300-slice CT has hundreds of per-frame functional group items, each a dozen
nested elements, most of them identical from frame to frame (codes, SOP class UIDs);
pydicom builds and encodes every element anew, after walking them all once more to
resolve ambiguous VRs, and spends about 0.3 s on writing alone. Here each distinct
element is encoded once by pydicom itself (:func:`encode_element`) and reused, only the
item headers (tag, length) are packed directly, and the sequence becomes a raw element
holding those bytes (:func:`raw_sequence`), which pydicom writes as it is once
:func:`mark_encoded` has resolved the ambiguous VRs everywhere else and marked the
dataset as already in its target encoding (so pydicom does not decode the raw bytes
again to check them). Explicit VR Little Endian with defined lengths only.
``tests/unit/test_seg_frames.py`` compares the bytes with pydicom's own.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping, Sequence

from pydicom import Dataset
from pydicom.charset import convert_encodings
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import (
    correct_ambiguous_vr,
    correct_ambiguous_vr_element,
    write_data_element,
)
from pydicom.tag import BaseTag

__all__ = [
    "LONG_LENGTH_VRS",
    "ElementCache",
    "dataset_encodings",
    "encode_element",
    "encode_item",
    "encode_items",
    "encode_sequence",
    "encode_ui",
    "encode_ul",
    "mark_encoded",
    "raw_sequence",
]

_ITEM = struct.pack("<HH", 0xFFFE, 0xE000)

#: Explicit VRs whose length takes 4 bytes after two reserved ones (PS3.5 7.1.2).
LONG_LENGTH_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())

#: Encoded leaf elements by (tag, VR, repr(value)).
ElementCache = dict[tuple[object, ...], bytes]


def encode_item(content: bytes) -> bytes:
    """A sequence item of defined length holding the encoded elements ``content``."""
    return _ITEM + struct.pack("<I", len(content)) + content


def encode_element(
    elem: DataElement,
    encodings: list[str],
    cache: ElementCache,
    replace: Mapping[int, bytes] | None = None,
) -> bytes:
    """``elem`` as pydicom writes it in Explicit VR Little Endian, sequences with
    defined lengths; leaf elements met before come from ``cache``, and an element
    (at any depth) whose tag is in ``replace`` is the encoded element given there.

    Raises
    ------
    ValueError
        If a sequence or one of its items has an undefined length.
    """
    if replace and elem.tag in replace:
        return replace[elem.tag]
    if elem.VR == "SQ":
        if elem.is_undefined_length:
            raise ValueError(f"{elem.tag}: undefined lengths are not pre-encoded")
        return encode_sequence(elem.tag, encode_items(elem.value, encodings, cache, replace))
    key = (elem.tag, elem.VR, repr(elem.value))
    encoded = cache.get(key)
    if encoded is None:
        buffer = DicomBytesIO()
        buffer.is_little_endian, buffer.is_implicit_VR = True, False
        write_data_element(buffer, elem, encodings)
        encoded = cache[key] = buffer.getvalue()
    return encoded


def encode_items(
    items: Iterable[Dataset],
    encodings: list[str],
    cache: ElementCache,
    replace: Mapping[int, bytes] | None = None,
) -> bytes:
    """The items of a sequence, encoded as by :func:`encode_element`."""
    encoded = []
    for item in items:
        if getattr(item, "is_undefined_length_sequence_item", False):
            raise ValueError("sequence items of undefined length are not pre-encoded")
        encoded.append(
            encode_item(b"".join(encode_element(e, encodings, cache, replace) for e in item))
        )
    return b"".join(encoded)


def encode_ui(tag: int, uid: str) -> bytes:
    """A UI element, as pydicom writes it (padded with a NUL to an even length)."""
    value = uid.encode("ascii")
    if len(value) % 2:
        value += b"\0"
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, b"UI", len(value)) + value


def encode_ul(tag: int, values: Sequence[int]) -> bytes:
    """A UL element of ``values``."""
    return struct.pack(
        f"<HH2sH{len(values)}I", tag >> 16, tag & 0xFFFF, b"UL", 4 * len(values), *values
    )


def encode_sequence(tag: int, encoded_items: bytes) -> bytes:
    """A sequence element of defined length holding ``encoded_items``."""
    return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, b"SQ", 0, len(encoded_items)) + (
        encoded_items
    )


def raw_sequence(tag: int | BaseTag, encoded_items: bytes) -> RawDataElement:
    """A sequence element holding already encoded items, for pydicom to write as it is
    (see :func:`mark_encoded`)."""
    return RawDataElement(BaseTag(tag), "SQ", len(encoded_items), encoded_items, 0, False, True)


def dataset_encodings(ds: Dataset) -> list[str]:
    """The Python codecs of ``ds``'s SpecificCharacterSet."""
    return convert_encodings(ds.get("SpecificCharacterSet") or "ISO_IR 6")


def keep_source_charset(obj: Dataset, source: Dataset) -> None:
    """Give a result object its source's Specific Character Set, in which the patient
    and study attributes copied from the source are then written, byte for byte as the
    source had them (the text pacsnode adds itself is ASCII, valid in every one).

    highdicom is given ``specific_character_set=None`` and this sets it afterwards:
    highdicom 0.28 refuses valid values such as ``['', 'ISO 2022 IR 87']`` (Japanese,
    the default repertoire first) and has no ISO 2022 IR 149 (Korean).
    """
    charset = source.get("SpecificCharacterSet")
    if charset:
        obj.SpecificCharacterSet = charset
    elif "SpecificCharacterSet" in obj:
        del obj.SpecificCharacterSet


def mark_encoded(ds: Dataset) -> None:
    """Let pydicom write ``ds``'s raw Explicit VR Little Endian elements (sequences
    made by :func:`raw_sequence`) as they are: decode every other raw element (one
    copied from an implicit VR source carries no VR), resolve the ambiguous VRs and
    record ``ds`` as already in Explicit VR Little Endian. Call it last: pydicom then
    writes ``ds`` without resolving anything changed later.

    Raises
    ------
    ValueError
        If ``ds`` is to be written in another transfer syntax.
    """
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if syntax is None or syntax.is_implicit_VR or not syntax.is_little_endian:
        raise ValueError("sequences are pre-encoded only for explicit VR little endian")
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and not raw.is_implicit_VR and raw.is_little_endian:
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value:
                correct_ambiguous_vr(item, True, [item, ds])
        elif " or " in elem.VR:
            correct_ambiguous_vr_element(elem, ds, True)
    ds.set_original_encoding(False, True, ds._character_set)
