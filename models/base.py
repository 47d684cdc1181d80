"""The model contract: what a model receives, what it declares and what it returns.

A model sees a :class:`Volume` (voxels in a fixed array order with the geometry that
places them in patient space) and returns a label map of the same shape. Everything
DICOM-specific (which instances, which UIDs) stays in ``workers/``, so a model never
needs pydicom.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Literal

import numpy as np
import numpy.typing as npt

__all__ = ["Code", "LabelSpec", "ModelError", "SegmentationModel", "Volume"]


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

    ``voxels`` holds rescaled values (HU for CT) as float32.
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

    def voxel_to_patient(self, indices: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Map (N, 3) voxel indices (k, j, i) to (N, 3) patient coordinates in mm."""
        axes = np.stack(
            [
                np.asarray(self.slice_direction) * self.spacing_mm[0],
                np.asarray(self.column_direction) * self.spacing_mm[1],
                np.asarray(self.row_direction) * self.spacing_mm[2],
            ]
        )
        return np.asarray(self.origin, dtype=np.float64) + np.asarray(indices, np.float64) @ axes


class ModelError(Exception):
    """The model cannot process this input; the message is shown to a person."""


class SegmentationModel(abc.ABC):
    """A segmentation model: a :class:`Volume` in, a label map of the same shape out.

    Subclasses set the class attributes and implement :meth:`predict`; register them with
    :func:`models.registry.register_model`. One instance is created per worker process and
    reused for every job, so load weights in ``__init__``.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    queue: ClassVar[Literal["gpu", "cpu"]] = "cpu"
    labels: ClassVar[tuple[LabelSpec, ...]]
    algorithm_family: ClassVar[Code] = Code("123110", "DCM", "Artificial Intelligence")
    description: ClassVar[str] = ""

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
