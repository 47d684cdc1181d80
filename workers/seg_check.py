"""The last check before a SEG leaves: is every frame where its source slice is?

A misplaced overlay is worse than none: a radiologist sees an organ outline on the
wrong slice, or shifted. So before writing each SEG the worker checks the dataset it is
about to write, frame by frame, that its plane position and orientation are those of a
source instance,
that the frame names that same instance as its source, and that it shares the source's
frame of reference, pixel spacing and matrix size. A failure fails the job with the
reason; nothing is sent.

The functional groups are read from the very bytes that will be written: a SEG from
``workers.seg_frames`` holds them pre-encoded, and decoding 800 frames' nested items
with pydicom would take as long as building the SEG, so a small reader here walks the
encoded items (Explicit VR Little Endian, defined lengths: what pacsnode writes).
"""

from __future__ import annotations

import struct

import numpy as np
from pydicom import Dataset
from pydicom.dataelem import RawDataElement

from workers.dicom_encoding import LONG_LENGTH_VRS, dataset_encodings, encode_items
from workers.series import LoadedSeries

__all__ = ["POSITION_TOLERANCE_MM", "SegPlacementError", "check_seg_placement"]

#: Largest distance (mm) between a frame's position and its source slice's position.
POSITION_TOLERANCE_MM = 0.01
_COSINE_TOLERANCE = 1e-4

_SHARED = 0x52009229
_PER_FRAME = 0x52009230
_PLANE_POSITION = 0x00209113
_PLANE_ORIENTATION = 0x00209116
_PIXEL_MEASURES = 0x00289110
_DERIVATION_IMAGE = 0x00089124
_SOURCE_IMAGE = 0x00082112
_REFERENCED_SOP_INSTANCE = 0x00081155
_IMAGE_POSITION = 0x00200032
_IMAGE_ORIENTATION = 0x00200037
_PIXEL_SPACING = 0x00280030

_ITEM = (0xFFFE, 0xE000)
_UNDEFINED = 0xFFFFFFFF

#: An encoded item: its elements by tag, a value's bytes or a sequence's items.
Item = dict[int, "bytes | list[Item]"]


class SegPlacementError(Exception):
    """The SEG would not overlay its source correctly; the message says where."""


def _items(buffer: memoryview) -> list[Item]:
    """The items of an encoded sequence value (Explicit VR Little Endian)."""
    items, position = [], 0
    while position < len(buffer):
        group, element, length = struct.unpack_from("<HHI", buffer, position)
        if (group, element) != _ITEM or length == _UNDEFINED or position + 8 + length > len(buffer):
            raise SegPlacementError(
                f"unexpected ({group:04X},{element:04X}) of length {length} in a sequence"
            )
        items.append(_elements(buffer[position + 8 : position + 8 + length]))
        position += 8 + length
    return items


def _elements(buffer: memoryview) -> Item:
    item: Item = {}
    position = 0
    while position < len(buffer):
        group, element = struct.unpack_from("<HH", buffer, position)
        vr = bytes(buffer[position + 4 : position + 6])
        if vr in LONG_LENGTH_VRS:
            (length,) = struct.unpack_from("<I", buffer, position + 8)
            position += 12
        else:
            (length,) = struct.unpack_from("<H", buffer, position + 6)
            position += 8
        if length == _UNDEFINED or position + length > len(buffer):
            raise SegPlacementError(f"({group:04X},{element:04X}) has a length of {length}")
        value = buffer[position : position + length]
        item[group << 16 | element] = _items(value) if vr == b"SQ" else bytes(value)
        position += length
    return item


def _encoded_items(ds: Dataset, tag: int) -> list[Item]:
    """The items of sequence ``tag`` of ``ds`` as they will be written: its raw bytes
    when it holds them, else encoded now."""
    elem = ds.get_item(tag)
    if isinstance(elem, RawDataElement) and not elem.is_implicit_VR and elem.is_little_endian:
        encoded = elem.value or b""
    else:
        encoded = encode_items(ds[tag].value, dataset_encodings(ds), {})
    try:
        return _items(memoryview(encoded))
    except struct.error as exc:  # lengths pointing past the end
        raise SegPlacementError(
            f"({tag >> 16:04X},{tag & 0xFFFF:04X}) is malformed: {exc}"
        ) from exc


