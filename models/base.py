"""The model contract: what a model receives, what it declares and what it returns.

A model sees a :class:`Volume` (voxels in a fixed array order with the geometry that
places them in patient space). A :class:`SegmentationModel` returns a label map of the
same shape; a :class:`ClassificationModel` returns one probability per class, for a
whole series (3-D) or for each image of it (2-D projection images such as CR, DX, MG).
Everything DICOM-specific (which instances, which UIDs) stays in ``workers/``, so a
model never needs pydicom.
"""

from __future__ import annotations

import abc
import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import numpy as np
import numpy.typing as npt

__all__ = [
    "QUEUES",
    "Accepts",
    "ClassSpec",
    "ClassificationModel",
    "Code",
    "InputKindValues",
    "LabelSpec",
    "Model",
    "ModelError",
    "OrientationValues",
    "Queue",
    "SegmentationModel",
    "Volume",
    "orientation_of",
]


#: The Celery queues a model runs on: ``gpu`` (a worker with a GPU takes it first) or
#: ``cpu``.
Queue = Literal["gpu", "cpu"]
QUEUES: tuple[Queue, ...] = get_args(Queue)


@dataclass(frozen=True)
class Code:
    """A coded concept (value, scheme, meaning), e.g. ``Code("39607008", "SCT", "Lung")``."""

    value: str
    scheme_designator: str
    meaning: str


@dataclass(frozen=True)
class LabelSpec:
    """One output label of a segmentation model.

    Parameters
    ----------
    value
        The integer in the label map, starting from 1 (0 is background).
    name
        Short name shown to the radiologist as the segment label.
    category
        SNOMED CT segmented property category (e.g. Anatomical Structure).
    property_type
        SNOMED CT segmented property type (e.g. Lung).
    color_rgb
        Recommended display colour, 0-255 per channel.
    """

    value: int
    name: str
    category: Code
    property_type: Code
    color_rgb: tuple[int, int, int] = (255, 0, 0)

    def __post_init__(self) -> None:
        if self.value < 1:
            raise ValueError(
                f"LabelSpec value must be 1 or more (0 is background). Found {self.value}."
            )


@dataclass(frozen=True)
class ClassSpec:
    """One output class of a classification model.

    Parameters
    ----------
    name
        Short name shown to the radiologist (e.g. "Nodule").
    finding
        The coded finding the SR reports for this class (SNOMED CT, e.g. SCT 27925004
        "Nodule").
    """

    name: str
    finding: Code


