"""pacsnode's SEG writer (workers.seg_frames) against highdicom's own: the same bytes.

For every geometry the SEG tests use (``tests.dicom_factory.SEG_GEOMETRIES``: axial
head and feet first, reversed normal, shuffled files, sagittal, coronal, oblique), both encodings (BINARY, LABELMAP) and with and without empty
frames, ``build_seg`` then ``write_seg`` must write exactly the file that
``highdicom.seg.Segmentation`` over the whole series writes (``with_highdicom=True``),
and so must the special cases: one segment (a 3D dimension organization), frames that
do not fill whole bytes, an empty label map, sources that carry their spacing between
slices, are irregularly spaced or come in implicit VR, label values that are not segment numbers, and a
LABELMAP of more than 255 segments (16-bit frames).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pytest
from pydicom import Dataset
from pydicom.dataelem import RawDataElement
from pydicom.sr.codedict import codes
from pydicom.uid import ImplicitVRLittleEndian

from models.base import Code, LabelSpec, SegmentationModel, Volume
from tests.dicom_factory import SEG_GEOMETRIES, write_ct_series
from workers.seg import build_seg, write_seg
from workers.seg_check import SegPlacementError, check_seg_placement
from workers.series import LoadedSeries, load_series
from workers.storage import write_dataset_atomic
from workers.uids import ResultUids

SHAPE = (7, 32, 40)
SPACING_MM = (2.0, 0.75, 0.8)
TISSUE = Code("85756007", "SCT", "Tissue")
STAMPED = (
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "ContributingEquipmentSequence",
)


def _label(value: int) -> LabelSpec:
    return LabelSpec(
        value, f"Label {value}", TISSUE, Code("10200004", "SCT", "Liver"), (value % 256, 90, 30)
    )


class FourLabels(SegmentationModel):
    """Declares labels 1 to 4 (only their names and codes are used here)."""

    name = "frames_test"
    version = "1.0"
    labels = tuple(_label(v) for v in range(1, 5))
    algorithm_family = Code(
        codes.cid7162.ArtificialIntelligence.value, "DCM", "Artificial Intelligence"
    )

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        raise NotImplementedError


def labels_model(count: int = 4) -> SegmentationModel:
    """A model like FourLabels declaring labels 1 to ``count``."""
    declared = tuple(_label(v) for v in range(1, count + 1))
    return type(f"Labels{count}", (FourLabels,), {"labels": declared})()  # type: ignore[no-any-return]


def _series(folder: Path, shape: tuple[int, int, int] = SHAPE, **geometry: Any) -> LoadedSeries:
    hu = np.random.default_rng(3).integers(-1000, 1000, shape).astype(np.int16)
    return load_series(write_ct_series(hu, folder, spacing_mm=SPACING_MM, **geometry))


def _label_map(shape: tuple[int, int, int] = SHAPE) -> npt.NDArray[np.uint8]:
    """Labels 1, 2 and 4 (3 declared, absent), pieces of different extents; the first
    and last slices empty; label 2 absent from slice 3 though others are there."""
    labels = np.zeros(shape, dtype=np.uint8)
    labels[1:6, 3:20, 4:30] = 1
    labels[2:5, 22:30, 10:16] = 2
    labels[3, 22:30, 10:16] = 0
    labels[4:6, 5:9, 31:38] = 4
    labels[2, 0, 0] = 4
    return labels


def _both(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    model: SegmentationModel,
    folder: Path,
    **options: Any,
) -> tuple[bytes, bytes, Dataset]:
    """The file pacsnode writes and the one highdicom writes, and pacsnode's SEG."""
    uids = ResultUids.for_job(
        str(series.datasets[0].SeriesInstanceUID), model.name, model.version, "frames"
    )
    ours, _ = build_seg(series, label_map, model, uids, **options)
    theirs, _ = build_seg(series, label_map, model, uids, with_highdicom=True, **options)
    for keyword in STAMPED:  # the two builds ran at different times
        if keyword in ours:
            setattr(theirs, keyword, copy.deepcopy(ours[keyword].value))
    assert isinstance(ours.get_item("PerFrameFunctionalGroupsSequence"), RawDataElement)
    write_seg(ours, folder / "ours.dcm")
    write_dataset_atomic(theirs, folder / "theirs.dcm")
    return (folder / "ours.dcm").read_bytes(), (folder / "theirs.dcm").read_bytes(), ours


def _first_difference(ours: bytes, theirs: bytes) -> str:
    at = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), None)
    if at is None:
        return f"lengths {len(ours)} and {len(theirs)}"
    return f"byte {at}: {ours[at - 40 : at + 40]!r} / {theirs[at - 40 : at + 40]!r}"


@pytest.mark.parametrize("omit_empty_frames", [True, False])
@pytest.mark.parametrize("seg_type", ["binary", "labelmap"])
@pytest.mark.parametrize("geometry", list(SEG_GEOMETRIES))
def test_same_bytes_as_highdicom(
    tmp_path: Path,
    geometry: str,
    seg_type: Literal["binary", "labelmap"],
    omit_empty_frames: bool,
) -> None:
    series = _series(tmp_path / "ct", **SEG_GEOMETRIES[geometry].series_options())
    ours, theirs, seg = _both(
        series,
        _label_map(),
        labels_model(),
        tmp_path,
        seg_type=seg_type,
        omit_empty_frames=omit_empty_frames,
    )
    assert ours == theirs, _first_difference(ours, theirs)
    frames = {
        ("binary", True): 5 + 2 + 3,  # label 1 on slices 1-5, 2 on 2 and 4, 4 on 2, 4, 5
        ("binary", False): 3 * SHAPE[0],
        ("labelmap", True): 5,  # slices 1-5
        ("labelmap", False): SHAPE[0],
    }[(seg_type, omit_empty_frames)]
    assert int(seg.NumberOfFrames) == frames
    check_seg_placement(seg, series)


