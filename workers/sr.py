"""Model results -> TID 1500 Measurement Report (Comprehensive 3D SR).

Segmentation (:func:`build_sr`): for every segment of the SEG built by
:func:`workers.seg.build_seg` the report holds one TID 1411 Volumetric ROI group that
references the segment and carries its volume (mL) and mean intensity (HU for CT,
unitless otherwise). The same numbers are returned as plain :class:`SegmentMeasurement`
records so the worker can report them without parsing DICOM.

Classification (:func:`build_classification_sr`): for every class, and for every image
when the model classifies images one by one, one TID 1501 measurement group whose
finding is the class's coded finding, holding its probability (DCM 122157, unit "1")
and a qualitative evaluation of that finding, Present or Absent by the model's
threshold, referencing the images it is about.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

from models.base import ClassificationModel, Model, SegmentationModel
from workers.dicom_encoding import keep_source_charset
from workers.label_passes import label_sums
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
    "PROBABILITY_CONCEPT",
    "SR_SERIES_NUMBER",
    "VOLUME_CONCEPT",
    "VOLUME_UNIT",
    "ClassFinding",
    "SegmentMeasurement",
    "build_classification_sr",
    "build_sr",
    "measure_segments",
]

logger = logging.getLogger(__name__)

SR_SERIES_NUMBER = 902

VOLUME_CONCEPT = codes.SCT.Volume  # SCT 118565006
VOLUME_UNIT = PydicomCode("mL", "UCUM", "milliliter")
MEAN_CT_CONCEPT = codes.DCM.AttenuationCoefficient  # DCM 112031, unit [hnsf'U]
MEAN_CONCEPT = codes.SCT.Mean  # SCT 373098007, for modalities without a standard unit
STD_CONCEPT = codes.SCT.StandardDeviation  # SCT 386136009
PROBABILITY_CONCEPT = codes.DCM.Probability  # DCM 122157
PRESENT = codes.SCT.Present  # SCT 52101004
ABSENT = codes.SCT.Absent  # SCT 272519000
_IMAGING_PROCEDURE = codes.SCT.ImagingProcedure  # SCT 363679005


@dataclass(frozen=True)
class SegmentMeasurement:
    """The numbers the SR reports for one segment.

    ``mean`` and ``std`` (population standard deviation) are of the rescaled voxel values
    inside the segment (HU for CT).
    """

    label_value: int
    name: str
    segment_number: int
    voxel_count: int
    volume_ml: float
    mean: float
    std: float

    def as_dict(self) -> dict[str, int | float | str]:
        """The fields as a JSON-serialisable dict (for the Celery result)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ClassFinding:
    """What the SR reports for one class of one classification (an image or a series).

    ``sop_instance_uids`` are the source instances the probability is about.
    """

    name: str
    probability: float
    present: bool
    sop_instance_uids: tuple[str, ...]

    def as_dict(self) -> dict[str, object]:
        """The fields as a JSON-serialisable dict (for the Celery result)."""
        return {**dataclasses.asdict(self), "sop_instance_uids": list(self.sop_instance_uids)}


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
    totals = label_sums(label_map, voxels, sorted({info.label_value for info in segments}))
    voxel_ml = series.volume.voxel_volume_ml
    result = []
    for info in segments:
        value = info.label_value
        count, total, squares = totals[value]
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
                mean=total / count,
                std=float(np.sqrt(max(0.0, squares / count - (total / count) ** 2))),
            )
        )
    return result


def _statistics(
    modality: str, numbers: SegmentMeasurement, algorithm: hd.sr.AlgorithmIdentification
) -> list[hd.sr.Measurement]:
    """Mean and standard deviation: for CT as attenuation coefficient (HU) with the
    statistic as derivation; otherwise named by the statistic, without unit."""
    measurements = []
    for statistic, value in ((codes.SCT.Mean, numbers.mean), (STD_CONCEPT, numbers.std)):
        if modality.upper() == "CT":
            measurement = hd.sr.Measurement(
                name=MEAN_CT_CONCEPT,
                value=value,
                unit=codes.UCUM.HounsfieldUnit,
                derivation=statistic,
                algorithm_id=algorithm,
            )
        else:
            measurement = hd.sr.Measurement(
                name=statistic, value=value, unit=codes.UCUM.NoUnits, algorithm_id=algorithm
            )
        measurements.append(measurement)
    return measurements


