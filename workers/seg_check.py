"""The last check before a SEG leaves: is every frame where its source slice is?

A misplaced overlay is worse than none: a radiologist sees an organ outline on the
wrong slice, or shifted. So before writing each SEG the worker checks the dataset it is
about to write (its encoding is pydicom's own, or proven byte for byte equal to it),
frame by frame, that its plane position and orientation are those of a source instance,
that the frame names that same instance as its source, and that it shares the source's
frame of reference, pixel spacing and matrix size. A failure fails the job with the
reason; nothing is sent.
"""

from __future__ import annotations

import numpy as np
from pydicom import Dataset

from workers.series import LoadedSeries

__all__ = ["POSITION_TOLERANCE_MM", "SegPlacementError", "check_seg_placement"]

#: Largest distance (mm) between a frame's position and its source slice's position.
POSITION_TOLERANCE_MM = 0.01
_COSINE_TOLERANCE = 1e-4


class SegPlacementError(Exception):
    """The SEG would not overlay its source correctly; the message says where."""


def _floats(values: object) -> np.ndarray:
    return np.asarray([float(v) for v in values], dtype=np.float64)  # type: ignore[attr-defined]


def _functional_item(frame: Dataset, shared: Dataset, sequence: str) -> Dataset | None:
    for groups in (frame, shared):
        if sequence in groups and len(groups[sequence].value):
            item: Dataset = groups[sequence][0]
            return item
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
    shared = seg.SharedFunctionalGroupsSequence[0]
    frames = seg.PerFrameFunctionalGroupsSequence
    if len(frames) != int(seg.NumberOfFrames):
        raise SegPlacementError(
            f"{len(frames)} per-frame groups for NumberOfFrames {seg.NumberOfFrames}"
        )
    for number, frame in enumerate(frames, start=1):
        position = _functional_item(frame, shared, "PlanePositionSequence")
        orientation = _functional_item(frame, shared, "PlaneOrientationSequence")
        measures = _functional_item(frame, shared, "PixelMeasuresSequence")
        derivation = _functional_item(frame, shared, "DerivationImageSequence")
        if position is None or orientation is None or measures is None or derivation is None:
            raise SegPlacementError(f"frame {number} lacks its plane position or source image")
        referenced = [
            str(item.ReferencedSOPInstanceUID) for item in derivation.get("SourceImageSequence", [])
        ]
        if len(referenced) != 1 or referenced[0] not in by_uid:
            raise SegPlacementError(
                f"frame {number} names source {referenced}, not one instance of the series"
            )
        origin = by_uid[referenced[0]]
        offset = _floats(position.ImagePositionPatient) - _floats(origin.ImagePositionPatient)
        if float(np.linalg.norm(offset)) > POSITION_TOLERANCE_MM:
            raise SegPlacementError(
                f"frame {number} is at {list(position.ImagePositionPatient)}, "
                f"{float(np.linalg.norm(offset)):.3f} mm from its source slice "
                f"{referenced[0]} at {list(origin.ImagePositionPatient)}"
            )
        cosines = _floats(orientation.ImageOrientationPatient)
        if np.max(np.abs(cosines - _floats(origin.ImageOrientationPatient))) > _COSINE_TOLERANCE:
            raise SegPlacementError(
                f"frame {number} has orientation {cosines.tolist()}, its source "
                f"{list(origin.ImageOrientationPatient)}"
            )
        spacing = _floats(measures.PixelSpacing)
        if np.max(np.abs(spacing - _floats(origin.PixelSpacing))) > 1e-4:
            raise SegPlacementError(
                f"frame {number} has pixel spacing {spacing.tolist()}, its source "
                f"{list(origin.PixelSpacing)}"
            )