def _numbers(value: object) -> np.ndarray:
    """A decimal string's values (bytes as encoded, or pydicom's values)."""
    if isinstance(value, bytes):
        value = value.decode("ascii").strip(" \0").split("\\")
    return np.asarray([float(v) for v in value], dtype=np.float64)  # type: ignore[attr-defined]


def _uid(value: object) -> str:
    return value.decode("ascii").rstrip("\0 ") if isinstance(value, bytes) else str(value)


def _leaf(item: Item, tag: int, frame: int) -> bytes:
    value = item.get(tag)
    if not isinstance(value, bytes) or not value:
        raise SegPlacementError(f"frame {frame} lacks ({tag >> 16:04X},{tag & 0xFFFF:04X})")
    return value


def _functional_item(frame: Item, shared: Item, sequence: int) -> Item | None:
    for groups in (frame, shared):
        items = groups.get(sequence)
        if isinstance(items, list) and items:
            return items[0]
    return None


def check_seg_placement(seg: Dataset, series: LoadedSeries) -> None:
    """Check the SEG ``seg`` against ``series``.

    Raises
    ------
    SegPlacementError
        If the frame of reference, matrix size, pixel spacing or orientation differ from
        the source, or a frame's position is not that of the source instance it names.
    """
    source = series.datasets[0]
    if seg.get("FrameOfReferenceUID") != source.get("FrameOfReferenceUID"):
        raise SegPlacementError(
            f"FrameOfReferenceUID {seg.get('FrameOfReferenceUID')} is not the source's "
            f"{source.get('FrameOfReferenceUID')}"
        )
    if (seg.Rows, seg.Columns) != (source.Rows, source.Columns):
        raise SegPlacementError(
            f"frames are {seg.Rows}x{seg.Columns}, the source {source.Rows}x{source.Columns}"
        )
    by_uid = {str(ds.SOPInstanceUID): ds for ds in series.datasets}
    shared = _encoded_items(seg, _SHARED)[0]
    frames = _encoded_items(seg, _PER_FRAME)
    if len(frames) != int(seg.NumberOfFrames):
        raise SegPlacementError(
            f"{len(frames)} per-frame groups for NumberOfFrames {seg.NumberOfFrames}"
        )
    for number, frame in enumerate(frames, start=1):
        position = _functional_item(frame, shared, _PLANE_POSITION)
        orientation = _functional_item(frame, shared, _PLANE_ORIENTATION)
        measures = _functional_item(frame, shared, _PIXEL_MEASURES)
        derivation = _functional_item(frame, shared, _DERIVATION_IMAGE)
        if position is None or orientation is None or measures is None or derivation is None:
            raise SegPlacementError(f"frame {number} lacks its plane position or source image")
        sources = derivation.get(_SOURCE_IMAGE)
        referenced = [
            _uid(item.get(_REFERENCED_SOP_INSTANCE))
            for item in sources or []
            if isinstance(item, dict)
        ]
        if len(referenced) != 1 or referenced[0] not in by_uid:
            raise SegPlacementError(
                f"frame {number} names source {referenced}, not one instance of the series"
            )
        origin = by_uid[referenced[0]]
        at = _numbers(_leaf(position, _IMAGE_POSITION, number))
        offset = at - _numbers(origin.ImagePositionPatient)
        if float(np.linalg.norm(offset)) > POSITION_TOLERANCE_MM:
            raise SegPlacementError(
                f"frame {number} is at {at.tolist()}, "
                f"{float(np.linalg.norm(offset)):.3f} mm from its source slice "
                f"{referenced[0]} at {list(origin.ImagePositionPatient)}"
            )
        cosines = _numbers(_leaf(orientation, _IMAGE_ORIENTATION, number))
        if np.max(np.abs(cosines - _numbers(origin.ImageOrientationPatient))) > _COSINE_TOLERANCE:
            raise SegPlacementError(
                f"frame {number} has orientation {cosines.tolist()}, its source "
                f"{list(origin.ImageOrientationPatient)}"
            )
        spacing = _numbers(_leaf(measures, _PIXEL_SPACING, number))
        if np.max(np.abs(spacing - _numbers(origin.PixelSpacing))) > 1e-4:
            raise SegPlacementError(
                f"frame {number} has pixel spacing {spacing.tolist()}, its source "
                f"{list(origin.PixelSpacing)}"
            )
