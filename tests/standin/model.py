"""The stand-in model (see :mod:`tests.standin`); registers itself when the registry
imports it from a models folder."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import numpy.typing as npt

from models.base import Accepts, Code, SegmentationModel, Volume
from models.ct_tissue import BODY_MIN_HU, BONE, BONE_MIN_HU, SOFT_TISSUE, CtTissueModel
from models.registry import register_model

__all__ = ["StandInModel"]


@register_model
class StandInModel(SegmentationModel):
    """Takes a set time to threshold soft tissue and bone (a stand-in for a GPU network)."""

    name = "standin"
    version = "1.0.0"
    queue = "gpu"
    labels = tuple(spec for spec in CtTissueModel.labels if spec.value in (SOFT_TISSUE, BONE))
    algorithm_family = Code("123104", "DCM", "Morphological Operations")
    accepts = Accepts(modalities=("CT",), min_slices=2)
    description = "Benchmark stand-in: sleeps, then thresholds CT (a demonstration, not clinical)."

    def __init__(self) -> None:
        self.seconds = float(Path(__file__).with_name("seconds.txt").read_text())

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """Threshold, then wait out the rest of the set time (a GPU network's time does
        not grow with the CPU work beside it)."""
        started = time.perf_counter()
        labels = np.zeros(volume.voxels.shape, dtype=np.uint8)
        labels[volume.voxels > BODY_MIN_HU] = SOFT_TISSUE
        labels[volume.voxels >= BONE_MIN_HU] = BONE
        time.sleep(max(0.0, self.seconds - (time.perf_counter() - started)))
        return labels