@pytest.mark.parametrize(
    "case",
    [
        "one segment",
        "odd frame size",
        "empty label map",
        "spacing between slices given",
        "irregular slice spacing",
        "implicit VR source",
        "label values are not segment numbers",
        "300 segments",
    ],
)
def test_same_bytes_as_highdicom_special_cases(tmp_path: Path, case: str) -> None:
    shape = (5, 33, 35) if case == "odd frame size" else SHAPE
    series = _series(
        tmp_path / "ct",
        shape,
        **({"transfer_syntax": ImplicitVRLittleEndian} if case == "implicit VR source" else {}),
    )
    label_map: npt.NDArray[np.integer] = _label_map(shape)
    model = labels_model()
    if case == "one segment":
        label_map = (label_map == 1).astype(np.uint8)
    elif case == "empty label map":
        label_map[:] = 0
    elif case == "spacing between slices given":
        datasets = [copy.copy(ds) for ds in series.datasets]
        for ds in datasets:
            ds.SpacingBetweenSlices = "2.0"
        series = replace(series, datasets=tuple(datasets))
    elif case == "irregular slice spacing":  # no spacing, no 3D organization
        label_map = (label_map == 1).astype(np.uint8)
        datasets = [copy.copy(ds) for ds in series.datasets]
        x, y, z = (float(v) for v in datasets[3].ImagePositionPatient)
        datasets[3].ImagePositionPatient = [x, y, z + 0.5]  # axial: z is the normal
        series = replace(series, datasets=tuple(datasets))
    elif case == "label values are not segment numbers":
        label_map = np.where(label_map == 4, 7, label_map).astype(np.int32)
        model = labels_model(8)
    elif case == "300 segments":
        label_map = np.arange(np.prod(shape), dtype=np.uint16).reshape(shape) % 301
        model = labels_model(300)
    kinds = ["labelmap"] if case == "300 segments" else ["binary", "labelmap"]
    for seg_type in kinds:
        for omit in (True, False):
            folder = tmp_path / f"{seg_type}-{omit}"
            folder.mkdir()
            ours, theirs, seg = _both(
                series, label_map, model, folder, seg_type=seg_type, omit_empty_frames=omit
            )
            assert ours == theirs, f"{seg_type}, omit {omit}: {_first_difference(ours, theirs)}"
            check_seg_placement(seg, series)
            if case == "one segment":
                assert seg.DimensionOrganizationType == "3D"
            if case == "irregular slice spacing":
                assert "DimensionOrganizationType" not in seg
                assert (
                    "SpacingBetweenSlices"
                    not in seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
                )
            if case == "300 segments":
                assert int(seg.BitsAllocated) == 16


def test_sources_must_be_one_series(tmp_path: Path) -> None:
    series = _series(tmp_path / "a")
    other = _series(tmp_path / "b")
    mixed = replace(series, datasets=(*series.datasets[:-1], other.datasets[-1]))
    model = labels_model()
    uids = ResultUids.for_job("1.2.3", model.name, model.version, "frames")
    with pytest.raises(ValueError, match="same series"):
        build_seg(mixed, _label_map(), model, uids)
    tilted = [copy.copy(ds) for ds in series.datasets]
    tilted[2].ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.1]
    with pytest.raises(ValueError, match="shared orientation"):
        build_seg(replace(series, datasets=tuple(tilted)), _label_map(), model, uids)


def test_placement_check_reads_the_encoded_frames(tmp_path: Path) -> None:
    """A position changed in the pre-encoded bytes is caught, at the frame it is in."""
    series = _series(tmp_path / "ct")
    model = labels_model()
    uids = ResultUids.for_job("1.2.3", model.name, model.version, "frames")
    seg, _ = build_seg(series, _label_map(), model, uids)
    check_seg_placement(seg, series)
    raw = seg.get_item("PerFrameFunctionalGroupsSequence")
    assert isinstance(raw, RawDataElement)
    position_tag = b"\x20\x00\x32\x00DS"  # (0020,0032) ImagePositionPatient, explicit VR
    third = -1
    for _ in range(3):
        third = raw.value.index(position_tag, third + 1)
    value_start = third + 8
    digit = next(i for i in range(value_start, value_start + 30) if raw.value[i : i + 1].isdigit())
    shifted = bytearray(raw.value)
    shifted[digit] = ord("1") if shifted[digit] != ord("1") else ord("2")
    seg["PerFrameFunctionalGroupsSequence"] = raw._replace(value=bytes(shifted))
    with pytest.raises(SegPlacementError, match=r"frame 3 is at .* mm from its source"):
        check_seg_placement(seg, series)


def test_placement_check_refuses_malformed_encoded_frames(tmp_path: Path) -> None:
    """Frames whose encoded lengths point past their end fail the check by name."""
    series = _series(tmp_path / "ct")
    model = labels_model()
    uids = ResultUids.for_job("1.2.3", model.name, model.version, "frames")
    seg, _ = build_seg(series, _label_map(), model, uids)
    raw = seg.get_item("PerFrameFunctionalGroupsSequence")
    assert isinstance(raw, RawDataElement)
    seg["PerFrameFunctionalGroupsSequence"] = raw._replace(value=raw.value[:-10])
    with pytest.raises(SegPlacementError, match=r"unexpected|length"):
        check_seg_placement(seg, series)