def _algorithm(model: Model) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=model.name,
        version=model.algorithm_version(),
        family=to_pydicom_code(model.algorithm_family),
        manufacturer=MANUFACTURER,
    )


def _report(
    model: Model,
    groups: Sequence[
        hd.sr.MeasurementsAndQualitativeEvaluations
        | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ],
    evidence: Sequence[Dataset],
    uids: ResultUids,
    series_number: int,
    device_serial_number: str,
    series_description: str | None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    previous_versions: Sequence[Dataset] = (),
) -> hd.sr.Comprehensive3DSR:
    """The SR document: ``model`` as the observer device, ``groups`` as its content,
    naming ``previous_versions`` in its Predecessor Documents Sequence."""
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=derive_uid("pacsnode-device", model.name, model.algorithm_version()),
            name=model.name,
            manufacturer_name=MANUFACTURER,
            model_name=f"{model.name} {model.algorithm_version()}"[:64],
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=_IMAGING_PROCEDURE,
        imaging_measurements=groups,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.sr_series_instance_uid,
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or uids.sr_sop_instance_uid,
        instance_number=instance_number,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=(series_description or f"{MANUFACTURER} {model.name} SR")[:64],
        manufacturer_model_name=MANUFACTURER,
        software_versions=pacsnode_version(),
        device_serial_number=device_serial_number,
        previous_versions=list(previous_versions) or None,
        specific_character_set=None,  # set by keep_source_charset
    )
    keep_source_charset(sr, evidence[0])
    logger.info(
        "built SR with %d measurement groups for model %s %s",
        len(groups),
        model.name,
        model.version,
        extra={"sop_instance_uid": str(sr.SOPInstanceUID)},
    )
    return sr


