"""Series loading: DICOM instances on disk -> :class:`models.base.Volume` objects.

:func:`load_series` makes one volume of a series: each file is read with pydicom, the
headers are checked to form one regular stack of slices, the slices are sorted along
the slice normal, and the pixel data is decoded (in parallel) and rescaled to float32
(HU for CT). :func:`load_images` makes one single-slice volume per instance, for models
that look at projection images (CR, DX, MG) one at a time; those need no patient
geometry. Both read each file once, through a ``read`` function the caller may give: a
job's reader checks the bytes against its manifest, so the bytes checked are the bytes
decoded.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.pixels import get_decoder
from pydicom.uid import ImplicitVRLittleEndian

from models.base import Volume

__all__ = [
    "FileReader",
    "LoadedSeries",
    "SeriesError",
    "load_images",
    "load_series",
    "read_file",
    "resample_onto",
]

logger = logging.getLogger(__name__)

#: Largest difference between direction cosines that still counts as the same orientation.
ORIENTATION_TOLERANCE = 1e-4
#: Largest difference in PixelSpacing (mm) that still counts as the same spacing.
PIXEL_SPACING_TOLERANCE_MM = 1e-4
#: Slices closer than this along the normal (mm) are duplicates.
DUPLICATE_TOLERANCE_MM = 1e-3
#: Slice gaps may differ from their mean by this fraction or by the absolute amount,
#: whichever is larger.
SPACING_RELATIVE_TOLERANCE = 0.01
SPACING_ABSOLUTE_TOLERANCE_MM = 0.01


def owned_cores() -> int:
    """The CPU cores this process may run on (a container or taskset may give it fewer
    than the machine has): decoding uses them all."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class SeriesError(Exception):
    """The series cannot be turned into a volume; the message names what is wrong."""


@dataclass(frozen=True)
class LoadedSeries:
    """A series as a volume plus the source headers, in volume slice order.

    ``datasets[k]`` is the instance of slice ``k`` of ``volume.voxels`` (pixel data
    removed, so holding them is cheap); SEG and SR reference them.
    """

    volume: Volume
    datasets: tuple[Dataset, ...]


def _name(ds: Dataset) -> str:
    return str(ds.filename) if isinstance(ds.filename, str) else "<in-memory dataset>"


#: Reads one input file whole (and may check its bytes first).
FileReader = Callable[[Path], bytes]


def read_file(path: Path) -> bytes:
    """A file's bytes, or a :class:`SeriesError` naming it."""
    try:
        return path.read_bytes()
    except OSError as e:
        raise SeriesError(f"{path}: cannot be read ({e.strerror or e})") from e


def _read(path: Path, read: FileReader = read_file, *, geometry: bool = True) -> Dataset:
    """Parse one file as ``read`` returns it; the pixel data stays undecoded.
    ``geometry``: the patient-space attributes a volume needs must be present."""
    data = read(path)
    try:
        ds = dcmread(BytesIO(data))
    except Exception as e:  # any parse failure means the file is unusable
        raise SeriesError(f"{path}: unreadable or truncated DICOM file ({e})") from e
    # As if read from the file: error messages name it, and the dataset does not keep
    # the whole file's bytes alive (pydicom holds on to the buffer it read).
    ds.filename, ds.buffer = str(path), None
    if "PixelData" not in ds:
        raise SeriesError(f"{path}: no PixelData (not an image, or the file is truncated)")
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        if geometry and ds.get(keyword) is None:
            raise SeriesError(f"{path}: missing {keyword}")
    for keyword in ("Rows", "Columns"):
        if ds.get(keyword) is None:
            raise SeriesError(f"{path}: missing {keyword}")
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames != 1:
        raise SeriesError(f"{path}: multi-frame images ({frames} frames) are not supported")
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise SeriesError(f"{path}: only single-sample (greyscale) images are supported")
    if not ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian).is_compressed:
        expected = int(ds.Rows) * int(ds.Columns) * int(ds.get("BitsAllocated") or 16) // 8
        if len(ds.PixelData) < expected:
            raise SeriesError(
                f"{path}: truncated file, PixelData holds {len(ds.PixelData)} bytes of {expected}"
            )
    return ds


