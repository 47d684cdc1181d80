"""SEG and SR building: content, references, determinism, round trip and dciodvfy."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import UID

from models.base import Code, LabelSpec, SegmentationModel, Volume
from tests.dicom_factory import write_ct_series
from tests.peers import dciodvfy_errors
from tests.sr_reading import (
    read_absent,
    read_means,
    read_referenced_segments,
    read_stds,
    read_volumes_ml,
)
from tests.validation import enforce_valid_values  # noqa: F401 (autouse)
from workers.seg import SegmentInfo, build_seg
from workers.series import LoadedSeries, load_series
from workers.sr import SegmentMeasurement, build_sr
from workers.storage import write_dataset_atomic
from workers.uids import ResultUids, derive_uid

ANATOMY = Code("123037004", "SCT", "Anatomical Structure")
SHAPE = (6, 32, 32)
SPACING_MM = (2.5, 0.8, 0.7)


class FakeOrgans(SegmentationModel):
    """Declares three labels; the tests' label maps use only 1 and 3."""

    name = "fake_organs"
    version = "1.2.3"
    labels = (
        LabelSpec(1, "Liver", ANATOMY, Code("10200004", "SCT", "Liver"), (200, 100, 50)),
        LabelSpec(2, "Spleen", ANATOMY, Code("78961009", "SCT", "Spleen"), (0, 255, 0)),
        LabelSpec(3, "Kidney", ANATOMY, Code("64033007", "SCT", "Kidney"), (0, 0, 255)),
    )
    algorithm_family = Code("113033", "DCM", "Artificial Intelligence")

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        return np.zeros(volume.voxels.shape, dtype=np.uint8)


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> LoadedSeries:
    """A 6-slice CT, written feet first so file order is the reverse of slice order."""
    hu = np.random.default_rng(7).integers(-1000, 1000, SHAPE).astype(np.int16)
    paths = write_ct_series(
        hu, tmp_path_factory.mktemp("ct"), spacing_mm=SPACING_MM, feet_first=True
    )
    return load_series(paths)


@pytest.fixture(scope="module")
def label_map() -> npt.NDArray[np.uint8]:
    """Labels 1 and 3 (2 is declared but absent); slices 0 and 5 are empty."""
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[1:3, 4:10, 5:20] = 1
    labels[2:5, 20:30, 2:8] = 3
    labels[3, 0, 0] = 1  # a second, separate piece of label 1
    return labels


@pytest.fixture
def model() -> FakeOrgans:
    return FakeOrgans()


@pytest.fixture
def uids(series: LoadedSeries) -> ResultUids:
    return ResultUids.for_job(
        series.datasets[0].SeriesInstanceUID, FakeOrgans.name, FakeOrgans.version, "d"
    )


def write_and_read(ds: Dataset) -> Dataset:
    """Encode to bytes and decode again (highdicom tests/utils.py)."""
    with BytesIO() as fp:
        ds.save_as(fp, enforce_file_format=True)
        return dcmread(BytesIO(fp.getvalue()))


def build_all(
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: SegmentationModel,
    uids: ResultUids,
) -> tuple[Dataset, list[SegmentInfo], hd.sr.Comprehensive3DSR, list[SegmentMeasurement]]:
    seg, segments = build_seg(series, label_map, model, uids)
    sr, numbers = build_sr(series, label_map, model, seg, segments, uids)
    return seg, segments, sr, numbers


# --- UIDs -----------------------------------------------------------------------------


def test_derive_uid_is_deterministic_and_valid() -> None:
    uid = derive_uid("1.2.3", "model", "1.0")
    assert uid == derive_uid("1.2.3", "model", "1.0")
    assert uid.startswith("2.25.")
    assert UID(uid).is_valid
    assert len(uid) <= 64
    assert derive_uid("a", "bc") != derive_uid("ab", "c")


def test_derive_uid_needs_parts() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        derive_uid()


