"""Test data: synthetic and real CT volumes, and writers for CT series (valid and broken).

Every writer produces files that ``dciodvfy`` accepts without errors, so tests exercise
the same kind of input a scanner sends.
"""

from __future__ import annotations

import functools
import plistlib
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

__all__ = [
    "CRANIUM_PATH",
    "SEG_GEOMETRIES",
    "ChestPhantom",
    "Geometry",
    "Orientation",
    "chest_phantom",
    "cranium_hu",
    "orientation_cosines",
    "rotated_about_y",
    "write_broken_file",
    "write_ct_series",
]

#: The real head CT shipped by the Debian package ``invesalius-examples``.
CRANIUM_PATH = Path("/usr/share/doc/invesalius-examples/examples/Cranium.inv3")

#: HU values of the chest phantom's materials.
AIR_HU = -1000
SOFT_TISSUE_HU = 40
LUNG_HU = -850
BONE_HU = 700

Vector3 = tuple[float, float, float]
Orientation = Literal["axial", "sagittal", "coronal", "oblique"]

Cosines = tuple[Sequence[float], Sequence[float]]


def rotated_about_y(degrees: float) -> Cosines:
    """Axial cosines turned about the patient's y (anterior-posterior) axis."""
    a = np.deg2rad(degrees)
    return (float(np.cos(a)), 0.0, float(-np.sin(a))), (0.0, 1.0, 0.0)


@dataclass(frozen=True)
class Geometry:
    """How a test CT series is written (``empty_end_slices``: for the test to make)."""

    orientation: Orientation | Cosines = "axial"
    feet_first: bool = False
    shuffle: bool = False
    empty_end_slices: bool = False

    def series_options(self) -> dict[str, Any]:
        """The :func:`write_ct_series` arguments of this geometry."""
        return {"orientation": self.orientation, "feet_first": self.feet_first,
                "shuffle": self.shuffle}  # fmt: skip


#: Every geometry the SEG tests write a series in.
SEG_GEOMETRIES = {
    "axial-head-first": Geometry(),
    "axial-feet-first": Geometry(feet_first=True),
    "axial-shuffled": Geometry(shuffle=True),
    "axial-feet-first-shuffled": Geometry(feet_first=True, shuffle=True),
    # Row +x, column -y: the slice normal points to the feet (-z).
    "axial-normal-to-feet": Geometry(orientation=((1.0, 0.0, 0.0), (0.0, -1.0, 0.0))),
    "sagittal": Geometry(orientation="sagittal"),
    "coronal": Geometry(orientation="coronal"),
    "coronal-feet-first": Geometry(orientation="coronal", feet_first=True),
    # Axial turned 20 degrees about x, then 15 degrees about z.
    "oblique-named": Geometry(orientation="oblique"),
    "oblique-30-about-y": Geometry(orientation=rotated_about_y(30.0)),
    # First and last slice hold no label at all, so no frame of the SEG covers them.
    "axial-empty-end-slices": Geometry(empty_end_slices=True),
}


_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_COMPRESSED = (RLELossless, JPEG2000Lossless)


@dataclass(frozen=True)
class ChestPhantom:
    """A synthetic chest CT with exact masks of what it contains.

    Attributes
    ----------
    hu
        CT numbers as int16, shape (slices, rows, columns).
    spacing_mm
        (between slices, between rows, between columns) in mm.
    body
        Whole body outline, lungs and spine included.
    lungs
        Both lungs.
    spine
        The spine (bone).
    """

    hu: npt.NDArray[np.int16]
    spacing_mm: Vector3
    body: npt.NDArray[np.bool_]
    lungs: npt.NDArray[np.bool_]
    spine: npt.NDArray[np.bool_]

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in mL."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def expected_labels(self) -> npt.NDArray[np.uint8]:
        """The exclusive label map ct-tissue must produce: 1 soft tissue, 2 lung, 3 bone."""
        labels = np.zeros(self.hu.shape, dtype=np.uint8)
        labels[self.body] = 1
        labels[self.lungs] = 2
        labels[self.spine] = 3
        return labels