@dataclass(frozen=True)
class Volume:
    """A 3-D image in patient space.

    ``voxels[k, j, i]`` is slice ``k`` (sorted along the slice normal), row ``j``, column
    ``i``. The geometry follows DICOM: ``origin`` is the ImagePositionPatient of slice 0,
    ``row_direction`` / ``column_direction`` are ImageOrientationPatient, ``slice_direction``
    is their cross product (slices are sorted so positions increase along it), and
    ``spacing_mm`` is (slice, row, column) spacing, i.e. (between slices, PixelSpacing[0],
    PixelSpacing[1]). The patient-space position of voxel (k, j, i) is::

        origin + k * spacing_mm[0] * slice_direction
               + j * spacing_mm[1] * column_direction
               + i * spacing_mm[2] * row_direction

    ``voxels`` holds rescaled values (HU for CT) as float32. A projection image (CR, DX,
    MG) is a volume of one slice; where it carries no patient geometry, ``origin`` and the
    directions are nominal (zero, identity) and ``spacing_mm`` is the imager pixel
    spacing, or 1 mm where none is given.
    """

    voxels: npt.NDArray[np.float32]
    origin: tuple[float, float, float]
    row_direction: tuple[float, float, float]
    column_direction: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    modality: str = ""

    @property
    def slice_direction(self) -> tuple[float, float, float]:
        """Unit normal of the slices (row_direction x column_direction)."""
        n = np.cross(np.asarray(self.row_direction), np.asarray(self.column_direction))
        return (float(n[0]), float(n[1]), float(n[2]))

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 mL = 1000 mm^3)."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    def _voxel_steps(self) -> npt.NDArray[np.float64]:
        """Rows: one step along k, j and i, in patient (LPS) mm."""
        return np.stack(
            [
                np.asarray(self.slice_direction) * self.spacing_mm[0],
                np.asarray(self.column_direction) * self.spacing_mm[1],
                np.asarray(self.row_direction) * self.spacing_mm[2],
            ]
        )

    def voxel_to_patient(self, indices: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Map (N, 3) voxel indices (k, j, i) to (N, 3) patient coordinates in mm."""
        steps = self._voxel_steps()
        return np.asarray(self.origin, dtype=np.float64) + np.asarray(indices, np.float64) @ steps

    @property
    def ras_affine(self) -> npt.NDArray[np.float64]:
        """4x4 affine from voxel (k, j, i) to RAS mm, as NIfTI and MONAI use it.

        DICOM patient space is LPS: the x and y rows are negated.
        """
        affine = np.eye(4)
        affine[:3, :3] = self._voxel_steps().T
        affine[:3, 3] = self.origin
        affine[:2] *= -1.0
        return affine


class OrientationValues(enum.StrEnum):
    """The plane of a slice, by the patient axis its normal is closest to."""

    AXIAL = "axial"
    SAGITTAL = "sagittal"
    CORONAL = "coronal"
    OBLIQUE = "oblique"


# A slice counts as axial/sagittal/coronal when its normal is within about 25 degrees of
# that patient axis (cos 25 deg = 0.906); anything else is oblique.
_PLANE_COSINE = 0.9


def orientation_of(image_orientation_patient: Sequence[float]) -> OrientationValues:
    """The plane of slices with this ImageOrientationPatient (row then column cosines).

    Raises
    ------
    ValueError
        If it does not hold six numbers.
    """
    if len(image_orientation_patient) != 6:
        raise ValueError(
            f"ImageOrientationPatient must hold 6 values. Found {len(image_orientation_patient)}."
        )
    values = np.asarray(image_orientation_patient, dtype=np.float64)
    normal = np.cross(values[:3], values[3:])
    length = float(np.linalg.norm(normal))
    if length == 0:
        raise ValueError("ImageOrientationPatient row and column directions are parallel")
    x, y, z = np.abs(normal) / length
    if z >= _PLANE_COSINE:
        return OrientationValues.AXIAL
    if x >= _PLANE_COSINE:
        return OrientationValues.SAGITTAL
    if y >= _PLANE_COSINE:
        return OrientationValues.CORONAL
    return OrientationValues.OBLIQUE


@dataclass(frozen=True)
class Accepts:
    """What input a model can take; the node skips other series before dispatch.

    Empty tuples accept anything.
    """

    modalities: tuple[str, ...] = ()
    orientations: tuple[OrientationValues, ...] = ()
    min_slices: int = 1

    def reject_reason(
        self, *, modality: str, orientation: OrientationValues | None, slices: int
    ) -> str | None:
        """Why a series does not fit, in words for the admin; None if it fits."""
        if self.modalities and modality not in self.modalities:
            return f"modality {modality or 'missing'}, the model takes {'/'.join(self.modalities)}"
        if self.orientations and orientation not in self.orientations:
            accepted = "/".join(str(o) for o in self.orientations)
            return f"{orientation or 'unknown'} slices, the model takes {accepted}"
        if slices < self.min_slices:
            return f"{slices} slices, the model needs at least {self.min_slices}"
        return None


class ModelError(Exception):
    """The model cannot process this input; the message is shown to a person."""


class InputKindValues(enum.StrEnum):
    """What one call of a model's ``predict`` sees."""

    #: The whole series as one 3-D volume.
    VOLUME = "volume"
    #: Each instance of the series on its own, as a one-slice volume (CR, DX, MG).
    IMAGE = "image"


class Model(abc.ABC):
    """What every model declares; subclass :class:`SegmentationModel` or
    :class:`ClassificationModel`, and register it with
    :func:`models.registry.register_model`.

    One instance is created per worker process and reused for every job, so load
    weights in ``__init__``.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    task: ClassVar[Literal["segmentation", "classification"]]
    queue: ClassVar[Queue] = "cpu"
    algorithm_family: ClassVar[Code] = Code("123110", "DCM", "Artificial Intelligence")
    accepts: ClassVar[Accepts] = Accepts()
    input_kind: ClassVar[InputKindValues] = InputKindValues.VOLUME
    description: ClassVar[str] = ""

    #: How the model is packaged: ``python`` (a class), ``bundle``, ``torchscript``.
    model_format: ClassVar[str] = "python"
    #: A multi-series model's inputs, in channel order, each with its match on series
    #: attributes (rules' syntax), and the input whose grid the others are resampled to
    #: and the results refer to. Empty for a model of one series.
    inputs: ClassVar[dict[str, dict[str, Any]]] = {}
    reference_input: ClassVar[str | None] = None

    @classmethod
    def missing_requirements(cls) -> str | None:
        """What keeps this model from loading here (weights, packages), checked without
        loading it; None when nothing is missing. ``pacsnode check-config`` reports it."""
        return None

    @classmethod
    def weights_files(cls) -> tuple[Path, ...]:
        """The files that hold the model's weights (none for a weight-free model)."""
        return ()

    @classmethod
    def weights_sha256(cls) -> str | None:
        """SHA-256 (hex) of the weights file, computed once per class; for several files
        (:meth:`weights_files`) the SHA-256 of their SHA-256 digests in order. None
        without weights, or when a file cannot be read (see :meth:`missing_requirements`)."""
        if cls not in _WEIGHTS_DIGESTS:
            files = cls.weights_files()
            try:
                digests = []
                for path in files:
                    with path.open("rb") as fh:
                        digests.append(hashlib.file_digest(fh, "sha256").digest())
            except OSError:
                return None
            if not digests:
                _WEIGHTS_DIGESTS[cls] = None
            elif len(digests) == 1:
                _WEIGHTS_DIGESTS[cls] = digests[0].hex()
            else:
                _WEIGHTS_DIGESTS[cls] = hashlib.sha256(b"".join(digests)).hexdigest()
        return _WEIGHTS_DIGESTS[cls]

    @classmethod
    def fingerprint(cls) -> str:
        """What identifies the model's files: a reload compares it to see whether a
        worker must load the model again. The weights' digest here; for a model folder,
        every file in it (spec and configs included)."""
        return cls.algorithm_version()

    @classmethod
    def algorithm_version(cls) -> str:
        """The version results name: ``version``, plus the first 12 hex digits of the
        weights' SHA-256 (``1.0.0 sha256:1a2b3c4d5e6f``), so every result names the
        exact weights that made it."""
        digest = cls.weights_sha256()
        return cls.version if digest is None else f"{cls.version} sha256:{digest[:12]}"

    def last_stage_seconds(self) -> dict[str, float]:
        """The parts of the last ``predict`` the model timed (``preprocess``,
        ``network``, ``postprocess``), reported with the job's stage times; empty for a
        model that does not tell (its whole ``predict`` is the job's ``inference``)."""
        return {}


_WEIGHTS_DIGESTS: dict[type[Model], str | None] = {}


class SegmentationModel(Model):
    """A segmentation model: a :class:`Volume` in, a label map of the same shape out."""

    task: ClassVar[Literal["segmentation", "classification"]] = "segmentation"
    labels: ClassVar[tuple[LabelSpec, ...]]

    @abc.abstractmethod
    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """Return a label map with ``volume.voxels.shape``; values are label values or 0.

        Raises
        ------
        ModelError
            If the input is unsuitable (the message says why).
        """

    def label(self, value: int) -> LabelSpec:
        """The :class:`LabelSpec` with this value."""
        for spec in self.labels:
            if spec.value == value:
                return spec
        raise KeyError(f"model {self.name!r} has no label {value}")


class ClassificationModel(Model):
    """A classification model: a :class:`Volume` in, one probability per class out.

    ``input_kind`` says whether ``predict`` gets the whole series (``volume``) or each
    image of it in turn (``image``, for projection radiographs). A class counts as
    present when its probability is at least ``threshold``.
    """

    task: ClassVar[Literal["segmentation", "classification"]] = "classification"
    classes: ClassVar[tuple[ClassSpec, ...]]
    threshold: ClassVar[float] = 0.5

    @abc.abstractmethod
    def predict(self, volume: Volume) -> tuple[float, ...]:
        """Return one probability in [0, 1] per class, in the order of ``classes``.

        Raises
        ------
        ModelError
            If the input is unsuitable (the message says why).
        """