def _floats(ds: Dataset, keyword: str, count: int) -> npt.NDArray[np.float64]:
    try:
        values = np.asarray([float(v) for v in ds[keyword].value], dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise SeriesError(f"{_name(ds)}: {keyword} is not numeric ({e})") from e
    if values.shape != (count,) or not np.all(np.isfinite(values)):
        raise SeriesError(f"{_name(ds)}: {keyword} must hold {count} numbers")
    return values


def _check_consistent(datasets: Sequence[Dataset]) -> None:
    """Raise SeriesError unless all instances share series, orientation, size, spacing."""
    series_uids = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(series_uids) > 1:
        raise SeriesError(f"more than one SeriesInstanceUID in the input: {', '.join(series_uids)}")
    first = datasets[0]
    iop0 = _floats(first, "ImageOrientationPatient", 6)
    spacing0 = _floats(first, "PixelSpacing", 2)
    size0 = (int(first.Rows), int(first.Columns))
    for ds in datasets[1:]:
        iop = _floats(ds, "ImageOrientationPatient", 6)
        if np.max(np.abs(iop - iop0)) > ORIENTATION_TOLERANCE:
            raise SeriesError(
                f"{_name(ds)}: ImageOrientationPatient {iop.tolist()} differs from "
                f"{iop0.tolist()} in {_name(first)}"
            )
        size = (int(ds.Rows), int(ds.Columns))
        if size != size0:
            raise SeriesError(
                f"{_name(ds)}: Rows/Columns {size} differ from {size0} in {_name(first)}"
            )
        spacing = _floats(ds, "PixelSpacing", 2)
        if np.max(np.abs(spacing - spacing0)) > PIXEL_SPACING_TOLERANCE_MM:
            raise SeriesError(
                f"{_name(ds)}: PixelSpacing {spacing.tolist()} differs from "
                f"{spacing0.tolist()} in {_name(first)}"
            )


def _directions(
    ds: Dataset,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Unit row, column and normal vectors of an instance."""
    iop = _floats(ds, "ImageOrientationPatient", 6)
    row, col = iop[:3], iop[3:]
    norms = (np.linalg.norm(row), np.linalg.norm(col))
    if min(norms) < 1e-6:
        raise SeriesError(f"{_name(ds)}: ImageOrientationPatient has a zero vector")
    row, col = row / norms[0], col / norms[1]
    if abs(float(row @ col)) > 1e-3:
        raise SeriesError(f"{_name(ds)}: ImageOrientationPatient vectors are not orthogonal")
    normal = np.cross(row, col)
    normal /= np.linalg.norm(normal)
    return row, col, normal


def _sort_and_space(
    datasets: Sequence[Dataset], normal: npt.NDArray[np.float64]
) -> tuple[list[Dataset], float]:
    """Sort instances along ``normal`` and return them with the slice spacing in mm."""
    positions = [_floats(ds, "ImagePositionPatient", 3) for ds in datasets]
    distances = [float(p @ normal) for p in positions]
    order = sorted(range(len(datasets)), key=lambda n: distances[n])
    ordered = [datasets[n] for n in order]
    d = np.asarray([distances[n] for n in order])
    gaps = np.diff(d)
    for n, gap in enumerate(gaps):
        if gap < DUPLICATE_TOLERANCE_MM:
            raise SeriesError(
                f"duplicate slice position {d[n]:.3f} mm along the normal: "
                f"{_name(ordered[n])} and {_name(ordered[n + 1])}"
            )
    spacing = float((d[-1] - d[0]) / (len(d) - 1))
    tolerance = max(SPACING_RELATIVE_TOLERANCE * spacing, SPACING_ABSOLUTE_TOLERANCE_MM)
    n = int(np.argmax(np.abs(gaps - spacing)))  # report the worst gap
    if abs(float(gaps[n]) - spacing) > tolerance:
        raise SeriesError(
            f"irregular slice spacing: {float(gaps[n]):.3f} mm between {_name(ordered[n])} "
            f"and {_name(ordered[n + 1])}, mean spacing {spacing:.3f} mm"
        )
    # The positions must lie on one line along the normal (no shear, e.g. gantry tilt).
    p0 = positions[order[0]]
    for n in order[1:]:
        offset = positions[n] - p0
        in_plane = offset - float(offset @ normal) * normal
        if float(np.linalg.norm(in_plane)) > tolerance:
            raise SeriesError(
                f"{_name(datasets[n])}: ImagePositionPatient is shifted "
                f"{float(np.linalg.norm(in_plane)):.3f} mm within the image plane relative to "
                f"{_name(ordered[0])}; sheared stacks (gantry tilt) are not supported"
            )
    return ordered, spacing


def _stored_pixels(ds: Dataset) -> npt.NDArray[Any]:
    """The stored values of one instance's single frame, checked against its size: for
    uncompressed data a read-only view of the pixel data where pydicom can give one
    (``view_only``; ``ds.pixel_array`` copies it)."""
    try:
        syntax = ds.file_meta.get("TransferSyntaxUID", ImplicitVRLittleEndian)
        # view_only is a decoder option; pydicom annotates **kwargs as one DecodeOptions.
        stored, _ = get_decoder(syntax).as_array(ds, view_only=True)  # type: ignore[arg-type]
    except Exception as e:
        raise SeriesError(f"{_name(ds)}: cannot decode pixel data ({e})") from e
    expected = (int(ds.Rows), int(ds.Columns))
    if stored.shape != expected:
        raise SeriesError(
            f"{_name(ds)}: decoded pixel data has shape {stored.shape}, expected {expected}"
        )
    return stored


def _rescale_into(ds: Dataset, stored: npt.NDArray[Any], out: npt.NDArray[np.float32]) -> None:
    """``stored * RescaleSlope + RescaleIntercept`` into ``out``, as float64 arithmetic
    rounded to float32 gives it. With slope 1, an integral intercept and stored values of
    at most 16 bits every value is an integer below 2**24, so float32 arithmetic is
    exact and skips the float64 copy (the usual CT)."""
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    if slope == 1.0 and intercept.is_integer() and stored.dtype.itemsize <= 2:
        np.add(stored, np.float32(intercept), out=out, dtype=np.float32)
    else:
        out[...] = stored.astype(np.float64) * slope + intercept


def _decode(ds: Dataset) -> npt.NDArray[np.float32]:
    """Decoded, rescaled pixels of one instance as float32."""
    stored = _stored_pixels(ds)
    pixels = np.empty(stored.shape, dtype=np.float32)
    _rescale_into(ds, stored, pixels)
    return pixels


def load_series(
    paths: Iterable[Path],
    read: FileReader = read_file,
    allocate: Callable[[tuple[int, int, int]], npt.NDArray[np.float32]] | None = None,
) -> LoadedSeries:
    """Read, sort, check and decode a series.

    Parameters
    ----------
    paths
        One file per slice, in any order.
    read
        Reads a file whole; whatever it raises (other than :class:`SeriesError`, a
        file that cannot be read) propagates.
    allocate
        Makes the float32 array of the given shape the volume is decoded into (for
        example one mapped from a file); None: a new array in memory.

    Returns
    -------
    LoadedSeries
        The volume (slices sorted so positions increase along the slice normal, voxels
        rescaled to float32) and the headers in the same order, pixel data removed.

    Raises
    ------
    SeriesError
        If a file is unreadable or truncated, has no pixel data, or the instances do not
        form one regular volume (mixed series, orientations, sizes or spacings, missing
        geometry, duplicate or irregularly spaced slices, fewer than 2 slices).
    """
    files = [Path(p) for p in paths]
    if len(files) < 2:
        raise SeriesError(f"a volume needs at least 2 slices; the series has {len(files)}")

    with ThreadPoolExecutor(max_workers=owned_cores()) as pool:
        datasets = list(pool.map(lambda path: _read(path, read), files))
        _check_consistent(datasets)
        row, col, normal = _directions(datasets[0])
        ordered, slice_spacing = _sort_and_space(datasets, normal)
        # Decoded straight into the volume: no list of slices to stack (a copy of the
        # whole volume, and twice the memory).
        shape = (len(ordered), int(ordered[0].Rows), int(ordered[0].Columns))
        voxels = np.empty(shape, dtype=np.float32) if allocate is None else allocate(shape)

        def decode_into(index: int) -> None:
            _rescale_into(ordered[index], _stored_pixels(ordered[index]), voxels[index])

        list(pool.map(decode_into, range(len(ordered))))

    for ds in ordered:
        del ds.PixelData
    first = ordered[0]
    origin = _floats(first, "ImagePositionPatient", 3)
    pixel_spacing = _floats(first, "PixelSpacing", 2)
    volume = Volume(
        voxels=voxels,
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        row_direction=(float(row[0]), float(row[1]), float(row[2])),
        column_direction=(float(col[0]), float(col[1]), float(col[2])),
        spacing_mm=(slice_spacing, float(pixel_spacing[0]), float(pixel_spacing[1])),
        modality=str(first.get("Modality", "")),
    )
    logger.info(
        "loaded series %s: %d slices of %dx%d, spacing %s mm",
        first.get("SeriesInstanceUID", "?"),
        len(ordered),
        int(first.Rows),
        int(first.Columns),
        volume.spacing_mm,
    )
    return LoadedSeries(volume=volume, datasets=tuple(ordered))


def _decode_bright_dense(ds: Dataset) -> npt.NDArray[np.float32]:
    """:func:`_decode`, with MONOCHROME1 (low values white, common on CR/DX) inverted
    so that bright means dense for every radiograph a model sees."""
    pixels = _decode(ds)
    if str(ds.get("PhotometricInterpretation", "")) != "MONOCHROME1":
        return pixels
    if int(ds.get("PixelRepresentation") or 0):
        return -pixels
    top = float((1 << int(ds.get("BitsStored") or 16)) - 1)
    slope = float(ds.get("RescaleSlope") or 1.0)
    intercept = float(ds.get("RescaleIntercept") or 0.0)
    return ((top * slope + 2 * intercept) - pixels).astype(np.float32)


def _nominal_spacing(ds: Dataset) -> tuple[float, float]:
    """PixelSpacing, else ImagerPixelSpacing, else 1 mm (row, column spacing)."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        if ds.get(keyword) is None:
            continue
        try:
            values = [float(v) for v in ds[keyword].value]
        except (TypeError, ValueError):
            continue
        if len(values) == 2 and all(np.isfinite(v) and v > 0 for v in values):
            return values[0], values[1]
    return 1.0, 1.0


def _image_volume(ds: Dataset, pixels: npt.NDArray[np.float32]) -> Volume:
    origin, row, col = (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
    try:
        if ds.get("ImagePositionPatient") is not None and ds.get("ImageOrientationPatient"):
            position = _floats(ds, "ImagePositionPatient", 3)
            row_v, col_v, _ = _directions(ds)
            origin = (float(position[0]), float(position[1]), float(position[2]))
            row = (float(row_v[0]), float(row_v[1]), float(row_v[2]))
            col = (float(col_v[0]), float(col_v[1]), float(col_v[2]))
    except SeriesError:
        pass  # a projection image's geometry is informative only; keep the nominal one
    row_spacing, column_spacing = _nominal_spacing(ds)
    return Volume(
        voxels=pixels[None],
        origin=origin,
        row_direction=row,
        column_direction=col,
        spacing_mm=(1.0, row_spacing, column_spacing),
        modality=str(ds.get("Modality", "")),
    )


def load_images(paths: Iterable[Path], read: FileReader = read_file) -> list[LoadedSeries]:
    """Read and decode each instance on its own, as a one-slice volume.

    Parameters
    ----------
    paths
        One file per image (CR, DX, MG, or any single-frame greyscale image).
    read
        As :func:`load_series`'s.

    Returns
    -------
    list[LoadedSeries]
        One per file, ordered by InstanceNumber (then file name). MONOCHROME1 images are
        inverted so that bright means dense; geometry missing from the header is nominal
        (see :class:`models.base.Volume`).

    Raises
    ------
    SeriesError
        If there is no file, or a file is unreadable, truncated, multi-frame or colour.
    """
    files = sorted(Path(p) for p in paths)
    if not files:
        raise SeriesError("the series has no instances")
    with ThreadPoolExecutor(max_workers=owned_cores()) as pool:
        datasets = list(pool.map(lambda path: _read(path, read, geometry=False), files))
        pixels = list(pool.map(_decode_bright_dense, datasets))
    images = []
    for ds, image in zip(datasets, pixels, strict=True):
        del ds.PixelData
        images.append(LoadedSeries(volume=_image_volume(ds, image), datasets=(ds,)))
    images.sort(key=lambda loaded: int(loaded.datasets[0].get("InstanceNumber") or 0))
    logger.info(
        "loaded %d images of series %s", len(images), datasets[0].get("SeriesInstanceUID", "?")
    )
    return images


def resample_onto(moving: Volume, target: Volume) -> npt.NDArray[np.float32]:
    """``moving``'s values at the centres of ``target``'s voxels, related through
    patient space (trilinear; outside ``moving``, its lowest value: air on CT, 0 on MR).

    For a multi-series model, every input on the reference series' grid. A series
    already on that grid is returned as it is.
    """
    from scipy import ndimage

    matrix = np.linalg.inv(moving.ras_affine) @ target.ras_affine
    if moving.voxels.shape == target.voxels.shape and np.allclose(matrix, np.eye(4), atol=1e-6):
        return moving.voxels
    resampled = ndimage.affine_transform(
        moving.voxels,
        matrix[:3, :3],
        offset=matrix[:3, 3],
        output_shape=target.voxels.shape,
        order=1,
        mode="constant",
        cval=float(moving.voxels.min()),
    )
    return np.asarray(resampled, dtype=np.float32)
