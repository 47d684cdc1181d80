"""A DICOM Segmentation of a whole series, byte for byte highdicom's, in a fraction of
its time.

highdicom's ``Segmentation`` spends most of its time on what grows with the series:
it checks every source image against the IOD tables, builds a pydicom dataset of a
dozen nested elements for every frame (800 for a 300-slice CT with five organs), and
pydicom then encodes each of them element by element. Here highdicom builds the SEG of
the first source slice alone, which holds every module that does not depend on the
other slices (patient, study, equipment, segments, shared functional groups) and one
per-frame item per segment, the template; this module then writes the parts that grow
with the series:

- the per-frame functional groups, as pre-encoded bytes: per source slice its
  derivation item (the template's, naming that slice) and its plane position
  (highdicom's own ``PlanePositionSequence``), per segment the template's other
  elements, per frame its dimension index values;
- the pixel data: each frame packed straight from the label map (one bit per pixel for
  BINARY, the segment numbers for LABELMAP);
- the source references (SourceImageSequence, ReferencedSeriesSequence), also
  pre-encoded, and what highdicom derives from every slice's position: the spacing
  between slices and the 3D dimension organization.

Frames are ordered as highdicom orders them (segment, then slice along the normal),
empty ones left out the same way, and the checks highdicom makes on the whole series
that still matter (one series, one orientation, no two slices at one position) are
made here too. ``tests/unit/test_seg_frames.py`` proves the bytes equal to highdicom's
own SEG for every geometry, encoding and omit-empty setting in the suite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
from highdicom.spatial import VOLUME_INDEX_CONVENTION, get_normal_vector, get_volume_positions
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.uid import ExplicitVRLittleEndian
from pydicom.valuerep import format_number_as_ds

from workers.dicom_encoding import (
    ElementCache,
    dataset_encodings,
    encode_element,
    encode_item,
    encode_items,
    encode_sequence,
    encode_ui,
    encode_ul,
    keep_source_charset,
    raw_sequence,
)

__all__ = ["build_segmentation", "segment_numbers"]

_DERIVATION_IMAGE = 0x00089124
_FRAME_CONTENT = 0x00209111
_PLANE_POSITION = 0x00209113
_PER_FRAME = 0x52009230
_SOURCE_IMAGES = 0x00082112
_REFERENCED_SERIES = 0x00081115
_REFERENCED_INSTANCES = 0x0008114A
_REFERENCED_SOP_CLASS = 0x00081150
_REFERENCED_SOP_INSTANCE = 0x00081155
_DIMENSION_INDEX_VALUES = 0x00209157


def build_segmentation(
    source_images: Sequence[Dataset],
    pixel_array: npt.NDArray[np.integer],
    *,
    segmentation_type: hd.seg.SegmentationTypeValues,
    omit_empty_frames: bool,
    segment_values: Sequence[int] | None = None,
    **kwargs: Any,
) -> Dataset:
    """What ``highdicom.seg.Segmentation(source_images, pixel_array, ...)`` builds and
    writes, as a plain pydicom Dataset whose large sequences are already encoded (write
    it after :func:`workers.dicom_encoding.mark_encoded`, as ``workers.seg.write_seg``
    does).

    Parameters
    ----------
    source_images
        Single-frame images of one series, ``source_images[k]`` under plane ``k``.
    pixel_array
        Segment numbers (0: background), uint8 or uint16, shape (planes, rows,
        columns); every value a described segment. With ``segment_values``, any
        non-negative integers instead.
    segmentation_type
        BINARY or LABELMAP.
    omit_empty_frames
        As highdicom's: leave out frames without a pixel of their segment (all frames
        are kept when the whole array is empty).
    segment_values
        The value in ``pixel_array`` of segment 1, 2, ... (a model's label values, which
        need not be consecutive; 0 is background, and no other value may occur): the
        SEG is the one of ``pixel_array`` mapped to segment numbers, without making
        that map-sized copy. None: ``pixel_array`` holds segment numbers.
    **kwargs
        highdicom's other arguments (segment descriptions, UIDs, equipment, ...); the
        transfer syntax is Explicit VR Little Endian.

    Raises
    ------
    ValueError
        As highdicom: sources of more than one series or size, more than one
        orientation, two slices at one position; or planes that do not match sources.
    """
    if len(source_images) != pixel_array.shape[0]:
        raise ValueError(
            f"{pixel_array.shape[0]} planes for {len(source_images)} source images; "
            "they must match one to one."
        )
    if kwargs.get("transfer_syntax_uid", ExplicitVRLittleEndian) != ExplicitVRLittleEndian:
        raise ValueError("SEG frames are encoded here in Explicit VR Little Endian only")
    _check_one_series(source_images)
    pixel_array = np.ascontiguousarray(pixel_array)  # frames are written from its memory
    numbering = _Numbering(pixel_array, segment_values)
    template = hd.seg.Segmentation(
        source_images=source_images[:1],
        pixel_array=numbering.segment_numbers(pixel_array[:1]),
        segmentation_type=segmentation_type,
        omit_empty_frames=False,
        **kwargs,
    )
    seg = Dataset(dict(template.items()))  # no highdicom frame tables to go stale
    seg.file_meta = template.file_meta
    keep_source_charset(seg, source_images[0])  # what highdicom does, for every charset
    templates = list(template.PerFrameFunctionalGroupsSequence)  # one per segment

    positions = [
        hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, image.ImagePositionPatient)
        for image in source_images
    ]
    position_values = np.array([p[0].ImagePositionPatient for p in positions], dtype=np.float64)
    orientation = seg.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0]
    normal = get_normal_vector(
        orientation.ImageOrientationPatient, index_convention=VOLUME_INDEX_CONVENTION
    )
    distances = (normal[None] @ position_values.T).squeeze(0)  # as highdicom sorts
    _, sort_index = np.unique(distances, return_index=True)
    if len(sort_index) != len(source_images):
        raise ValueError("Plane positions must not contain duplicates.")

    binary = segmentation_type == hd.seg.SegmentationTypeValues.BINARY
    non_empty = np.fromiter((plane.any() for plane in pixel_array), bool, len(pixel_array))
    omit = omit_empty_frames and bool(non_empty.any())
    included = np.flatnonzero(non_empty) if omit else np.arange(len(source_images))
    planes = [int(k) for k in sort_index if not omit or non_empty[k]]

    if "SpacingBetweenSlices" not in source_images[0]:
        # highdicom derives it from the positions; the template's is one slice's, 1.0.
        pixel_measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
        spacing, _ = get_volume_positions(
            image_positions=position_values.tolist(),
            image_orientation=orientation.ImageOrientationPatient,
        )
        if spacing is None:  # not a regular stack
            pixel_measures.pop("SpacingBetweenSlices", None)
        else:
            pixel_measures.SpacingBetweenSlices = format_number_as_ds(spacing)
    if len(included) > 1 and len(templates) == 1:  # one channel: LABELMAP, one segment
        spacing, _ = get_volume_positions(
            image_positions=position_values[included].tolist(),
            image_orientation=orientation.ImageOrientationPatient,
            sort=False,
        )
        if spacing is not None and spacing > 0.0:
            seg.DimensionOrganizationType = "3D"

    encodings = dataset_encodings(seg)
    cache: ElementCache = {}
    frame_items, frames = _frames(
        pixel_array, numbering, source_images, positions, templates, planes, binary, omit,
        encodings, cache,
    )  # fmt: skip
    seg[_PER_FRAME] = raw_sequence(_PER_FRAME, b"".join(frame_items))
    seg.NumberOfFrames = len(frame_items)
    dtype = np.uint8 if int(seg.BitsAllocated) <= 8 else np.uint16
    pixel_data = _pack(frames, dtype, binary)
    # An odd length is padded as highdicom pads it (with b"0", not a NUL).
    seg.PixelData = pixel_data + b"0" if len(pixel_data) % 2 else pixel_data
    _reference_sources(seg, source_images, encodings, cache)
    return seg


def _check_one_series(source_images: Sequence[Dataset]) -> None:
    """highdicom's checks over all source images: one study, series, frame of reference
    and matrix size; one orientation."""
    first = source_images[0]
    key = (first.StudyInstanceUID, first.SeriesInstanceUID, first.Rows, first.Columns)
    orientation = first.ImageOrientationPatient
    frame_of_reference = first.get("FrameOfReferenceUID")
    for image in source_images:
        if (image.StudyInstanceUID, image.SeriesInstanceUID, image.Rows, image.Columns) != key or (
            image.get("FrameOfReferenceUID") != frame_of_reference
        ):
            raise ValueError(
                "Source images must all be part of the same series and must have the same "
                "image dimensions (number of rows/columns)."
            )
        if image.ImageOrientationPatient != orientation:
            raise ValueError("Source images must have a shared orientation.")


def segment_numbers(
    pixel_array: npt.NDArray[np.integer], segment_values: Sequence[int]
) -> npt.NDArray[np.integer]:
    """``pixel_array`` with segment numbers 1, 2, ... in place of ``segment_values``, as
    uint8 below 256 segments (what highdicom takes); ``pixel_array`` itself where it
    holds them already."""
    return _Numbering(pixel_array, segment_values).segment_numbers(pixel_array)


class _Numbering:
    """Which value of the label map stands for which segment number."""

    def __init__(
        self, pixel_array: npt.NDArray[np.integer], segment_values: Sequence[int] | None
    ) -> None:
        self.values = None if segment_values is None else list(segment_values)
        self._lut: npt.NDArray[np.integer] | None = None
        if self.values is None:
            return
        count = len(self.values)
        dtype = np.uint8 if count < 256 else np.uint16  # what highdicom is given
        if self.values != list(range(1, count + 1)) or pixel_array.dtype != dtype:
            if min(self.values, default=1) <= 0:
                raise ValueError(f"segment values must be positive, got {self.values}")
            self._lut = np.zeros(max(self.values, default=0) + 1, dtype=dtype)
            self._lut[self.values] = np.arange(1, count + 1)

    def value_of(self, segment: int) -> int:
        """The label map's value of segment number ``segment``."""
        return segment if self.values is None else self.values[segment - 1]

    def segment_numbers(self, planes: npt.NDArray[np.integer]) -> npt.NDArray[np.integer]:
        """``planes`` with segment numbers in place of the label map's values."""
        return planes if self._lut is None else self._lut[planes]


