"""Label map -> DICOM Segmentation (BINARY or LABELMAP) referencing the source series.

One segment per label present in the label map, numbered 1, 2, ... in label-value order
(when the model found nothing: one empty segment per label the model declares, so an
empty result is still a valid SEG). The segment descriptions come from the model's
:class:`models.base.LabelSpec`s, the UIDs from :class:`workers.uids.ResultUids`, so
re-running a job rebuilds the same object.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Literal

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.sr.coding import Code as PydicomCode
from pydicom.uid import ExplicitVRLittleEndian

from models.base import Code, LabelSpec, SegmentationModel
from workers.dicom_encoding import keep_source_charset, mark_encoded
from workers.label_passes import label_counts
from workers.outputs import DEFAULT_SEG, SegVariant
from workers.seg_frames import build_segmentation, segment_numbers
from workers.series import LoadedSeries
from workers.storage import write_dataset_atomic
from workers.uids import ResultUids

__all__ = [
    "MANUFACTURER",
    "SEG_SERIES_NUMBER",
    "SegmentInfo",
    "algorithm_identification",
    "build_seg",
    "pacsnode_version",
    "plan_segments",
    "present_labels",
    "to_pydicom_code",
    "write_seg",
]

logger = logging.getLogger(__name__)

MANUFACTURER = "pacsnode"
SEG_SERIES_NUMBER = 901

_CS_FORBIDDEN = re.compile(r"[^A-Z0-9_ ]")


@dataclass(frozen=True)
class SegmentInfo:
    """How one label of the label map became one segment of the SEG."""

    segment_number: int
    label: LabelSpec
    tracking_uid: str

    @property
    def label_value(self) -> int:
        """The value of this label in the label map."""
        return self.label.value

    @property
    def name(self) -> str:
        """The segment label (the LabelSpec name)."""
        return self.label.name


def pacsnode_version() -> str:
    """The installed pacsnode version, written as SoftwareVersions of every result."""
    try:
        return version("pacsnode")
    except PackageNotFoundError:
        return "0+unknown"


def to_pydicom_code(code: Code) -> PydicomCode:
    """The pydicom :class:`~pydicom.sr.coding.Code` for a model :class:`~models.base.Code`."""
    return PydicomCode(code.value, code.scheme_designator, code.meaning)


def algorithm_identification(model: SegmentationModel) -> hd.AlgorithmIdentificationSequence:
    """The Segment Algorithm Identification for ``model`` (family, name, version)."""
    return hd.AlgorithmIdentificationSequence(
        name=model.name,
        family=to_pydicom_code(model.algorithm_family),
        version=model.algorithm_version(),
        source=MANUFACTURER,
    )


def present_labels(label_map: npt.NDArray[np.integer], model: SegmentationModel) -> list[LabelSpec]:
    """The model's labels that occur in ``label_map``, in label-value order.

    ``label_map`` must hold non-negative integers.

    Raises
    ------
    ValueError
        If the label map holds a value that is not one of the model's labels.
    """
    # Undeclared values show up as voxels that no declared label counts.
    declared = sorted(model.labels, key=lambda spec: spec.value)
    by_value = label_counts(label_map, [spec.value for spec in declared])
    counts = [by_value[spec.value] for spec in declared]
    if sum(counts) != int(np.count_nonzero(label_map)):
        known = np.asarray([spec.value for spec in declared])
        unknown = sorted(int(v) for v in np.unique(label_map) if v != 0 and v not in known)
        raise ValueError(
            f"label map of model {model.name!r} holds values {unknown} that the model does "
            f"not declare; declared labels are {known.tolist()}."
        )
    return [spec for spec, count in zip(declared, counts, strict=True) if count]


def plan_segments(
    label_map: npt.NDArray[np.integer], model: SegmentationModel, uids: ResultUids
) -> list[SegmentInfo]:
    """The segments of a SEG of ``label_map``: one per label present, numbered 1, 2, ...
    in label-value order; every declared label when none is present (an empty result).

    Raises
    ------
    ValueError
        If the label map holds a value that is not one of the model's labels.
    """
    specs = present_labels(label_map, model) or sorted(model.labels, key=lambda spec: spec.value)
    return [
        SegmentInfo(
            segment_number=number,
            label=spec,
            tracking_uid=uids.derive("segment", str(spec.value)),
        )
        for number, spec in enumerate(specs, start=1)
    ]


def _content_label(model: SegmentationModel) -> str:
    """A valid CS (at most 16 of A-Z, 0-9, _ and space) naming the model."""
    label = _CS_FORBIDDEN.sub("_", model.name.upper())[:16].strip()
    return label or "PACSNODE"


def _check_inputs(series: LoadedSeries, label_map: npt.NDArray[np.integer]) -> None:
    if not isinstance(label_map, np.ndarray):
        raise TypeError(f"label_map must be a numpy array. Found {type(label_map).__name__}.")
    if label_map.dtype.kind not in "ui":
        raise TypeError(f"label_map must hold integers. Found dtype {label_map.dtype}.")
    expected = series.volume.voxels.shape
    if label_map.shape != expected:
        raise ValueError(
            f"label_map must have the volume's shape {expected}. Found {label_map.shape}."
        )
    if len(series.datasets) != expected[0]:
        raise ValueError(
            f"series has {len(series.datasets)} source instances for {expected[0]} slices; "
            "they must match one to one."
        )
    if label_map.dtype.kind == "i" and label_map.size and int(label_map.min()) < 0:
        raise ValueError("label_map must not hold negative values.")


def _derive_dimension_organization_uid(seg: Dataset, uids: ResultUids, variant: SegVariant) -> None:
    """Replace highdicom's random DimensionOrganizationUID by one derived from the job.

    highdicom draws a fresh UID per build; a re-run must write the same object, so every
    occurrence (the organization item and each dimension index) gets the derived UID.
    """
    derived = uids.derive(
        "dimension-organization", *([] if variant == DEFAULT_SEG else [variant.name])
    )
    for item in seg.get("DimensionOrganizationSequence", []):
        item.DimensionOrganizationUID = derived
    for item in seg.get("DimensionIndexSequence", []):
        if "DimensionOrganizationUID" in item:
            item.DimensionOrganizationUID = derived


def _drop_background_segment(seg: Dataset) -> None:
    """Remove the "Background" item (segment number 0) highdicom puts first in a
    LABELMAP SEG's SegmentSequence.

    Pixel Padding Value 0 already says that 0 is background (PS3.3 C.8.20.2, label-map
    segmentations), so the item is optional; with it, cornerstone3D up to at least 5.6.8
    (OHIF 3.13) lists segments by their position in the sequence, and every segment is
    shown under its predecessor's name and colour (tests/viewer).
    """
    items = list(seg.SegmentSequence)
    if items and int(items[0].SegmentNumber) == 0 and seg.get("PixelPaddingValue") == 0:
        seg.SegmentSequence = items[1:]


def write_seg(seg: Dataset, path: Path) -> Path:
    """Write a SEG made by :func:`build_seg` to ``path`` atomically, its pre-encoded
    sequences as they are; the dataset cannot be changed afterwards."""
    if seg.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian:
        mark_encoded(seg)
    return write_dataset_atomic(seg, path)


def build_seg(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    model: SegmentationModel,
    uids: ResultUids,
    *,
    seg_type: Literal["binary", "labelmap"] = "binary",
    omit_empty_frames: bool = True,
    series_number: int = SEG_SERIES_NUMBER,
    series_description: str | None = None,
    segments: list[SegmentInfo] | None = None,
    device_serial_number: str = "1",
    with_highdicom: bool = False,
) -> tuple[Dataset, list[SegmentInfo]]:
    """Build a Segmentation of ``label_map`` on ``series``.

    Parameters
    ----------
    series
        The source series; ``series.datasets[k]`` is slice ``k`` of the label map.
    label_map
        Integer array with the shape of ``series.volume.voxels``; 0 is background, other
        values are the model's label values.
    model
        The model that produced ``label_map``; it names and codes the segments.
    uids
        The job's result UIDs (SEG series and instance UIDs, segment tracking UIDs).
    seg_type
        ``binary`` (one frame per segment and slice) or ``labelmap`` (one frame per
        slice holding segment numbers; DICOM's label-map segmentation).
    omit_empty_frames
        Leave out frames in which the segment (or, for a label map, every segment) is
        absent. Every frame is kept when the whole label map is empty.
    series_number
        SeriesNumber of the SEG series.
    series_description
        SeriesDescription; "pacsnode <model> SEG" when None.
    segments
        :func:`plan_segments` of this label map, when the caller has it already (it
        costs a pass over the label map per label).
    device_serial_number
        DeviceSerialNumber written in the equipment module (e.g. the node's name).
    with_highdicom
        Build it with ``highdicom.seg.Segmentation`` itself, the slower reference that
        :func:`workers.seg_frames.build_segmentation` equals byte for byte (tests,
        benchmarks).

    Returns
    -------
    tuple[pydicom.Dataset, list[SegmentInfo]]
        The SEG (write it with :func:`write_seg`) and, per segment in segment-number
        order, which label it holds.

    Raises
    ------
    TypeError
        If ``label_map`` is not an integer numpy array.
    ValueError
        If ``label_map`` does not match the series or holds values the model does not
        declare.
    """
    _check_inputs(series, label_map)
    if segments is None:
        segments = plan_segments(label_map, model, uids)
    algorithm = algorithm_identification(model)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=info.segment_number,
            segment_label=info.label.name,
            segmented_property_category=to_pydicom_code(info.label.category),
            segmented_property_type=to_pydicom_code(info.label.property_type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=info.tracking_uid,
            tracking_id=info.label.name,
            display_color=hd.color.CIELabColor.from_rgb(*info.label.color_rgb),
        )
        for info in segments
    ]

    # Label values -> consecutive segment numbers: pacsnode's writer maps them frame by
    # frame; highdicom is given a label-map-sized copy holding segment numbers.
    values = [info.label_value for info in segments]
    if with_highdicom:
        build: Callable[..., Dataset] = functools.partial(
            hd.seg.Segmentation, pixel_array=segment_numbers(label_map, values)
        )
    else:
        build = functools.partial(build_segmentation, pixel_array=label_map, segment_values=values)

    variant = SegVariant(seg_type=seg_type, omit_empty_frames=omit_empty_frames)
    seg = build(
        source_images=list(series.datasets),
        segmentation_type=(
            hd.seg.SegmentationTypeValues.BINARY
            if seg_type == "binary"
            else hd.seg.SegmentationTypeValues.LABELMAP
        ),
        segment_descriptions=descriptions,
        series_instance_uid=uids.seg_series_instance_uid,
        series_number=series_number,
        sop_instance_uid=(
            uids.seg_sop_instance_uid
            if variant == DEFAULT_SEG
            else uids.derive("seg-instance", variant.name)
        ),
        instance_number=variant.instance_number,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions=pacsnode_version(),
        device_serial_number=device_serial_number,
        content_description=f"{model.name} {model.algorithm_version()}"[:64],
        content_label=_content_label(model),
        series_description=(series_description or f"{MANUFACTURER} {model.name} SEG")[:64],
        omit_empty_frames=omit_empty_frames,
        specific_character_set=None,  # set by keep_source_charset
    )
    if with_highdicom:  # build_segmentation sets it on its template
        keep_source_charset(seg, series.datasets[0])
    _derive_dimension_organization_uid(seg, uids, variant)
    if seg_type == "labelmap":
        _drop_background_segment(seg)
    logger.info(
        "built %s SEG with %d segments, %d frames for model %s %s",
        variant.name,
        len(segments),
        int(seg.NumberOfFrames),
        model.name,
        model.version,
        extra={"sop_instance_uid": str(seg.SOPInstanceUID)},
    )
    return seg, segments