def build_sr(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    model: SegmentationModel,
    seg: Dataset,
    segments: Sequence[SegmentInfo],
    uids: ResultUids,
    *,
    series_number: int = SR_SERIES_NUMBER,
    series_description: str | None = None,
    sop_instance_uid: str | None = None,
    instance_number: int = 1,
    measurements: Sequence[SegmentMeasurement] | None = None,
    device_serial_number: str = "1",
    previous_versions: Sequence[Dataset] = (),
    other_inputs: Sequence[LoadedSeries] = (),
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
    series_description
        SeriesDescription; "pacsnode <model> SR" when None.
    sop_instance_uid
        SOPInstanceUID; ``uids.sr_sop_instance_uid`` when None (an SR referencing
        another encoding of the SEG needs its own).
    instance_number
        InstanceNumber in the SR series.
    measurements
        :func:`measure_segments` of the segments present, in segment order, when the
        caller has them already; measured here when None.
    device_serial_number
        DeviceSerialNumber written in the equipment module.
    previous_versions
        The SRs this one replaces (SOP class, instance, series and study UIDs), listed
        in its Predecessor Documents Sequence.
    other_inputs
        A multi-series model's other input series: listed as evidence beside ``series``
        (the reference, which the measurements are made on).

    Returns
    -------
    tuple[highdicom.sr.Comprehensive3DSR, list[SegmentMeasurement]]
        The SR and the numbers it reports, one record per segment.

    Raises
    ------
    ValueError
        If the segments do not cover the labels present in ``label_map``, or
        ``label_map`` does not match the series.
    """
    if measurements is None:
        present = [spec.value for spec in present_labels(label_map, model)]
        listed = [info.label_value for info in segments]
        if not set(present) <= set(listed):
            raise ValueError(
                f"segments cover labels {listed} but label_map holds labels {present}; pass "
                "the segments build_seg returned for this label map."
            )
        measurements = measure_segments(
            series, label_map, [info for info in segments if info.label_value in present]
        )
    present = [m.label_value for m in measurements]
    found = [info for info in segments if info.label_value in present]
    measurements = list(measurements)
    algorithm = _algorithm(model)
    source_series = hd.sr.SourceSeriesForSegmentation(series.datasets[0].SeriesInstanceUID)
    modality = series.volume.modality or str(series.datasets[0].get("Modality", ""))

    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
        | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for info, numbers in zip(found, measurements, strict=True):
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
                    *_statistics(modality, numbers, algorithm),
                ],
            )
        )
    # What the model looks for and did not find is said too: "no findings" is a result.
    for spec in sorted(model.labels, key=lambda label: label.value):
        if spec.value in present:
            continue
        finding = to_pydicom_code(spec.property_type)
        groups.append(
            hd.sr.MeasurementsAndQualitativeEvaluations(
                tracking_identifier=hd.sr.TrackingIdentifier(
                    uid=uids.derive("absent", str(spec.value)), identifier=spec.name
                ),
                finding_type=finding,
                finding_category=to_pydicom_code(spec.category),
                algorithm_id=algorithm,
                qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=finding, value=ABSENT)],
            )
        )

    sr = _report(
        model,
        groups,
        [*series.datasets, *(ds for other in other_inputs for ds in other.datasets), seg],
        uids,
        series_number,
        device_serial_number,
        series_description,
        sop_instance_uid,
        instance_number,
        previous_versions,
    )
    return sr, measurements


def build_classification_sr(
    results: Sequence[tuple[LoadedSeries, Sequence[float]]],
    model: ClassificationModel,
    uids: ResultUids,
    *,
    series_number: int = SR_SERIES_NUMBER,
    series_description: str | None = None,
    device_serial_number: str = "1",
    previous_versions: Sequence[Dataset] = (),
) -> tuple[hd.sr.Comprehensive3DSR, list[ClassFinding]]:
    """Build the TID 1500 Measurement Report of a classification.

    Parameters
    ----------
    results
        (source, probabilities) pairs: one for a whole series, or one per image for a
        model that classifies images one by one; probabilities in the order of
        ``model.classes``.
    model
        The classifier; its classes give the coded findings, its threshold decides
        present or absent.
    uids
        The job's result UIDs (SR series and instance UIDs).
    series_number
        SeriesNumber of the SR series.
    series_description
        SeriesDescription; "pacsnode <model> SR" when None.
    device_serial_number
        DeviceSerialNumber written in the equipment module.
    previous_versions
        The SRs this one replaces, listed in its Predecessor Documents Sequence.

    Returns
    -------
    tuple[highdicom.sr.Comprehensive3DSR, list[ClassFinding]]
        The SR and what it says, one record per (source, class), in that order.

    Raises
    ------
    ValueError
        If there are no results, a result has the wrong number of probabilities, or a
        probability is outside [0, 1].
    """
    if not results:
        raise ValueError("results is empty; there is nothing to report.")
    algorithm = _algorithm(model)
    several = len(results) > 1
    groups = []
    findings = []
    for number, (source, probabilities) in enumerate(results, start=1):
        if len(probabilities) != len(model.classes):
            raise ValueError(
                f"{len(probabilities)} probabilities for the {len(model.classes)} classes "
                f"of model {model.name!r}"
            )
        first = source.datasets[0]
        where = f" (image {first.get('InstanceNumber') or number})" if several else ""
        images = [
            hd.sr.SourceImageForMeasurementGroup(ds.SOPClassUID, ds.SOPInstanceUID)
            for ds in source.datasets
        ]
        for index, (spec, probability) in enumerate(zip(model.classes, probabilities, strict=True)):
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"probability of {spec.name!r} is {probability}, not in [0, 1]")
            present = probability >= model.threshold
            finding = to_pydicom_code(spec.finding)
            groups.append(
                hd.sr.MeasurementsAndQualitativeEvaluations(
                    tracking_identifier=hd.sr.TrackingIdentifier(
                        uid=uids.derive("class", str(number), str(index)),
                        identifier=f"{spec.name}{where}"[:64],
                    ),
                    finding_type=finding,
                    algorithm_id=algorithm,
                    source_images=images,
                    measurements=[
                        hd.sr.Measurement(
                            name=PROBABILITY_CONCEPT,
                            value=probability,
                            unit=codes.UCUM.NoUnits,
                            algorithm_id=algorithm,
                        )
                    ],
                    qualitative_evaluations=[
                        hd.sr.QualitativeEvaluation(
                            name=finding, value=PRESENT if present else ABSENT
                        )
                    ],
                )
            )
            findings.append(
                ClassFinding(
                    name=spec.name,
                    probability=probability,
                    present=present,
                    sop_instance_uids=tuple(str(ds.SOPInstanceUID) for ds in source.datasets),
                )
            )
    evidence = [ds for source, _ in results for ds in source.datasets]
    sr = _report(
        model,
        groups,
        evidence,
        uids,
        series_number,
        device_serial_number,
        series_description,
        previous_versions=previous_versions,
    )
    return sr, findings