def _frames(
    pixel_array: npt.NDArray[np.integer],
    numbering: _Numbering,
    source_images: Sequence[Dataset],
    positions: Sequence[hd.PlanePositionSequence],
    templates: list[Dataset],
    planes: list[int],
    binary: bool,
    omit: bool,
    encodings: list[str],
    cache: ElementCache,
) -> tuple[list[bytes], list[npt.NDArray[Any]]]:
    """The encoded per-frame items and the frames, segment by segment (the template
    order), each segment's planes in ``planes`` order: each item is its segment's
    template with the plane's derivation and position and the frame's index values.
    BINARY frames are packed already when a frame fills whole bytes (see :func:`_pack`).
    """
    packed = _whole_bytes(pixel_array)
    per_plane: dict[int, dict[int, bytes]] = {}

    def plane_parts(k: int) -> dict[int, bytes]:
        parts = per_plane.get(k)
        if parts is None:
            parts = per_plane[k] = {
                _DERIVATION_IMAGE: encode_element(
                    templates[0][_DERIVATION_IMAGE], encodings, cache, _naming(source_images[k])
                ),
                _PLANE_POSITION: encode_element(
                    DataElement(_PLANE_POSITION, "SQ", positions[k]), encodings, cache
                ),
            }
        return parts

    items: list[bytes] = []
    frames: list[npt.NDArray[Any]] = []
    for channel, template in enumerate(templates):
        segment = channel + 1
        # The template's elements, encoded once where they do not vary from frame to frame.
        fixed = {
            elem.tag: encode_element(elem, encodings, cache)
            for elem in template
            if elem.tag not in (_DERIVATION_IMAGE, _FRAME_CONTENT, _PLANE_POSITION)
        }
        content = template[_FRAME_CONTENT].value[0]
        content_fixed = {
            elem.tag: encode_element(elem, encodings, cache)
            for elem in content
            if elem.tag != _DIMENSION_INDEX_VALUES
        }
        index_values = content.DimensionIndexValues
        leading = list(index_values)[:-1] if isinstance(index_values, MultiValue) else []
        for dimension_index, k in enumerate(planes, start=1):
            frame = pixel_array[k]
            if binary:
                frame = frame == numbering.value_of(segment)
                if packed:  # whole bytes: pack now, and look for a set bit in 1/8 of it
                    frame = np.packbits(frame, bitorder="little")
                if omit and not frame.any():
                    continue
            else:
                frame = numbering.segment_numbers(frame)
            frames.append(frame)
            index = encode_ul(_DIMENSION_INDEX_VALUES, [*leading, dimension_index])
            frame_content = encode_sequence(
                _FRAME_CONTENT,
                encode_item(_in_order({**content_fixed, _DIMENSION_INDEX_VALUES: index})),
            )
            parts = {**fixed, **plane_parts(k), _FRAME_CONTENT: frame_content}
            items.append(encode_item(_in_order(parts)))
    return items, frames