def _ellipse(
    rows: int, cols: int, center: tuple[float, float], semi_axes: tuple[float, float]
) -> npt.NDArray[np.bool_]:
    """Pixels whose centres lie inside an axis-aligned ellipse (row, column units)."""
    j, i = np.mgrid[0:rows, 0:cols].astype(np.float64)
    inside = ((j - center[0]) / semi_axes[0]) ** 2 + ((i - center[1]) / semi_axes[1]) ** 2
    return np.asarray(inside <= 1.0)


def chest_phantom(
    shape: tuple[int, int, int] = (40, 128, 128),
    spacing_mm: Vector3 = (2.5, 1.5, 1.5),
) -> ChestPhantom:
    """A synthetic chest CT: body, two lungs and a spine as uniform elliptic cylinders.

    Air (-1000 HU) surrounds an elliptic body (40 HU) that runs through every slice. Two
    lungs (-850 HU) lie fully inside the body in every slice, and a round spine (700 HU)
    lies posterior (towards higher row indices, i.e. +y for an axial HFS series). There is
    no noise and no partial volume, so thresholding recovers the masks exactly. Sizes scale
    with ``shape``.

    Parameters
    ----------
    shape
        (slices, rows, columns); rows and columns at least 32.
    spacing_mm
        (between slices, between rows, between columns) in mm.

    Returns
    -------
    ChestPhantom
        The volume and its exact masks.

    Raises
    ------
    ValueError
        If the shape is too small, or a lung would hold 100 mL or less or be thinner than
        40 mm.
    """
    n_slices, rows, cols = shape
    if n_slices < 1 or rows < 32 or cols < 32:
        raise ValueError(f"shape must have 1+ slices and 32+ rows and columns. Found {shape}.")
    cy, cx = (rows - 1) / 2.0, (cols - 1) / 2.0
    body_2d = _ellipse(rows, cols, (cy, cx), (0.33 * rows, 0.44 * cols))
    lung_axes = (0.2 * rows, 0.12 * cols)
    lung_center_row = cy - 0.03 * rows
    right_2d = _ellipse(rows, cols, (lung_center_row, cx - 0.2 * cols), lung_axes)
    left_2d = _ellipse(rows, cols, (lung_center_row, cx + 0.2 * cols), lung_axes)
    spine_radius = 0.06 * min(rows, cols)
    spine_2d = _ellipse(rows, cols, (cy + 0.24 * rows, cx), (spine_radius, spine_radius))
    lungs_2d = right_2d | left_2d
    # The shapes are disjoint and inside the body by construction; check it anyway.
    assert not (lungs_2d & spine_2d).any()
    assert not ((lungs_2d | spine_2d) & ~body_2d).any()

    lung_thickness_mm = 2.0 * min(lung_axes[0] * spacing_mm[1], lung_axes[1] * spacing_mm[2])
    if lung_thickness_mm < 40.0:
        raise ValueError(
            f"the lungs would be {lung_thickness_mm:.1f} mm thick; choose a larger shape or "
            f"spacing_mm so they are at least 40 mm thick (ct-tissue drops thin air pockets)."
        )
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    for name, lung in (("right", right_2d), ("left", left_2d)):
        volume_ml = float(lung.sum()) * n_slices * voxel_ml
        if volume_ml <= 100.0:
            raise ValueError(
                f"the {name} lung would hold {volume_ml:.1f} mL; choose a larger shape or "
                f"spacing_mm so each lung exceeds 100 mL."
            )

    def stack(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
        return np.ascontiguousarray(np.broadcast_to(mask, shape))

    body, lungs, spine = stack(body_2d), stack(lungs_2d), stack(spine_2d)
    hu = np.full(shape, AIR_HU, dtype=np.int16)
    hu[body] = SOFT_TISSUE_HU
    hu[lungs] = LUNG_HU
    hu[spine] = BONE_HU
    return ChestPhantom(
        hu=hu,
        spacing_mm=(float(spacing_mm[0]), float(spacing_mm[1]), float(spacing_mm[2])),
        body=body,
        lungs=lungs,
        spine=spine,
    )


@functools.cache
def _read_cranium() -> tuple[bytes, Vector3, tuple[int, int, int]]:
    with tarfile.open(CRANIUM_PATH, "r:gz") as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        main_file = tar.extractfile(members["main.plist"])
        assert main_file is not None
        main = plistlib.load(main_file)
        matrix = main["matrix"]
        if matrix["dtype"] != "int16":
            raise ValueError(f"{CRANIUM_PATH}: expected an int16 matrix, found {matrix['dtype']}")
        data_file = tar.extractfile(members[matrix["filename"]])
        assert data_file is not None
        raw = data_file.read()
    n_slices, rows, cols = (int(n) for n in matrix["shape"])
    # InVesalius stores spacing as (x, y, z) = (column, row, slice).
    sx, sy, sz = (float(s) for s in main["spacing"])
    return raw, (sz, sy, sx), (n_slices, rows, cols)


def cranium_hu() -> tuple[npt.NDArray[np.int16], Vector3]:
    """The head CT from ``invesalius-examples`` (Cranium.inv3) in HU.

    The project file is a gzip tar; ``main.plist`` describes ``matrix.dat``, a raw
    little-endian int16 volume of shape (108, 256, 256) (slices, rows, columns) already
    in HU (-1024 to 2986), with spacing (x, y, z) = (0.957, 0.957, 1.5) mm.

    Returns
    -------
    tuple
        The volume (int16, (slices, rows, columns)) and its spacing in mm as
        (between slices, between rows, between columns).

    Raises
    ------
    FileNotFoundError
        If the Debian package ``invesalius-examples`` is not installed.
    """
    raw, spacing, shape = _read_cranium()
    hu = np.frombuffer(raw, dtype="<i2").reshape(shape).astype(np.int16)
    return hu, spacing


def _unit(v: Sequence[float]) -> npt.NDArray[np.float64]:
    a = np.asarray(v, dtype=np.float64)
    return np.asarray(a / np.linalg.norm(a))


def orientation_cosines(
    orientation: Orientation | tuple[Sequence[float], Sequence[float]],
) -> tuple[Vector3, Vector3]:
    """Row and column direction cosines (ImageOrientationPatient) of an orientation.

    Parameters
    ----------
    orientation
        ``"axial"`` (row +x, column +y), ``"sagittal"`` (row +y, column -z),
        ``"coronal"`` (row +x, column -z), ``"oblique"`` (axial turned 20 degrees about
        x, then 15 degrees about z), or explicit (row, column) direction cosines.

    Returns
    -------
    tuple
        (row direction, column direction) as unit vectors.

    Raises
    ------
    ValueError
        If the name is unknown or explicit cosines are not orthogonal.
    """
    if isinstance(orientation, str):
        if orientation == "axial":
            return (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)
        if orientation == "sagittal":
            return (0.0, 1.0, 0.0), (0.0, 0.0, -1.0)
        if orientation == "coronal":
            return (1.0, 0.0, 0.0), (0.0, 0.0, -1.0)
        if orientation == "oblique":
            a, b = np.deg2rad(20.0), np.deg2rad(15.0)
            rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
            rz = np.array([[np.cos(b), -np.sin(b), 0], [np.sin(b), np.cos(b), 0], [0, 0, 1]])
            r = rz @ rx
            row_v, col_v = r[:, 0], r[:, 1]
        else:
            raise ValueError(
                "orientation must be 'axial', 'sagittal', 'coronal', 'oblique' or "
                f"(row, column) cosines. Found {orientation!r}."
            )
    else:
        row_v, col_v = _unit(orientation[0]), _unit(orientation[1])
        if abs(float(row_v @ col_v)) > 1e-6:
            raise ValueError(f"row and column cosines must be orthogonal. Found {orientation}.")
    return (
        (float(row_v[0]), float(row_v[1]), float(row_v[2])),
        (float(col_v[0]), float(col_v[1]), float(col_v[2])),
    )


def _ds(value: float) -> str:
    """A DS string of at most 16 characters, as precise as that allows."""
    for digits in range(12, 0, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    raise ValueError(f"cannot format {value} as DS")


@dataclass(frozen=True)
class _SeriesIdentity:
    """What every slice of one written series shares: patient, study, series, frame."""

    patient_name: str
    patient_id: str
    patient_sex: str
    study_instance_uid: str
    study_description: str
    series_instance_uid: str
    series_number: int
    series_description: str
    frame_of_reference_uid: str
    modality: str
    body_part: str
    patient_position: str
    date: str
    time: str

    @classmethod
    def new(
        cls,
        *,
        study_instance_uid: str | None,
        series_instance_uid: str | None,
        frame_of_reference_uid: str | None,
        **fields: Any,
    ) -> _SeriesIdentity:
        """An identity dated now, with new UIDs where None is given."""
        now = datetime.now()
        return cls(
            study_instance_uid=study_instance_uid or generate_uid(),
            series_instance_uid=series_instance_uid or generate_uid(),
            frame_of_reference_uid=frame_of_reference_uid or generate_uid(),
            date=now.strftime("%Y%m%d"),
            time=now.strftime("%H%M%S"),
            **fields,
        )


def _slice_dataset(
    series: _SeriesIdentity,
    *,
    sop_class_uid: str,
    image_type: Sequence[str],
    instance_number: int,
    position: npt.NDArray[np.float64],
    row_dir: npt.ArrayLike,
    col_dir: npt.ArrayLike,
    shape: tuple[int, int],
    pixel_spacing: tuple[float, float],
    slice_thickness: float,
    signed: bool,
) -> Dataset:
    """One slice's header with the attributes the CT and MR writers have in common:
    patient, study, series, frame of reference, image plane and image pixel modules."""
    normal = np.cross(np.asarray(row_dir, np.float64), np.asarray(col_dir, np.float64))
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = list(image_type)
    ds.SOPClassUID = sop_class_uid
    ds.SOPInstanceUID = generate_uid()
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = series.date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = series.time
    ds.AccessionNumber = ""
    ds.Modality = series.modality
    ds.Manufacturer = "pacsnode tests"
    ds.InstitutionName = "pacsnode"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = series.study_description
    ds.SeriesDescription = series.series_description
    ds.ManufacturerModelName = "dicom_factory"
    ds.PatientName = series.patient_name
    ds.PatientID = series.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = series.patient_sex
    ds.BodyPartExamined = series.body_part
    ds.SliceThickness = _ds(slice_thickness)
    ds.PatientPosition = series.patient_position
    ds.StudyInstanceUID = series.study_instance_uid
    ds.SeriesInstanceUID = series.series_instance_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series.series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(float(v)) for v in position]
    cosines = np.concatenate([np.asarray(row_dir, np.float64), np.asarray(col_dir, np.float64)])
    ds.ImageOrientationPatient = [_ds(float(v) + 0.0) for v in cosines]
    ds.FrameOfReferenceUID = series.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(position @ normal))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = shape
    ds.PixelSpacing = [_ds(pixel_spacing[0]), _ds(pixel_spacing[1])]
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 1 if signed else 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def write_ct_series(
    hu: npt.ArrayLike,
    out_dir: Path,
    *,
    spacing_mm: Sequence[float],
    orientation: Orientation | tuple[Sequence[float], Sequence[float]] = "axial",
    origin: Sequence[float] = (-100.0, -120.0, -50.0),
    feet_first: bool = False,
    patient_id: str = "PHANTOM-001",
    patient_name: str = "Phantom^Chest",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "Synthetic CT",
    image_type: Sequence[str] = ("ORIGINAL", "PRIMARY", "AXIAL"),
    transfer_syntax: str = ExplicitVRLittleEndian,
    signed: bool = True,
    rescale_slope: float = 1.0,
    modality: str = "CT",
    shuffle: bool = False,
) -> list[Path]:
    """Write a volume as a CT Image Storage series, one file per slice.

    Voxel ``hu[k, j, i]`` (slice, row, column) is placed at patient position::

        origin + k * spacing_mm[0] * normal + j * spacing_mm[1] * column_dir
               + i * spacing_mm[2] * row_dir

    with ``normal = row_dir x column_dir``, so a correct loader returns ``hu`` unchanged.

    Parameters
    ----------
    hu
        CT numbers, shape (slices, rows, columns); stored exactly if they fit the pixel
        representation after rescaling.
    out_dir
        Folder for the files (created if missing); files are named ``ct_0001.dcm`` ... in
        InstanceNumber order.
    spacing_mm
        (between slices, PixelSpacing[0] = between rows, PixelSpacing[1] = between columns).
    orientation
        A named orientation or explicit (row, column) direction cosines; see
        :func:`orientation_cosines`.
    origin
        ImagePositionPatient of slice 0.
    feet_first
        Record PatientPosition FFS and number instances against the slice normal (instance
        1 is the last slice of ``hu``), so file order is the reverse of position order.
    patient_id, patient_name
        Patient identification.
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        UIDs; new ones are generated when None.
    series_number, series_description, image_type, modality
        Series attributes; ``modality`` other than CT is for negative tests only.
    transfer_syntax
        Explicit or Implicit VR Little Endian, RLE Lossless or JPEG 2000 Lossless.
    signed
        Store signed pixels with RescaleIntercept 0, or unsigned ones with intercept -1024.
    rescale_slope
        RescaleSlope; stored values are ``round((hu - intercept) / slope)``.
    shuffle
        Return the paths in a random (seeded) order instead of InstanceNumber order.

    Returns
    -------
    list of Path
        The written files.

    Raises
    ------
    ValueError
        If ``hu`` is not 3-D, the transfer syntax is not supported, or values do not fit.
    """
    volume = np.asarray(hu)
    if volume.ndim != 3:
        raise ValueError(f"hu must be 3-D (slices, rows, columns). Found shape {volume.shape}.")
    ts = UID(transfer_syntax)
    if ts not in _UNCOMPRESSED + _COMPRESSED:
        raise ValueError(f"transfer_syntax {ts.name} is not supported by this writer.")
    n_slices, rows, cols = volume.shape
    row_dir, col_dir = orientation_cosines(orientation)
    normal = np.cross(row_dir, col_dir)
    origin_v = np.asarray(origin, dtype=np.float64)

    intercept = 0.0 if signed else -1024.0
    stored = np.round((volume.astype(np.float64) - intercept) / rescale_slope)
    dtype = np.dtype(np.int16 if signed else np.uint16)
    info = np.iinfo(dtype)
    if stored.min() < info.min or stored.max() > info.max:
        raise ValueError(
            f"hu does not fit {dtype} after rescaling (slope {rescale_slope}, intercept "
            f"{intercept}); range {stored.min()}..{stored.max()}."
        )
    pixels = stored.astype(dtype)

    identity = _SeriesIdentity.new(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_sex="O",
        study_description="Synthetic study",
        series_number=series_number,
        series_description=series_description,
        modality=modality,
        body_part="CHEST",
        patient_position="FFS" if feet_first else "HFS",
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(n_slices):
        instance_number = n_slices - k if feet_first else k + 1
        position = origin_v + k * float(spacing_mm[0]) * normal

        ds = _slice_dataset(
            identity,
            sop_class_uid=CTImageStorage,
            image_type=image_type,
            instance_number=instance_number,
            position=position,
            row_dir=row_dir,
            col_dir=col_dir,
            shape=(rows, cols),
            pixel_spacing=(float(spacing_mm[1]), float(spacing_mm[2])),
            slice_thickness=float(spacing_mm[0]),
            signed=signed,
        )
        ds.KVP = "120"
        ds.WindowCenter = "40"  # soft tissue, as a scanner would set it
        ds.WindowWidth = "400"
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(rescale_slope)
        ds.RescaleType = "HU"
        ds.file_meta.TransferSyntaxUID = ts if ts in _UNCOMPRESSED else ExplicitVRLittleEndian
        frame = np.ascontiguousarray(pixels[k])
        if ts in _COMPRESSED:
            ds.compress(ts, frame, generate_instance_uid=False)
        else:
            ds.PixelData = frame.tobytes()

        path = out_dir / f"ct_{instance_number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)

    paths.sort()
    if shuffle:
        order = np.random.default_rng(12345).permutation(len(paths))
        paths = [paths[int(n)] for n in order]
    return paths


def write_broken_file(
    source: Path, target: Path, *, kind: Literal["truncated", "short_pixel_data", "no_pixel_data"]
) -> Path:
    """Write a broken copy of a valid DICOM file.

    Parameters
    ----------
    source
        A valid DICOM file.
    target
        Where to write the copy (may equal ``source`` to break it in place).
    kind
        ``"truncated"``: the first half of the bytes (not parseable, so no DICOM peer will
        send it); ``"short_pixel_data"``: a well-formed file whose PixelData holds only
        half the image, as an image truncated before it was sent; ``"no_pixel_data"``:
        the dataset re-written without PixelData.

    Returns
    -------
    Path
        ``target``.

    Raises
    ------
    ValueError
        If ``kind`` is unknown.
    """
    if kind == "truncated":
        data = source.read_bytes()
        target.write_bytes(data[: len(data) // 2])
    elif kind == "short_pixel_data":
        ds = dcmread(source)
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]
        ds.save_as(target, enforce_file_format=True)
    elif kind == "no_pixel_data":
        ds = dcmread(source)
        del ds.PixelData
        ds.save_as(target, enforce_file_format=True)
    else:
        raise ValueError(
            f"kind must be 'truncated', 'short_pixel_data' or 'no_pixel_data'. Found {kind!r}."
        )
    return target


#: A real T1-weighted head MR (the "Colin 27" average in MNI space, 181x217x181 at 1 mm)
#: shipped by the Debian package ``mricron-data``.
CH2_PATH = Path("/usr/share/mricron/templates/ch2.nii.gz")
#: The same head brain-extracted with BET (same grid as :data:`CH2_PATH`).
CH2_BET_PATH = Path("/usr/share/mricron/templates/ch2bet.nii.gz")

#: NIfTI RAS+ world coordinates -> DICOM LPS+ patient coordinates (and back).
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_to_dicom_array(
    data: npt.NDArray[np.generic], affine: npt.ArrayLike
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.int64], npt.NDArray[np.bool_]]:
    """Reorder a NIfTI array into the axial (slice, row, column) order of the DICOM writer.

    The NIfTI voxel axes closest to R, A and S become columns running to the patient's
    left, rows running posterior, and slices running superior: DICOM's usual axial view.

    Returns
    -------
    tuple
        The reordered array, and for each DICOM axis (slice, row, column) the NIfTI axis it
        comes from and whether that axis is reversed.

    Raises
    ------
    ValueError
        If ``data`` is not 3-D or the affine does not have one voxel axis per world axis.
    """
    if data.ndim != 3:
        raise ValueError(f"data must be 3-D. Found shape {data.shape}.")
    a = np.asarray(affine, dtype=np.float64)[:3, :3]
    nifti_axis_of_world = np.argmax(np.abs(a), axis=1)  # for R, A, S
    if sorted(nifti_axis_of_world.tolist()) != [0, 1, 2]:
        raise ValueError(f"affine must have one voxel axis per world axis. Found {a.tolist()}.")
    # DICOM slices run superior (+S), rows posterior (-A), columns to the left (-R).
    world = (2, 1, 0)
    wanted_sign = (1.0, -1.0, -1.0)
    axes = np.asarray([nifti_axis_of_world[w] for w in world], dtype=np.int64)
    flips = np.asarray(
        [np.sign(a[w, axes[n]]) != wanted_sign[n] for n, w in enumerate(world)], dtype=np.bool_
    )
    array = np.transpose(data, axes)
    array = np.flip(array, axis=tuple(int(n) for n in np.flatnonzero(flips)))
    return np.ascontiguousarray(array), axes, flips


def write_mr_series_from_nifti(
    nifti_path: Path,
    out_dir: Path,
    *,
    patient_id: str,
    patient_name: str = "Colin27^Template",
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    series_description: str = "T1 3D FLASH",
    signed: bool = True,
) -> list[Path]:
    """Write a 3-D NIfTI image as an axial MR Image Storage series, one file per slice.

    The NIfTI affine (RAS+) is converted to DICOM patient coordinates (LPS+); the voxel
    axes closest to S, A and R become slices (running superior), rows (running posterior)
    and columns (running to the patient's left), see :func:`nifti_to_dicom_array`. The
    acquisition attributes describe the 3-D spoiled gradient echo (FLASH) of the Colin 27
    scans: TR 18 ms, TE 10 ms, flip angle 30 degrees at 1.5 T.

    Parameters
    ----------
    nifti_path
        A 3-D NIfTI file, e.g. :data:`CH2_PATH`.
    out_dir
        Folder for the files (created if missing), named ``mr_0001.dcm`` ... from inferior
        to superior.
    patient_id, patient_name
        Patient identification.
    study_instance_uid, series_instance_uid, frame_of_reference_uid
        UIDs; new ones are generated when None.
    series_number, series_description
        Series attributes.
    signed
        Store int16 pixels, or uint16 ones. Integer images that fit are stored exactly
        (RescaleSlope 1, RescaleIntercept 0); others are scaled linearly onto the full
        range with RescaleSlope / RescaleIntercept.

    Returns
    -------
    list of Path
        The written files, from inferior to superior.

    Raises
    ------
    TypeError
        If the file is not a spatial image (one with an affine).
    ValueError
        If the image is not 3-D, its voxel axes are sheared or do not follow the world
        axes one to one, or it holds non-finite values.
    """
    import nibabel as nib
    from pydicom.uid import MRImageStorage

    img = nib.load(nifti_path)
    if not isinstance(img, nib.spatialimages.SpatialImage):
        raise TypeError(f"{nifti_path}: not an image with an affine. Found {type(img).__name__}.")
    data = np.asarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{nifti_path}: image must be 3-D. Found shape {data.shape}.")
    if not np.all(np.isfinite(data)):
        raise ValueError(f"{nifti_path}: image holds non-finite values.")
    affine_ras = np.asarray(img.affine, dtype=np.float64)
    array, axes, flips = nifti_to_dicom_array(data, affine_ras)
    n_slices, rows, cols = array.shape

    # LPS position of NIfTI voxel v is lps[:, :3] @ v + lps[:, 3].
    lps = _RAS_TO_LPS @ affine_ras[:3, :]
    steps = [lps[:, axes[n]] * (-1.0 if flips[n] else 1.0) for n in range(3)]
    spacing = [float(np.linalg.norm(s)) for s in steps]
    slice_dir, col_dir, row_dir = (s / d for s, d in zip(steps, spacing, strict=True))
    directions = np.stack([slice_dir, col_dir, row_dir])
    if float(np.max(np.abs(directions @ directions.T - np.eye(3)))) > 1e-4:
        raise ValueError(f"{nifti_path}: sheared voxel axes cannot be written as DICOM slices.")
    # Voxel (k, j, i) = (0, 0, 0) of the reordered array, as a NIfTI voxel index.
    corner = np.zeros(3)
    for n in range(3):
        if flips[n]:
            corner[axes[n]] = data.shape[axes[n]] - 1
    origin = lps[:, :3] @ corner + lps[:, 3]

    dtype = np.dtype(np.int16 if signed else np.uint16)
    info = np.iinfo(dtype)
    values = array.astype(np.float64)
    low, high = float(values.min()), float(values.max())
    integral = bool(np.all(values == np.round(values)))
    if integral and low >= info.min and high <= info.max:
        slope, intercept = 1.0, 0.0
    else:
        slope = (high - low) / float(info.max - info.min) if high > low else 1.0
        intercept = low - float(info.min) * slope
    pixels = np.clip(np.round((values - intercept) / slope), info.min, info.max).astype(dtype)

    window_low, window_high = np.percentile(values, [1.0, 99.5])
    identity = _SeriesIdentity.new(
        study_instance_uid=study_instance_uid,
        series_instance_uid=series_instance_uid,
        frame_of_reference_uid=frame_of_reference_uid,
        patient_name=patient_name,
        patient_id=patient_id,
        patient_sex="M",
        study_description="MR head",
        series_number=series_number,
        series_description=series_description,
        modality="MR",
        body_part="HEAD",
        patient_position="HFS",
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for k in range(n_slices):
        position = origin + k * spacing[0] * slice_dir

        ds = _slice_dataset(
            identity,
            sop_class_uid=MRImageStorage,
            image_type=("ORIGINAL", "PRIMARY", "OTHER"),
            instance_number=k + 1,
            position=position,
            row_dir=row_dir,
            col_dir=col_dir,
            shape=(rows, cols),
            pixel_spacing=(spacing[1], spacing[2]),
            slice_thickness=spacing[0],
            signed=signed,
        )
        ds.ScanningSequence = "GR"
        ds.SequenceVariant = "SP"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "3D"
        ds.RepetitionTime = "18"
        ds.EchoTime = "10"
        ds.NumberOfAverages = "1"
        ds.ImagingFrequency = "63.87"
        ds.ImagedNucleus = "1H"
        ds.EchoNumbers = "1"
        ds.MagneticFieldStrength = "1.5"
        ds.SpacingBetweenSlices = _ds(spacing[0])
        ds.EchoTrainLength = "1"
        ds.FlipAngle = "30"
        ds.WindowCenter = _ds(float(window_low + window_high) / 2.0)
        ds.WindowWidth = _ds(max(float(window_high - window_low), 1.0))
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        ds.RescaleType = "US"
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.PixelData = np.ascontiguousarray(pixels[k]).tobytes()

        path = out_dir / f"mr_{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


__all__ += ["CH2_BET_PATH", "CH2_PATH", "nifti_to_dicom_array", "write_mr_series_from_nifti"]


DX_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def pydicom_data_file(name: str) -> Path:
    """A file of the PyPI package pydicom-data (a test dependency), e.g. ``RG1_UNCR.dcm``,
    a real computed radiograph, read from the installed package (no download)."""
    import data_store  # type: ignore[import-untyped]

    path = Path(data_store.__file__).parent / "data" / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not in the installed pydicom-data package")
    return path


def write_radiographs(
    images: Sequence[npt.NDArray[np.uint16]],
    out_dir: Path,
    *,
    monochrome1: bool = False,
    bits_stored: int = 12,
    imager_pixel_spacing_mm: float = 0.15,
    patient_id: str = "XR-001",
    modality: str = "DX",
) -> list[Path]:
    """Write 2-D images as one DX series, one file per image, without patient geometry.

    Parameters
    ----------
    images
        Stored pixel values (MONOCHROME2: bright is dense), one array per image.
    out_dir
        Folder for the files (created if missing), named ``dx_0001.dcm`` ... in order.
    monochrome1
        Store each image inverted within ``bits_stored`` as MONOCHROME1 (low is dense),
        as many CR/DX devices do; a correct reader gets back the same image.
    bits_stored
        BitsStored; values must fit.
    imager_pixel_spacing_mm
        ImagerPixelSpacing (rows and columns); no PixelSpacing, ImagePositionPatient or
        ImageOrientationPatient, as on most projection radiographs.
    patient_id
        PatientID (and name suffix).
    modality
        DX or CR.

    Returns
    -------
    list of Path
        The written files, in InstanceNumber order.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), generate_uid()
    now = datetime.now()
    top = (1 << bits_stored) - 1
    paths = []
    for number, image in enumerate(images, start=1):
        pixels = np.asarray(image, dtype=np.uint16)
        if pixels.ndim != 2 or int(pixels.max(initial=0)) > top:
            raise ValueError(f"image {number} must be 2-D with values up to {top}")
        if monochrome1:
            pixels = (top - pixels).astype(np.uint16)
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.ImageType = ["ORIGINAL", "PRIMARY"]
        ds.SOPClassUID = DX_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.AccessionNumber = ""
        ds.Modality = modality
        ds.Manufacturer = "pacsnode tests"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "Synthetic chest radiograph"
        ds.SeriesDescription = "Synthetic DX"
        ds.PatientName = f"Phantom^{patient_id}"
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.PresentationIntentType = "FOR PRESENTATION"
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = number
        ds.ImagerPixelSpacing = [_ds(imager_pixel_spacing_mm)] * 2
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME1" if monochrome1 else "MONOCHROME2"
        ds.Rows, ds.Columns = pixels.shape
        ds.BitsAllocated = 16
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"dx_{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def demo_radiographs(truth: Sequence[bool], seed: int) -> list[npt.NDArray[np.uint16]]:
    """Synthetic radiographs from the xr-nodule-demo training script's own generator (an
    opacity where ``truth`` says so), with a seed of the caller's; training uses 7 and
    1007, so pick another."""
    import importlib.util

    script = Path(__file__).resolve().parents[1] / "models" / "bundles" / "xr-nodule-demo"
    spec = importlib.util.spec_from_file_location(
        "xr_nodule_train", script / "scripts" / "train_classifier.py"
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the training script under {script}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rng = np.random.default_rng(seed)
    return [module.synthetic_radiograph(rng, nodule=bool(n)) for n in truth]


__all__ += ["header"]


def header(**attributes: Any) -> Dataset:
    """A bare header with these attributes (keyword=value), as rules and routing read it."""
    ds = Dataset()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds
