"""Tests for workers.series.load_series: geometry, decoding and every SeriesError case."""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from tests.dicom_factory import (
    Orientation,
    chest_phantom,
    orientation_cosines,
    write_broken_file,
    write_ct_series,
)
from workers.series import LoadedSeries, SeriesError, load_series

SPACING = (2.0, 0.7, 0.9)
ORIGIN = (-30.5, 12.25, 101.0)


@pytest.fixture
def hu() -> npt.NDArray[np.int16]:
    """A small random volume: any flip or transposition changes it.

    40 x 48 pixels: JPEG 2000 needs 32+ per side, and cutting a file in half must land in
    the pixel data.
    """
    rng = np.random.default_rng(7)
    return rng.integers(-1024, 3000, size=(5, 40, 48)).astype(np.int16)


def _edit(path: Path, change: Callable[[Dataset], None]) -> None:
    ds = dcmread(path)
    change(ds)
    ds.save_as(path)


def _expected_positions(
    shape: tuple[int, ...],
    orientation: Orientation | tuple[tuple[float, ...], tuple[float, ...]],
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(N, 3) voxel indices and the patient positions the writer gave them."""
    row, col = (np.asarray(v) for v in orientation_cosines(orientation))
    normal = np.cross(row, col)
    indices = np.argwhere(np.ones(shape, dtype=bool)).astype(np.float64)
    k, j, i = indices[:, :1], indices[:, 1:2], indices[:, 2:]
    positions = (
        np.asarray(ORIGIN)
        + k * SPACING[0] * normal
        + j * SPACING[1] * col  # PixelSpacing[0]: between rows, along the column direction
        + i * SPACING[2] * row  # PixelSpacing[1]: between columns, along the row direction
    )
    return indices, positions


def _check_geometry(
    loaded: LoadedSeries,
    hu: npt.NDArray[np.int16],
    orientation: Orientation | tuple[tuple[float, ...], tuple[float, ...]],
) -> None:
    volume = loaded.volume
    assert volume.voxels.dtype == np.float32
    np.testing.assert_array_equal(volume.voxels, hu.astype(np.float32))
    np.testing.assert_allclose(volume.spacing_mm, SPACING, atol=1e-6)
    np.testing.assert_allclose(volume.origin, ORIGIN, atol=1e-6)
    indices, positions = _expected_positions(hu.shape, orientation)
    np.testing.assert_allclose(volume.voxel_to_patient(indices), positions, atol=1e-4)
    assert volume.modality == "CT"
    assert len(loaded.datasets) == hu.shape[0]
    for k, ds in enumerate(loaded.datasets):
        assert "PixelData" not in ds
        np.testing.assert_allclose(
            volume.voxel_to_patient(np.array([[k, 0, 0]], dtype=np.float64))[0],
            [float(v) for v in ds.ImagePositionPatient],
            atol=1e-4,
        )


@pytest.mark.parametrize(
    "orientation",
    [
        "axial",
        "sagittal",
        "coronal",
        "oblique",
        ((-1.0, 0.0, 0.0), (0.0, 1.0, 0.0)),  # normal points to -z (feet)
        ((0.0, -1.0, 0.0), (0.0, 0.0, -1.0)),
    ],
)
@pytest.mark.parametrize(("feet_first", "shuffle"), [(False, False), (True, False), (True, True)])
def test_geometry(
    tmp_path: Path,
    hu: npt.NDArray[np.int16],
    orientation: Orientation | tuple[tuple[float, ...], tuple[float, ...]],
    feet_first: bool,
    shuffle: bool,
) -> None:
    paths = write_ct_series(
        hu,
        tmp_path,
        spacing_mm=SPACING,
        orientation=orientation,
        origin=ORIGIN,
        feet_first=feet_first,
        shuffle=shuffle,
    )
    _check_geometry(load_series(paths), hu, orientation)


def test_axial_positions_literal(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    """Axial: column index runs along +x, row index along +y, slices along +z."""
    volume = load_series(write_ct_series(hu, tmp_path, spacing_mm=SPACING, origin=ORIGIN)).volume
    got = volume.voxel_to_patient(np.array([[3.0, 2.0, 5.0]]))[0]
    expected = [ORIGIN[0] + 5 * 0.9, ORIGIN[1] + 2 * 0.7, ORIGIN[2] + 3 * 2.0]
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_reversed_instance_order_sorted_by_position(
    tmp_path: Path, hu: npt.NDArray[np.int16]
) -> None:
    paths = write_ct_series(hu, tmp_path, spacing_mm=SPACING, origin=ORIGIN, feet_first=True)
    loaded = load_series(reversed(paths))
    assert [int(ds.InstanceNumber) for ds in loaded.datasets] == [5, 4, 3, 2, 1]
    np.testing.assert_array_equal(loaded.volume.voxels, hu)


@pytest.mark.parametrize(
    "transfer_syntax",
    [ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless, JPEG2000Lossless],
)
@pytest.mark.parametrize(("signed", "slope"), [(True, 1.0), (False, 1.0), (True, 0.5)])
def test_decoding_and_rescale(
    tmp_path: Path,
    hu: npt.NDArray[np.int16],
    transfer_syntax: str,
    signed: bool,
    slope: float,
) -> None:
    paths = write_ct_series(
        hu,
        tmp_path,
        spacing_mm=SPACING,
        origin=ORIGIN,
        transfer_syntax=transfer_syntax,
        signed=signed,
        rescale_slope=slope,
    )
    assert dcmread(paths[0]).file_meta.TransferSyntaxUID == transfer_syntax
    np.testing.assert_array_equal(load_series(paths).volume.voxels, hu)


def test_phantom_round_trip(tmp_path: Path) -> None:
    phantom = chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    paths = write_ct_series(phantom.hu, tmp_path, spacing_mm=phantom.spacing_mm, shuffle=True)
    volume = load_series(paths).volume
    np.testing.assert_array_equal(volume.voxels, phantom.hu)
    assert volume.voxel_volume_ml == pytest.approx(phantom.voxel_volume_ml)


def _series(tmp_path: Path, hu: npt.NDArray[np.int16], name: str = "a") -> list[Path]:
    return write_ct_series(hu, tmp_path / name, spacing_mm=SPACING, origin=ORIGIN)


def test_truncated_file(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)
    write_broken_file(paths[2], paths[2], kind="truncated")
    with pytest.raises(SeriesError, match=rf"{re.escape(str(paths[2]))}: truncated"):
        load_series(paths)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter:UserWarning")
@pytest.mark.parametrize("transfer_syntax", [RLELossless, JPEG2000Lossless])
def test_truncated_compressed_file(
    tmp_path: Path, hu: npt.NDArray[np.int16], transfer_syntax: str
) -> None:
    paths = write_ct_series(
        hu, tmp_path, spacing_mm=SPACING, origin=ORIGIN, transfer_syntax=transfer_syntax
    )
    write_broken_file(paths[1], paths[1], kind="truncated")
    with pytest.raises(SeriesError, match=re.escape(str(paths[1]))):
        load_series(paths)


def test_file_cut_in_header(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)
    paths[0].write_bytes(paths[0].read_bytes()[:400])
    with pytest.raises(SeriesError, match=re.escape(str(paths[0]))):
        load_series(paths)


def test_not_dicom(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)
    paths[3].write_text("not a DICOM file\n")
    with pytest.raises(SeriesError, match=rf"{re.escape(str(paths[3]))}: unreadable"):
        load_series(paths)


def test_no_pixel_data(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)
    write_broken_file(paths[1], paths[1], kind="no_pixel_data")
    with pytest.raises(SeriesError, match=rf"{re.escape(str(paths[1]))}: no PixelData"):
        load_series(paths)


def test_two_series(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu, "a") + _series(tmp_path, hu, "b")[:1]
    with pytest.raises(SeriesError, match="more than one SeriesInstanceUID"):
        load_series(paths)


def test_orientation_differs(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)
    row, col = orientation_cosines(((1.0, 0.001, 0.0), (-0.001, 1.0, 0.0)))
    _edit(paths[4], lambda ds: setattr(ds, "ImageOrientationPatient", [*row, *col]))
    with pytest.raises(SeriesError, match=rf"{re.escape(str(paths[4]))}: ImageOrientationPatient"):
        load_series(paths)


def test_orientation_within_tolerance(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)
    _edit(
        paths[4],
        lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0.00002, 0, -0.00002, 1, 0]),
    )
    np.testing.assert_array_equal(load_series(paths).volume.voxels, hu)


def test_size_differs(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    uid = generate_uid()
    paths = write_ct_series(
        hu, tmp_path / "a", spacing_mm=SPACING, origin=ORIGIN, series_instance_uid=uid
    )
    shifted = (ORIGIN[0], ORIGIN[1], ORIGIN[2] + 5 * SPACING[0])
    paths += write_ct_series(
        hu[:, :30], tmp_path / "b", spacing_mm=SPACING, origin=shifted, series_instance_uid=uid
    )
    with pytest.raises(SeriesError, match=r"Rows/Columns \(30, 48\) differ from \(40, 48\)"):
        load_series(paths)


def test_pixel_spacing_differs(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)
    _edit(paths[2], lambda ds: setattr(ds, "PixelSpacing", [0.7, 0.91]))
    with pytest.raises(SeriesError, match=rf"{re.escape(str(paths[2]))}: PixelSpacing"):
        load_series(paths)


@pytest.mark.parametrize(
    "keyword", ["ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"]
)
def test_missing_geometry(tmp_path: Path, hu: npt.NDArray[np.int16], keyword: str) -> None:
    paths = _series(tmp_path, hu)
    _edit(paths[3], lambda ds: delattr(ds, keyword))
    with pytest.raises(SeriesError, match=rf"{re.escape(str(paths[3]))}: missing {keyword}"):
        load_series(paths)


def test_duplicate_positions(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    uid = generate_uid()
    paths = write_ct_series(
        hu, tmp_path / "a", spacing_mm=SPACING, origin=ORIGIN, series_instance_uid=uid
    )
    paths += write_ct_series(
        hu[:1], tmp_path / "b", spacing_mm=SPACING, origin=ORIGIN, series_instance_uid=uid
    )
    with pytest.raises(SeriesError, match="duplicate slice position"):
        load_series(paths)


def test_missing_slice_is_irregular(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)
    del paths[2]
    with pytest.raises(
        SeriesError,
        match=r"irregular slice spacing: 4\.000 mm between .*ct_0002\.dcm and .*ct_0004\.dcm",
    ):
        load_series(paths)


@pytest.mark.parametrize(("shift_mm", "ok"), [(0.005, True), (0.05, False)])
def test_spacing_tolerance(
    tmp_path: Path, hu: npt.NDArray[np.int16], shift_mm: float, ok: bool
) -> None:
    """Gaps may differ by 1 % of the spacing (0.02 mm here) or 0.01 mm, whichever is larger."""
    paths = _series(tmp_path, hu)

    def shift(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z + shift_mm]

    _edit(next(p for p in paths if dcmread(p).InstanceNumber == 3), shift)
    if ok:
        np.testing.assert_array_equal(load_series(paths).volume.voxels, hu)
    else:
        with pytest.raises(SeriesError, match="irregular slice spacing"):
            load_series(paths)


def test_sheared_stack(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)

    def shear(ds: Dataset) -> None:
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y + 0.5 * (int(ds.InstanceNumber) - 1), z]

    for path in paths:
        _edit(path, shear)
    with pytest.raises(SeriesError, match="sheared"):
        load_series(paths)


@pytest.mark.parametrize("count", [0, 1])
def test_too_few_slices(tmp_path: Path, hu: npt.NDArray[np.int16], count: int) -> None:
    paths = _series(tmp_path, hu)[:count]
    with pytest.raises(SeriesError, match=f"at least 2 slices; the series has {count}"):
        load_series(paths)


def test_input_files_untouched(tmp_path: Path, hu: npt.NDArray[np.int16]) -> None:
    paths = _series(tmp_path, hu)
    copy = tmp_path / "copy.dcm"
    shutil.copy(paths[0], copy)
    load_series(paths)
    assert paths[0].read_bytes() == copy.read_bytes()


def test_ras_affine_is_voxel_to_patient_with_x_and_y_negated() -> None:
    from models.base import Volume

    volume = Volume(
        voxels=np.zeros((3, 4, 5), np.float32),
        origin=(10.0, -20.0, 30.0),
        row_direction=(0.0, 1.0, 0.0),
        column_direction=(0.0, 0.0, -1.0),
        spacing_mm=(2.0, 0.5, 0.75),
    )
    indices = np.array([[0.0, 0.0, 0.0], [2.0, 3.0, 4.0], [1.0, 0.0, 2.0]])
    lps = volume.voxel_to_patient(indices)
    ras = (volume.ras_affine @ np.c_[indices, np.ones(3)].T).T[:, :3]
    np.testing.assert_allclose(ras, lps * [-1.0, -1.0, 1.0])


@pytest.mark.parametrize(
    ("dtype", "slope", "intercept"),
    [
        (np.int16, 1.0, -1024.0),  # float32 arithmetic, exact
        (np.uint16, 1.0, -1024.0),
        (np.uint16, 1.0, 0.0),
        (np.int16, 0.5, -1024.0),  # float64 arithmetic, rounded
        (np.uint16, 1.0, -0.5),
        (np.int32, 1.0, -1024.0),
    ],
)
def test_rescaling_equals_float64_arithmetic_rounded_to_float32(
    dtype: type[np.integer], slope: float, intercept: float
) -> None:
    from workers.series import _rescale_into

    info = np.iinfo(dtype)
    rng = np.random.default_rng(7)
    stored = rng.integers(max(info.min, -(2**20)), min(info.max, 2**20), (64, 64)).astype(dtype)
    stored.flat[:2] = (max(info.min, -(2**20)), min(info.max, 2**20) - 1)
    ds = Dataset()
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    out = np.empty(stored.shape, dtype=np.float32)
    _rescale_into(ds, stored, out)
    expected = (stored.astype(np.float64) * slope + intercept).astype(np.float32)
    assert np.array_equal(out, expected)