def _in_order(elements: dict[int, bytes]) -> bytes:
    """Encoded elements joined in tag order, as a dataset holds them."""
    return b"".join(elements[tag] for tag in sorted(elements))


def _naming(image: Dataset) -> dict[int, bytes]:
    """Encoded Referenced SOP Class and Instance UIDs naming ``image``."""
    return {
        _REFERENCED_SOP_CLASS: encode_ui(_REFERENCED_SOP_CLASS, image.SOPClassUID),
        _REFERENCED_SOP_INSTANCE: encode_ui(_REFERENCED_SOP_INSTANCE, image.SOPInstanceUID),
    }


def _whole_bytes(pixel_array: npt.NDArray[Any]) -> bool:
    """Whether a frame of ``pixel_array`` packs into whole bytes at one bit a pixel."""
    return int(pixel_array.shape[1]) * int(pixel_array.shape[2]) % 8 == 0


def _pack(frames: list[npt.NDArray[Any]], dtype: type, binary: bool) -> bytes:
    """The pixel data as highdicom encodes frames natively: BINARY as one bit stream (a
    frame starts mid-byte when its pixels do not fill whole bytes; otherwise the frames
    come packed), LABELMAP as ``dtype``."""
    if not frames:
        return b""
    if not binary:
        return b"".join(frame.astype(dtype, copy=False).data for frame in frames)
    if frames[0].dtype == np.uint8:  # packed by _frames
        return b"".join(frame.data for frame in frames)
    return np.packbits(np.stack(frames).ravel(), bitorder="little").tobytes()


def _reference_sources(
    seg: Dataset, source_images: Sequence[Dataset], encodings: list[str], cache: ElementCache
) -> None:
    """SourceImageSequence and ReferencedSeriesSequence (common instance reference)
    naming every source image, in the template's item layout, pre-encoded."""
    references = b"".join(
        encode_items([seg.SourceImageSequence[0]], encodings, cache, _naming(image))
        for image in source_images
    )
    series = encode_items(
        seg.ReferencedSeriesSequence,
        encodings,
        cache,
        {_REFERENCED_INSTANCES: encode_sequence(_REFERENCED_INSTANCES, references)},
    )
    seg[_SOURCE_IMAGES] = raw_sequence(_SOURCE_IMAGES, references)
    seg[_REFERENCED_SERIES] = raw_sequence(_REFERENCED_SERIES, series)
