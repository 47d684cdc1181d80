"""SEG placement in patient space, checked voxel for voxel by an independent reader.

A viewer that shows a segmentation flipped, transposed or shifted against its CT is the
most common complaint about AI results, and a round trip through highdicom alone cannot
catch it (the same library would write and read the same mistake). So each case here
writes a CT series in some geometry (axial head first and feet first, reversed slice
normal, sagittal, coronal, oblique, shuffled file order), loads it with
:func:`workers.series.load_series`, segments it with the weight-free ``ct-tissue`` model,
writes the SEG with :func:`workers.seg.build_seg`, and reads the SEG back with dcmqi's
``segimage2itkimage`` (DCMTK + ITK, no code in common with pacsnode). Every voxel of the
source volume is then mapped to patient space with :meth:`models.base.Volume.voxel_to_patient`
and through the inverse NIfTI affine into dcmqi's grid, where its mask must equal the label
map, for every segment.

The phantom is made asymmetric along all three axes (no lung in the first slices, one lung
shorter than the other, a bone marker in one corner), so a flip along any axis changes the
masks; slices without lung also make highdicom omit empty frames. A negative control
checks that the comparison does catch a flipped or shifted mask.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread

from models.base import SegmentationModel, Volume
from models.registry import get_segmentation_model
from tests.dicom_factory import (
    BONE_HU,
    SEG_GEOMETRIES,
    SOFT_TISSUE_HU,
    Geometry,
    chest_phantom,
    write_ct_series,
)
from workers.seg import SegmentInfo, build_seg
from workers.series import LoadedSeries, load_series
from workers.storage import write_dataset_atomic
from workers.uids import ResultUids

#: (slices, rows, columns): rows and columns differ, so a transposed in-plane grid cannot
#: match by accident.
SHAPE = (10, 60, 72)
#: (between slices, between rows, between columns) in mm, all different for the same reason.
SPACING_MM = (5.0, 3.0, 3.5)
#: Slices (from the first) without any lung, so the Lung segment has empty frames.
NO_LUNG_SLICES = 2
#: Largest distance (in dcmqi voxels) of a mapped source voxel centre from a dcmqi voxel
#: centre: the grids must coincide, not merely overlap.
GRID_TOLERANCE_VOXELS = 0.01

#: LPS (DICOM patient) <-> RAS (NIfTI world): negate x and y.
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])

SEGIMAGE2ITKIMAGE = "segimage2itkimage"

GEOMETRIES = SEG_GEOMETRIES


def _asymmetric_hu(*, empty_end_slices: bool) -> npt.NDArray[np.int16]:
    """The chest phantom made asymmetric along slices, rows and columns.

    Lungs start at slice ``NO_LUNG_SLICES`` (the lung at lower column indices one slice
    later), and a bone marker sits at low rows and high columns in the last three slices
    (anterior and to the patient's left in an axial series). The spine, at high rows,
    already breaks the row symmetry.
    """
    phantom = chest_phantom(shape=SHAPE, spacing_mm=SPACING_MM)
    hu = phantom.hu.copy()
    no_lung = np.zeros(SHAPE, dtype=np.bool_)
    no_lung[:NO_LUNG_SLICES] = True
    no_lung[NO_LUNG_SLICES, :, : SHAPE[2] // 2] = True
    hu[phantom.lungs & no_lung] = SOFT_TISSUE_HU
    marker = (slice(-3, None), slice(12, 16), slice(38, 45))
    assert phantom.body[marker].all()
    assert not (phantom.lungs | phantom.spine)[marker].any()
    hu[marker] = BONE_HU
    if empty_end_slices:
        hu[0] = hu[-1] = -1000
    return hu


@dataclass(frozen=True)
class DcmqiMask:
    """One segment as dcmqi's reader wrote it."""

    segment: SegmentInfo
    mask: npt.NDArray[np.bool_]
    ras_affine: npt.NDArray[np.float64]


@dataclass(frozen=True)
class RoundTrip:
    """A series, the model's label map and the SEG as dcmqi read it back."""

    series: LoadedSeries
    label_map: npt.NDArray[np.uint8]
    segments: list[SegmentInfo]
    frames: int
    dcmqi: list[DcmqiMask]
    dcmqi_stderr: str


@pytest.fixture(scope="module")
def model() -> SegmentationModel:
    return get_segmentation_model("ct-tissue")


def _read_dcmqi(out_dir: Path, segments: Sequence[SegmentInfo], stderr: str) -> list[DcmqiMask]:
    """The masks dcmqi wrote, each tied to its segment through meta.json.

    dcmqi writes ``<n>.nii.gz`` for the n-th group of segments in ``meta.json``'s
    ``segmentAttributes`` (1-based); each group lists its segments with the pixel value
    (``labelID``) they have in that file and their TrackingUniqueIdentifier. The tracking
    UID identifies the segment independently of any numbering.
    """
    meta = json.loads((out_dir / "meta.json").read_text())
    groups = meta["segmentAttributes"]
    expected_files = {"meta.json"} | {f"{n}.nii.gz" for n in range(1, len(groups) + 1)}
    assert {p.name for p in out_dir.iterdir()} == expected_files, stderr
    by_tracking_uid = {info.tracking_uid: info for info in segments}
    masks: list[DcmqiMask] = []
    for n, group in enumerate(groups, start=1):
        image = nib.load(out_dir / f"{n}.nii.gz")
        assert isinstance(image, nib.Nifti1Image)
        data = np.asarray(image.dataobj)
        assert data.ndim == 3, f"{n}.nii.gz has shape {data.shape}"
        label_ids = {int(attributes["labelID"]) for attributes in group}
        values = {int(v) for v in np.unique(data)} - {0}
        assert values <= label_ids, f"{n}.nii.gz holds {values}, meta.json says {label_ids}"
        for attributes in group:
            info = by_tracking_uid[attributes["TrackingUniqueIdentifier"]]
            assert attributes["SegmentLabel"] == info.name
            # dcmqi keeps the SEG's segment numbers as pixel values.
            assert int(attributes["labelID"]) == info.segment_number
            masks.append(
                DcmqiMask(
                    segment=info,
                    mask=np.asarray(data == int(attributes["labelID"])),
                    ras_affine=np.asarray(image.affine, dtype=np.float64),
                )
            )
    found = sorted(m.segment.segment_number for m in masks)
    assert found == [info.segment_number for info in segments], stderr
    return masks


def _round_trip(tmp_path: Path, model: SegmentationModel, geometry: Geometry) -> RoundTrip:
    paths = write_ct_series(
        _asymmetric_hu(empty_end_slices=geometry.empty_end_slices),
        tmp_path / "ct",
        spacing_mm=SPACING_MM,
        **geometry.series_options(),
    )
    series = load_series(paths)
    label_map = model.predict(series.volume)
    series_uid = str(series.datasets[0].SeriesInstanceUID)
    uids = ResultUids.for_job(series_uid, model.name, model.version, "d")
    seg, segments = build_seg(series, label_map, model, uids)
    seg_path = write_dataset_atomic(seg, tmp_path / "seg.dcm")
    frames = int(dcmread(seg_path, stop_before_pixels=True).NumberOfFrames)

    out_dir = tmp_path / "dcmqi"
    out_dir.mkdir()
    # The dcmqi wheel puts its scripts beside this interpreter; the venv need not be on PATH.
    beside = Path(sys.executable).parent / SEGIMAGE2ITKIMAGE
    executable = str(beside) if beside.is_file() else shutil.which(SEGIMAGE2ITKIMAGE)
    assert executable is not None, f"{SEGIMAGE2ITKIMAGE} (PyPI package dcmqi) is not installed"
    result = subprocess.run(
        [
            executable,
            "--inputDICOM",
            str(seg_path),
            "--outputDirectory",
            str(out_dir),
            "--outputType",
            "nifti",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    report = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, f"{SEGIMAGE2ITKIMAGE} failed ({result.returncode}): {report}"
    return RoundTrip(
        series=series,
        label_map=label_map,
        segments=segments,
        frames=frames,
        dcmqi=_read_dcmqi(out_dir, segments, report),
        dcmqi_stderr=report,
    )


@dataclass(frozen=True)
class Sampled:
    """A dcmqi mask sampled at the centre of every source voxel."""

    values: npt.NDArray[np.bool_]
    inside: npt.NDArray[np.bool_]
    max_offset_voxels: float


def _sample_at_source_voxels(
    volume: Volume, mask: npt.NDArray[np.bool_], ras_affine: npt.NDArray[np.float64]
) -> Sampled:
    """Look up ``mask`` (on the grid of ``ras_affine``) at each voxel of ``volume``.

    Each source voxel (k, j, i) goes to patient (LPS) space, to RAS, then through the
    inverse affine to the nearest voxel of ``mask``. Voxels falling outside ``mask`` read
    as background and are flagged in ``inside``.
    """
    shape = volume.voxels.shape
    indices = np.indices(shape, dtype=np.float64).reshape(3, -1).T
    ras = volume.voxel_to_patient(indices) * _LPS_TO_RAS
    homogeneous = np.hstack([ras, np.ones((len(ras), 1))])
    continuous = (np.linalg.inv(ras_affine) @ homogeneous.T)[:3].T
    nearest = np.rint(continuous).astype(np.int64)
    inside = np.all((nearest >= 0) & (nearest < np.asarray(mask.shape)), axis=1)
    values = np.zeros(len(nearest), dtype=np.bool_)
    kept = nearest[inside]
    values[inside] = mask[kept[:, 0], kept[:, 1], kept[:, 2]]
    return Sampled(
        values=values.reshape(shape),
        inside=inside.reshape(shape),
        max_offset_voxels=float(np.max(np.abs(continuous - nearest))),
    )


def _mismatch_report(trip: RoundTrip, dcmqi: DcmqiMask) -> str | None:
    """Why dcmqi's mask of one segment differs from the label map; None if it does not.

    Every source voxel must land on a dcmqi voxel centre inside its grid (except voxels on
    slices that no SEG frame covers, which must then be background), and the mask there
    must equal ``label_map == label`` of that segment.
    """
    volume = trip.series.volume
    sampled = _sample_at_source_voxels(volume, dcmqi.mask, dcmqi.ras_affine)
    expected = trip.label_map == dcmqi.segment.label_value
    name = f"segment {dcmqi.segment.segment_number} ({dcmqi.segment.name})"
    if sampled.max_offset_voxels > GRID_TOLERANCE_VOXELS:
        return (
            f"{name}: source voxel centres are up to {sampled.max_offset_voxels:.3f} dcmqi "
            "voxels off dcmqi's voxel centres (shifted or differently spaced grid)"
        )
    outside = ~sampled.inside
    if outside.any() and trip.label_map[outside].any():
        k, j, i = np.argwhere(outside & (trip.label_map > 0))[0]
        return f"{name}: labelled source voxel (k, j, i) = ({k}, {j}, {i}) is outside dcmqi's grid"
    wrong = sampled.values != expected
    if not wrong.any():
        return None
    k, j, i = np.argwhere(wrong)[0]
    per_slice = wrong.sum(axis=(1, 2)).tolist()
    return (
        f"{name}: {int(wrong.sum())} of {wrong.size} voxels differ (first at (k, j, i) = "
        f"({k}, {j}, {i}), expected {bool(expected[k, j, i])}); per source slice: {per_slice}"
    )


@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_dcmqi_reads_seg_where_the_labels_are(
    tmp_path: Path, model: SegmentationModel, name: str
) -> None:
    geometry = GEOMETRIES[name]
    trip = _round_trip(tmp_path, model, geometry)
    volume = trip.series.volume
    label_map = trip.label_map

    # The label map is the one the phantom was built for: all three labels, and none of
    # them symmetric along any axis (else a flip could pass unnoticed).
    assert [info.label_value for info in trip.segments] == [1, 2, 3]
    for info in trip.segments:
        mask = label_map == info.label_value
        for axis in range(3):
            assert not np.array_equal(mask, np.flip(mask, axis)), (info.name, axis)
    # Empty frames were omitted: lung is absent from the first slices.
    lung_slices = (label_map == 2).any(axis=(1, 2))
    assert not lung_slices[:NO_LUNG_SLICES].any()
    assert lung_slices[NO_LUNG_SLICES:].any()
    labelled_frames = sum(
        int((label_map == info.label_value).any(axis=(1, 2)).sum()) for info in trip.segments
    )
    assert trip.frames == labelled_frames < len(trip.segments) * SHAPE[0]
    if geometry.empty_end_slices:
        assert not label_map[0].any()
        assert not label_map[-1].any()
    else:
        # Every source voxel must fall inside dcmqi's grid.
        for dcmqi in trip.dcmqi:
            sampled = _sample_at_source_voxels(volume, dcmqi.mask, dcmqi.ras_affine)
            assert sampled.inside.all(), (dcmqi.segment.name, trip.dcmqi_stderr)

    problems = [p for p in (_mismatch_report(trip, dcmqi) for dcmqi in trip.dcmqi) if p]
    assert not problems, "\n".join([*problems, trip.dcmqi_stderr])


def _flipped(dcmqi: DcmqiMask, axis: int) -> DcmqiMask:
    return DcmqiMask(dcmqi.segment, np.flip(dcmqi.mask, axis), dcmqi.ras_affine)


def _shifted(dcmqi: DcmqiMask, axis: int) -> DcmqiMask:
    """The same mask with the grid moved by one voxel along ``axis``."""
    affine = dcmqi.ras_affine.copy()
    affine[:3, 3] += affine[:3, axis]
    return DcmqiMask(dcmqi.segment, dcmqi.mask, affine)


def _half_voxel(dcmqi: DcmqiMask, axis: int) -> DcmqiMask:
    affine = dcmqi.ras_affine.copy()
    affine[:3, 3] += 0.5 * affine[:3, axis]
    return DcmqiMask(dcmqi.segment, dcmqi.mask, affine)


@pytest.mark.parametrize("name", ["axial-head-first", "oblique-named"])
def test_negative_control_flipped_or_shifted_masks_do_not_match(
    tmp_path: Path, model: SegmentationModel, name: str
) -> None:
    """The comparison above is able to fail: the correct dcmqi masks match, and the same
    masks flipped or moved by one voxel (or half a voxel) along any axis do not."""
    trip = _round_trip(tmp_path, model, GEOMETRIES[name])
    for dcmqi in trip.dcmqi:
        assert _mismatch_report(trip, dcmqi) is None
        for axis in range(3):
            for broken in (_flipped(dcmqi, axis), _shifted(dcmqi, axis), _half_voxel(dcmqi, axis)):
                assert _mismatch_report(trip, broken) is not None, (dcmqi.segment.name, axis)
        # Another segment's mask in place of this one does not match either.
        other = next(d for d in trip.dcmqi if d.segment != dcmqi.segment)
        swapped = DcmqiMask(dcmqi.segment, other.mask, other.ras_affine)
        assert _mismatch_report(trip, swapped) is not None
