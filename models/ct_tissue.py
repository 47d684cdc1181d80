"""``ct-tissue``: a weight-free CT model that labels soft tissue, lung and bone by HU.

It needs no GPU and no weights, so every installation can run the whole pipeline (and
the tests can check it exactly on a phantom). The algorithm:

1. body = HU > -500, largest 3-D connected component, holes filled slice by slice so the
   lungs inside are included;
2. lung = body & HU < -400, connected components of at least 50 mL that are at least
   30 mm thick somewhere (hold a ball of radius 15 mm); this drops sinuses, the upper
   airway and small pockets of bowel gas, which are thinner;
3. bone = body & HU >= 200, connected components of at least 0.5 mL;
4. soft tissue = body minus lung minus bone.
"""

from __future__ import annotations

import logging

import numpy as np
import numpy.typing as npt
from scipy import ndimage

from models.base import Accepts, Code, LabelSpec, ModelError, SegmentationModel, Volume
from models.registry import register_model

__all__ = ["CtTissueModel"]

logger = logging.getLogger(__name__)

BODY_MIN_HU = -500.0
LUNG_MAX_HU = -400.0
BONE_MIN_HU = 200.0
LUNG_MIN_COMPONENT_ML = 50.0
#: A lung component must hold a ball of this radius; the upper airway of a head CT holds
#: 50 mL of air but is at most ~16 mm thick.
LUNG_MIN_INSCRIBED_RADIUS_MM = 15.0
BONE_MIN_COMPONENT_ML = 0.5

SOFT_TISSUE = 1
LUNG = 2
BONE = 3

_TISSUE = Code("85756007", "SCT", "Tissue")
# CID 7150 "Anatomical Structure" (SCT 91723000, which replaced 123037004 in DICOM).
_ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")


def _largest_component(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    labels, count = ndimage.label(mask)
    if count == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return np.asarray(labels == int(np.argmax(sizes)))


def _drop_small_components(mask: npt.NDArray[np.bool_], min_voxels: float) -> npt.NDArray[np.bool_]:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_voxels
    keep[0] = False
    return np.asarray(keep[labels])


def _thick_components(
    mask: npt.NDArray[np.bool_],
    min_voxels: float,
    min_radius_mm: float,
    spacing_mm: tuple[float, float, float],
) -> npt.NDArray[np.bool_]:
    """Components with at least ``min_voxels`` voxels that hold a ball of ``min_radius_mm``.

    The array border does not count as the component's edge, so an organ cut by the scan
    range still counts as thick.
    """
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    keep = np.zeros(count + 1, dtype=bool)
    for index, box in enumerate(ndimage.find_objects(labels), start=1):
        if box is None or sizes[index] < min_voxels:
            continue
        pad = [(int(b.start > 0), int(b.stop < n)) for b, n in zip(box, labels.shape, strict=True)]
        component = np.pad(labels[box] == index, pad, constant_values=False)
        radius = ndimage.distance_transform_edt(component, sampling=spacing_mm)
        keep[index] = float(np.max(radius)) >= min_radius_mm
    return np.asarray(keep[labels])


@register_model
class CtTissueModel(SegmentationModel):
    """Soft tissue, lung and bone on CT by thresholds and connected components."""

    name = "ct-tissue"
    version = "1.0.0"
    queue = "cpu"
    labels = (
        LabelSpec(
            value=SOFT_TISSUE,
            name="Soft tissue",
            category=_TISSUE,
            property_type=Code("87784001", "SCT", "Soft tissue"),
            color_rgb=(230, 150, 120),
        ),
        LabelSpec(
            value=LUNG,
            name="Lung",
            category=_ANATOMICAL_STRUCTURE,
            property_type=Code("39607008", "SCT", "Lung"),
            color_rgb=(90, 170, 240),
        ),
        LabelSpec(
            value=BONE,
            name="Bone",
            category=_TISSUE,
            property_type=Code("272673000", "SCT", "Bone"),
            color_rgb=(241, 214, 145),
        ),
    )
    # Thresholds, connected components and hole filling: CID 7162 has no thresholding
    # concept, and the morphological steps are what shape the output.
    algorithm_family = Code("123104", "DCM", "Morphological Operations")
    # Weight-free, so any orientation; a volume needs at least two slices.
    accepts = Accepts(modalities=("CT",), min_slices=2)
    description = "Threshold segmentation of soft tissue, lung and bone on CT (no weights)."

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """Label soft tissue (1), lung (2) and bone (3).

        Parameters
        ----------
        volume
            A CT volume in HU.

        Returns
        -------
        numpy.ndarray
            uint8 label map with ``volume.voxels.shape``.

        Raises
        ------
        ModelError
            If the modality is not CT, the volume is not 3-D, or no body is found.
        """
        if volume.modality.upper() != "CT":
            raise ModelError(
                f"ct-tissue needs a CT series; this series has modality {volume.modality!r}."
            )
        hu = volume.voxels
        if hu.ndim != 3:
            raise ModelError(f"ct-tissue needs a 3-D volume; found shape {hu.shape}.")
        voxel_ml = volume.voxel_volume_ml

        body = _largest_component(hu > BODY_MIN_HU)
        if not body.any():
            raise ModelError(f"no body found: no voxel is above {BODY_MIN_HU:g} HU.")
        for k in range(body.shape[0]):
            body[k] = ndimage.binary_fill_holes(body[k])

        lung = _thick_components(
            body & (hu < LUNG_MAX_HU),
            LUNG_MIN_COMPONENT_ML / voxel_ml,
            LUNG_MIN_INSCRIBED_RADIUS_MM,
            volume.spacing_mm,
        )
        bone = _drop_small_components(body & (hu >= BONE_MIN_HU), BONE_MIN_COMPONENT_ML / voxel_ml)

        labels = np.zeros(hu.shape, dtype=np.uint8)
        labels[body] = SOFT_TISSUE
        labels[lung] = LUNG
        labels[bone] = BONE
        logger.info(
            "ct-tissue: soft tissue %.1f mL, lung %.1f mL, bone %.1f mL",
            float(np.count_nonzero(labels == SOFT_TISSUE)) * voxel_ml,
            float(np.count_nonzero(lung)) * voxel_ml,
            float(np.count_nonzero(bone)) * voxel_ml,
        )
        return labels