def test_result_uids_depend_on_series_model_version_and_input() -> None:
    first = ResultUids.for_job("1.2.3", "m", "1", "d")
    assert first == ResultUids.for_job("1.2.3", "m", "1", "d")
    values = dataclasses.astuple(first)
    assert len(set(values)) == 4
    for other in (
        ResultUids.for_job("1.2.4", "m", "1", "d"),
        ResultUids.for_job("1.2.3", "n", "1", "d"),
        ResultUids.for_job("1.2.3", "m", "2", "d"),
        ResultUids.for_job("1.2.3", "m", "1", "e"),  # other instances or other bytes
    ):
        assert not set(values) & set(dataclasses.astuple(other))


# --- SEG ------------------------------------------------------------------------------


def test_seg_pixels_equal_label_map(
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    seg, segments = build_seg(series, label_map, model, uids)
    assert [(s.segment_number, s.label_value) for s in segments] == [(1, 1), (2, 3)]

    read = hd.seg.Segmentation.from_dataset(write_and_read(seg))
    source_uids = [ds.SOPInstanceUID for ds in series.datasets]
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=source_uids, combine_segments=True, relabel=False
    )
    expected = np.zeros_like(label_map)
    for info in segments:
        expected[label_map == info.label_value] = info.segment_number
    np.testing.assert_array_equal(pixels, expected)
    # Empty slices are omitted: frames only for slices 1..4, one per segment present.
    assert int(read.NumberOfFrames) == sum(len(np.unique(s[s > 0])) for s in label_map)


