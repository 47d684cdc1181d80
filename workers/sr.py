"""Per-segment measurements -> TID 1500 Measurement Report (Comprehensive 3D SR).

For every segment of the SEG built by :func:`workers.seg.build_seg` the report holds one
TID 1411 Volumetric ROI group that references the segment and carries its volume (mL)
and mean intensity (HU for CT, unitless otherwise). The same numbers are returned as
plain :class:`SegmentMeasurement` records so the worker can report them without parsing
DICOM.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from models.base import SegmentationModel
from workers.seg import (
    MANUFACTURER,
    SegmentInfo,
    pacsnode_version,
    present_labels,
    to_pydicom_code,
)
from workers.series import LoadedSeries
from workers.uids import ResultUids, derive_uid

__all__ = [
    "MEAN_CONCEPT",
    "MEAN_CT_CONCEPT",
    "SR_SERIES_NUMBER",
    "VOLUME_CONCEPT",
    "VOLUME_UNIT",
    "SegmentMeasurement",
    "build_sr",
    "measure_segments",
]

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 902

VOLUME_CONCEPT = codes.SCT.Volume  # SCT 118565006
VOLUME_UNIT = PydicomCode("mL", "UCUM", "milliliter")
MEAN_CT_CONCEPT = codes.DCM.AttenuationCoefficient  # DCM 112031, unit [hnsf'U]
MEAN_CONCEPT = codes.SCT.Mean  # SCT 373098007, for modalities without a standard unit
_IMAGING_PROCEDURE = codes.SCT.ImagingProcedure  # SCT 363679005
_SLAB_SLICES = 16


@dataclass(frozen=True)
class SegmentMeasurement:
    """The numbers the SR reports for one segment.

    ``mean`` is the mean rescaled voxel value inside the segment (HU for CT).
    """

    label_value: int
    name: str
    segment_number: int
    voxel_count: int
    volume_ml: float
    mean: float

    def as_dict(self) -> dict[str, int | float | str]:
        """The fields as a JSON-serialisable dict (for the Celery result)."""
        return dataclasses.asdict(self)


def measure_segments(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    segments: Sequence[SegmentInfo],
) -> list[SegmentMeasurement]:
    """Voxel count, volume and mean value of every segment, in one pass over the volume.

    Parameters
    ----------
    series
        The source series; its voxels give the means, its spacing the volumes.
    label_map
        The label map the segments were built from (shape of ``series.volume.voxels``).
    segments
        The segments as returned by :func:`workers.seg.build_seg`.

    Returns
    -------
    list[SegmentMeasurement]
        One record per segment, in the order of ``segments``.

    Raises
    ------
    ValueError
        If ``label_map`` does not have the volume's shape, or a segment's label does not
        occur in it.
    """
    voxels = series.volume.voxels
    if label_map.shape != voxels.shape:
        raise ValueError(
            f"label_map must have the volume's shape {voxels.shape}. Found {label_map.shape}."
        )
    size = int(label_map.max(initial=0)) + 1
    counts = np.zeros(size, dtype=np.int64)
    sums = np.zeros(size, dtype=np.float64)
    # In slabs, so the float64 weights bincount needs stay small for large volumes.
    for start in range(0, voxels.shape[0], _SLAB_SLICES):
        labels = label_map[start : start + _SLAB_SLICES].ravel()
        counts += np.bincount(labels, minlength=size)
        sums += np.bincount(
            labels, weights=voxels[start : start + _SLAB_SLICES].ravel(), minlength=size
        )
    voxel_ml = series.volume.voxel_volume_ml
    result = []
    for info in segments:
        value = info.label_value
        count = int(counts[value]) if value < size else 0
        if count == 0:
            raise ValueError(
                f"segment {info.segment_number} ({info.name!r}) has label value {value}, "
                "which does not occur in label_map."
            )
        result.append(
            SegmentMeasurement(
                label_value=value,
                name=info.name,
                segment_number=info.segment_number,
                voxel_count=count,
                volume_ml=count * voxel_ml,
                mean=float(sums[value]) / count,
            )
        )
    return result


def _mean_measurement(
    modality: str, mean: float, algorithm: hd.sr.AlgorithmIdentification
) -> hd.sr.Measurement:
    if modality.upper() == "CT":
        return hd.sr.Measurement(
            name=MEAN_CT_CONCEPT,
            value=mean,
            unit=codes.UCUM.HounsfieldUnit,
            derivation=codes.SCT.Mean,
            algorithm_id=algorithm,
        )
    return hd.sr.Measurement(
        name=MEAN_CONCEPT,
        value=mean,
        unit=codes.UCUM.NoUnits,
        algorithm_id=algorithm,
    )


def build_sr(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    model: SegmentationModel,
    seg: hd.seg.Segmentation,
    segments: Sequence[SegmentInfo],
    uids: ResultUids,
    *,
    series_number: int = SR_SERIES_NUMBER,
    device_serial_number: str = "1",
) -> tuple[hd.sr.Comprehensive3DSR, list[SegmentMeasurement]]:
    """Build the TID 1500 Measurement Report for the segments of ``seg``.

    Parameters
    ----------
    series
        The source series (patient and study identity, voxels, spacing).
    label_map
        The label map ``seg`` was built from.
    model
        The model that produced ``label_map``; it is the observer device and the
        algorithm of every measurement.
    seg
        The SEG built by :func:`workers.seg.build_seg`; every group references it.
    segments
        The segments returned with ``seg``.
    uids
        The job's result UIDs (SR series and instance UIDs).
    series_number
        SeriesNumber of the SR series.
    device_serial_number
        DeviceSerialNumber written in the equipment module.

    Returns
    -------
    tuple[highdicom.sr.Comprehensive3DSR, list[SegmentMeasurement]]
        The SR and the numbers it reports, one record per segment.

    Raises
    ------
    ValueError
        If there are no segments, the segments do not match the labels present in
        ``label_map``, or ``label_map`` does not match the series.
    """
    if not segments:
        raise ValueError("segments is empty; there is nothing to measure.")
    present = [spec.value for spec in present_labels(label_map, model)]
    listed = [info.label_value for info in segments]
    if sorted(listed) != present:
        raise ValueError(
            f"segments cover labels {listed} but label_map holds labels {present}; pass "
            "the segments build_seg returned for this label map."
        )
    measurements = measure_segments(series, label_map, segments)
    algorithm = hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.version,
        family=to_pydicom_code(model.algorithm_family),
        manufacturer=MANUFACTURER,
    )
    source_series = hd.sr.SourceSeriesForSegmentation(series.datasets[0].SeriesInstanceUID)
    modality = series.volume.modality or str(series.datasets[0].get("Modality", ""))

    groups = []
    for info, numbers in zip(segments, measurements, strict=True):
        groups.append(
            hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=info.tracking_uid, identifier=info.name
                ),
                referenced_segment=hd.sr.ReferencedSegment(
                    sop_class_uid=seg.SOPClassUID,
                    sop_instance_uid=seg.SOPInstanceUID,
                    segment_number=info.segment_number,
                    source_series=source_series,
                ),
                finding_type=to_pydicom_code(info.label.property_type),
                finding_category=to_pydicom_code(info.label.category),
                algorithm_id=algorithm,
                measurements=[
                    hd.sr.Measurement(
                        name=VOLUME_CONCEPT,
                        value=numbers.volume_ml,
                        unit=VOLUME_UNIT,
                        algorithm_id=algorithm,
                    ),
                    _mean_measurement(modality, numbers.mean, algorithm),
                ],
            )
        )

    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("pacsnode-device", model.name, model.version),
            name=model.name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.version}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*series.datasets, seg],
        content=report,
        series_instance_uid=uids.sr_series_instance_uid,
        series_number=series_number,
        sop_instance_uid=uids.sr_sop_instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=f"{MANUFACTURER} {model.name} SR"[:64],
        manufacturer_model_name=MANUFACTURER,
        software_versions=pacsnode_version(),
        device_serial_number=device_serial_number,
    )
    logger.info(
        "built SR with %d measurement groups for model %s %s",
        len(groups),
        model.name,
        model.version,
        extra={"sop_instance_uid": str(uids.sr_sop_instance_uid)},
    )
    return sr, measurements