def test_seg_segments_carry_label_codes_and_algorithm(
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    seg, segments = build_seg(series, label_map, model, uids)
    read = hd.seg.Segmentation.from_dataset(write_and_read(seg))
    assert read.SegmentationType == "BINARY"
    assert [int(item.SegmentNumber) for item in read.SegmentSequence] == [1, 2]
    for info in segments:
        item = read.get_segment_description(info.segment_number)
        spec = info.label
        assert item.segment_label == spec.name
        assert item.segmented_property_category.value == spec.category.value
        assert item.segmented_property_category.scheme_designator == "SCT"
        assert item.segmented_property_type.value == spec.property_type.value
        assert item.segmented_property_type.meaning == spec.property_type.meaning
        assert item.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert item.algorithm_identification is not None
        algorithm = item.algorithm_identification[0]
        assert algorithm.AlgorithmName == "fake_organs"
        assert algorithm.AlgorithmVersion == "1.2.3"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "113033"
        assert item.tracking_uid == info.tracking_uid
        assert item.tracking_id == spec.name
        lab = hd.color.CIELabColor.from_rgb(*spec.color_rgb)
        assert tuple(item.RecommendedDisplayCIELabValue) == tuple(lab.value)


def test_seg_references_source_series(
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    seg, _ = build_seg(series, label_map, model, uids)
    read = write_and_read(seg)
    source = series.datasets[0]
    assert read.SOPInstanceUID == uids.seg_sop_instance_uid
    assert read.SeriesInstanceUID == uids.seg_series_instance_uid
    assert read.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert read.StudyInstanceUID == source.StudyInstanceUID
    assert read.PatientID == source.PatientID
    assert read.SeriesNumber == 901
    assert read.SeriesDescription == "pacsnode fake_organs SEG"
    assert read.Manufacturer == "pacsnode"
    assert read.ContentLabel == "FAKE_ORGANS"
    assert len(read.ReferencedSeriesSequence) == 1
    referenced = read.ReferencedSeriesSequence[0]
    assert referenced.SeriesInstanceUID == source.SeriesInstanceUID
    assert {item.ReferencedSOPInstanceUID for item in referenced.ReferencedInstanceSequence} == {
        ds.SOPInstanceUID for ds in series.datasets
    }
    # Each frame's derivation points at the source slice it was drawn on.
    by_uid = {ds.SOPInstanceUID: ds for ds in series.datasets}
    for frame in read.PerFrameFunctionalGroupsSequence:
        source_item = frame.DerivationImageSequence[0].SourceImageSequence[0]
        ds = by_uid[source_item.ReferencedSOPInstanceUID]
        position = [float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient]
        assert position == pytest.approx([float(v) for v in ds.ImagePositionPatient])


def test_empty_result_is_a_valid_seg_and_an_sr_of_absent_findings(
    tmp_path: Path, series: LoadedSeries, model: FakeOrgans, uids: ResultUids
) -> None:
    """The model found nothing: every declared label is an empty segment, all frames kept,
    and the SR says each finding is absent; both pass dciodvfy."""
    empty = np.zeros(SHAPE, dtype=np.uint8)
    seg, segments, sr, numbers = build_all(series, empty, model, uids)
    assert [(i.segment_number, i.name) for i in segments] == [
        (1, "Liver"), (2, "Spleen"), (3, "Kidney"),
    ]  # fmt: skip
    assert int(seg.NumberOfFrames) == 3 * SHAPE[0]
    assert not hd.seg.Segmentation.from_dataset(write_and_read(seg)).pixel_array.any()
    assert numbers == []
    read = write_and_read(sr)
    assert read_volumes_ml(read) == {}
    assert read_absent(read) == {"Liver", "Spleen", "Kidney"}
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        assert dciodvfy_errors(write_dataset_atomic(ds, tmp_path / name)) == []


def test_seg_rejects_undeclared_label(
    series: LoadedSeries, model: FakeOrgans, uids: ResultUids
) -> None:
    labels = np.zeros(SHAPE, dtype=np.uint8)
    labels[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"holds values \[7\] that the model does not declare"):
        build_seg(series, labels, model, uids)


def test_seg_rejects_wrong_shape(series: LoadedSeries, model: FakeOrgans, uids: ResultUids) -> None:
    with pytest.raises(ValueError, match="must have the volume's shape"):
        build_seg(series, np.ones((5, 32, 32), dtype=np.uint8), model, uids)
    with pytest.raises(TypeError, match="must hold integers"):
        build_seg(series, np.ones(SHAPE, dtype=np.float32), model, uids)


# --- SR -------------------------------------------------------------------------------


def test_sr_measures_every_segment(
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    seg, segments, sr, numbers = build_all(series, label_map, model, uids)
    voxels = series.volume.voxels
    voxel_ml = float(np.prod(SPACING_MM)) / 1000.0
    assert series.volume.voxel_volume_ml == pytest.approx(voxel_ml)

    assert [(n.label_value, n.name, n.segment_number) for n in numbers] == [
        (1, "Liver", 1),
        (3, "Kidney", 2),
    ]
    for n in numbers:
        mask = label_map == n.label_value
        assert n.voxel_count == int(mask.sum())
        assert n.volume_ml == pytest.approx(n.voxel_count * voxel_ml)
        assert n.mean == pytest.approx(float(np.mean(voxels[mask], dtype=np.float64)))
        assert json.loads(json.dumps(n.as_dict()))["volume_ml"] == n.volume_ml

        assert n.std == pytest.approx(float(np.std(voxels[mask], dtype=np.float64)))

    read = write_and_read(sr)
    volumes = read_volumes_ml(read)
    means = read_means(read)
    stds = read_stds(read)
    assert set(volumes) == {"Liver", "Kidney"}
    for n in numbers:
        assert volumes[n.name] == pytest.approx(n.volume_ml, rel=1e-9)
        mean, unit = means[n.name]
        assert mean == pytest.approx(n.mean, rel=1e-9)
        assert unit == "[hnsf'U]"
        assert stds[n.name] == (pytest.approx(n.std, rel=1e-9), "[hnsf'U]")
    assert read_absent(read) == {"Spleen"}  # declared, not found
    assert read_referenced_segments(read) == {
        info.name: (seg.SOPInstanceUID, info.segment_number) for info in segments
    }


def test_sr_document_header_and_context(
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    seg, segments, sr, _ = build_all(series, label_map, model, uids)
    read = hd.sr.Comprehensive3DSR.from_dataset(write_and_read(sr))
    source = series.datasets[0]
    assert read.SOPInstanceUID == uids.sr_sop_instance_uid
    assert read.SeriesInstanceUID == uids.sr_series_instance_uid
    assert read.StudyInstanceUID == source.StudyInstanceUID
    assert read.PatientID == source.PatientID
    assert read.PatientName == source.PatientName
    assert read.SeriesNumber == 902
    assert read.SeriesDescription == "pacsnode fake_organs SR"

    evidence = {
        item.ReferencedSOPInstanceUID
        for study in read.CurrentRequestedProcedureEvidenceSequence
        for ser in study.ReferencedSeriesSequence
        for item in ser.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence

    report = read.content
    assert isinstance(report, hd.sr.MeasurementReport)
    groups = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in groups] == [s.name for s in segments]
    assert [g.tracking_uid for g in groups] == [s.tracking_uid for s in segments]
    for group, info in zip(groups, segments, strict=True):
        ref = group.referenced_segment
        assert ref is not None
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [info.segment_number]
        source_series = ref.source_series_for_segmentation
        assert source_series is not None
        assert source_series.value == source.SeriesInstanceUID
        finding_type = group.finding_type
        assert finding_type is not None
        assert finding_type.value == info.label.property_type.value
        volume = group.get_measurements(name=codes.SCT.Volume)[0]
        assert volume.unit.value == "mL"
        assert volume.value == pytest.approx(
            float(np.count_nonzero(label_map == info.label_value)) * series.volume.voxel_volume_ml
        )

    observer = report.get_observer_contexts()[0]
    device = observer.observer_identifying_attributes
    assert isinstance(device, hd.sr.DeviceObserverIdentifyingAttributes)
    assert device.uid == derive_uid("pacsnode-device", "fake_organs", "1.2.3")
    assert device.name == "fake_organs"
    assert device.model_name == "fake_organs 1.2.3"


def test_sr_mean_is_unitless_for_other_modalities(
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    mr = LoadedSeries(
        volume=dataclasses.replace(series.volume, modality="MR"), datasets=series.datasets
    )
    _, _, sr, numbers = build_all(mr, label_map, model, uids)
    means = read_means(write_and_read(sr))
    for n in numbers:
        assert means[n.name] == (pytest.approx(n.mean, rel=1e-9), "1")


def test_sr_rejects_segments_of_another_label_map(
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    other = np.where(label_map == 3, 0, label_map).astype(np.uint8)
    seg, segments = build_seg(series, other, model, uids)
    with pytest.raises(ValueError, match="segments cover labels"):
        build_sr(series, label_map, model, seg, segments, uids)


# --- determinism, files, dciodvfy ------------------------------------------------------


def test_building_twice_gives_identical_uids(
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    first = build_all(series, label_map, model, uids)
    again = ResultUids.for_job(
        series.datasets[0].SeriesInstanceUID, FakeOrgans.name, FakeOrgans.version, "d"
    )
    second = build_all(series, label_map, FakeOrgans(), again)

    def all_uids(ds: Dataset) -> list[tuple[str, object]]:
        found: list[tuple[str, object]] = []

        def visit(d: Dataset, elem: object) -> None:
            vr = getattr(elem, "VR", None)
            if vr == "UI":
                found.append((str(getattr(elem, "keyword", "")), getattr(elem, "value", None)))

        ds.walk(visit)
        return found

    assert (
        "DimensionOrganizationUID",
        first[0].DimensionOrganizationSequence[0]["DimensionOrganizationUID"].value,
    ) in all_uids(first[0])
    for a, b in ((first[0], second[0]), (first[2], second[2])):
        assert all_uids(a) == all_uids(b)
        assert a.SOPInstanceUID == b.SOPInstanceUID
        assert a.SeriesInstanceUID == b.SeriesInstanceUID
    assert first[0].PixelData == second[0].PixelData
    assert first[1] == second[1]
    assert first[3] == second[3]


def test_write_dataset_atomic_replaces_and_leaves_no_temp(
    tmp_path: Path,
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    seg, _ = build_seg(series, label_map, model, uids)
    target = tmp_path / "out" / "seg.dcm"
    target.parent.mkdir()
    target.write_bytes(b"old")
    assert write_dataset_atomic(seg, target) == target
    assert os.listdir(target.parent) == ["seg.dcm"]
    assert dcmread(target).SOPInstanceUID == seg.SOPInstanceUID


def test_write_dataset_atomic_cleans_up_on_error(tmp_path: Path) -> None:
    ds = Dataset()  # no file meta: pydicom refuses to write it
    ds.PatientID = "X"
    with pytest.raises((ValueError, AttributeError)):
        write_dataset_atomic(ds, tmp_path / "bad.dcm")
    assert os.listdir(tmp_path) == []


def test_dciodvfy_accepts_seg_and_sr(
    tmp_path: Path,
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    seg, _, sr, _ = build_all(series, label_map, model, uids)
    for name, ds in (("seg.dcm", seg), ("sr.dcm", sr)):
        path = write_dataset_atomic(ds, tmp_path / name)
        result = subprocess.run(
            ["/usr/bin/dciodvfy", str(path)],
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
        output = result.stdout + result.stderr
        errors = [line for line in output.splitlines() if line.startswith("Error")]
        assert not errors, f"dciodvfy {name}:\n{output}"


# --- SEG encodings and the placement check ----------------------------------------------


@pytest.mark.parametrize("omit_empty_frames", [True, False])
def test_labelmap_seg_reads_back_as_the_label_map(
    tmp_path: Path,
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
    omit_empty_frames: bool,
) -> None:
    """LABELMAP: one frame per slice (non-empty slices only when omitting), segment numbers
    as pixel values; highdicom reads back the label map; dciodvfy (Debian 12's predates
    the IOD) reports exactly its one known false error."""
    seg, segments = build_seg(
        series, label_map, model, uids, seg_type="labelmap", omit_empty_frames=omit_empty_frames
    )
    path = write_dataset_atomic(seg, tmp_path / "labelmap.dcm")
    read = hd.seg.segread(path)
    assert read.segmentation_type == hd.seg.SegmentationTypeValues.LABELMAP
    assert int(read.NumberOfFrames) == (4 if omit_empty_frames else SHAPE[0])
    assert seg.SOPInstanceUID != uids.seg_sop_instance_uid  # its own instance, same series
    assert seg.SeriesInstanceUID == uids.seg_series_instance_uid
    number_of = {info.label_value: info.segment_number for info in segments}
    expected = np.zeros(SHAPE, dtype=np.uint8)
    for value, number in number_of.items():
        expected[label_map == value] = number
    uids_in_order = [ds.SOPInstanceUID for ds in series.datasets]
    pixels = read.get_pixels_by_source_instance(
        source_sop_instance_uids=uids_in_order,
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
        combine_segments=True,
    )
    np.testing.assert_array_equal(pixels, expected)
    # No "Background" segment item (Pixel Padding Value 0 says it): viewers that list
    # segments by position (cornerstone3D 5.6.8) would shift every name by one.
    assert [int(item.SegmentNumber) for item in read.SegmentSequence] == sorted(number_of.values())
    assert read.PixelPaddingValue == 0
    assert dciodvfy_errors(path) == ["Error - Information Object Not found"]


def test_binary_seg_with_all_frames(
    series: LoadedSeries, label_map: npt.NDArray[np.uint8], model: FakeOrgans, uids: ResultUids
) -> None:
    seg, segments = build_seg(series, label_map, model, uids, omit_empty_frames=False)
    assert int(seg.NumberOfFrames) == len(segments) * SHAPE[0]


def test_placement_check_passes_and_catches_a_shifted_frame(
    tmp_path: Path,
    series: LoadedSeries,
    label_map: npt.NDArray[np.uint8],
    model: FakeOrgans,
    uids: ResultUids,
) -> None:
    from workers.seg_check import SegPlacementError, check_seg_placement

    seg, _ = build_seg(series, label_map, model, uids)
    check_seg_placement(seg, series)
    path = write_dataset_atomic(seg, tmp_path / "seg.dcm")
    check_seg_placement(dcmread(path), series)  # as written

    shifted = dcmread(path)
    position = shifted.PerFrameFunctionalGroupsSequence[2].PlanePositionSequence[0]
    position.ImagePositionPatient = [
        float(v) + (1.0 if i == 2 else 0.0) for i, v in enumerate(position.ImagePositionPatient)
    ]
    with pytest.raises(SegPlacementError, match=r"frame 3 is at .* 1\.000 mm from its source"):
        check_seg_placement(shifted, series)

    other_frame = dcmread(path)
    other_frame.FrameOfReferenceUID = derive_uid("another", "frame")
    with pytest.raises(SegPlacementError, match=r"FrameOfReferenceUID .* is not the source's"):
        check_seg_placement(other_frame, series)
