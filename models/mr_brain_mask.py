"""``mr-brain-mask``: brain mask on T1-weighted MR with deepbet's pretrained networks.

deepbet (Fisch et al., Computers in Biology and Medicine 2024; MIT licence; PyPI package
``deepbet``) ships two TorchScript U-Nets in its wheel, at the top level of
site-packages: ``data/models/bbox_model.pt`` and ``data/models/model.pt``. This module
loads them from there and runs deepbet's own code on our :class:`Volume`
(``deepbet.bet.BrainExtraction.run_model`` and ``.postprocess``), so the result is what
``deepbet-cli`` gives for the same image:

1. deepbet reads a NIfTI with ``nibabel.as_closest_canonical``: the voxel axes are
   permuted and flipped (no resampling) so they run closest to R, A and S. We do the
   same from the volume's direction cosines (LPS -> RAS, ``nibabel.orientations``).
2. ``run_model``: the image is resized (nearest) to 128^3, scaled by its 0.5/99.5
   percentiles and standardised (``deepbet.utils.normalize``); the bbox network finds
   the brain; its largest component plus a 10 % margin is cropped from the full image,
   resized to 256^3, and the main network gives the brain probability, resized back.
3. Probability > 0.5, then ``postprocess``: largest connected component and filled
   voids inside the bounding box (deepbet's defaults, no dilation).
4. The mask goes back to the volume's array order by the inverse of step 1.

The mask is deepbet's "brain" in the sense of total intracranial volume: brain tissue
and the CSF around it, without skull, scalp, eyes or neck.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from nibabel import orientations

from models.base import Accepts, Code, LabelSpec, ModelError, SegmentationModel, Volume
from models.registry import register_model

__all__ = ["BRAIN", "DEEPBET_VERSION", "MrBrainMaskModel", "deepbet_weights_dir"]

logger = logging.getLogger(__name__)

#: The deepbet release whose weights and code this model wraps.
DEEPBET_VERSION = "1.0.2"
BRAIN = 1
#: deepbet's default threshold on the brain probability.
THRESHOLD = 0.5
BBOX_WEIGHTS = "bbox_model.pt"
WEIGHTS = "model.pt"

_INSTALL_HINT = f"install it with `pip install deepbet=={DEEPBET_VERSION}`"
# CID 7150 "Anatomical Structure" (SCT 91723000, which replaced 123037004 in DICOM).
_ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")
# nibabel orientation of an array whose axes already run along R, A, S.
_RAS = np.asarray([[0.0, 1.0], [1.0, 1.0], [2.0, 1.0]])


def deepbet_weights_dir() -> Path:
    """The folder of deepbet's TorchScript weights, ``<site-packages>/data/models``.

    The deepbet wheel installs ``data/`` next to the ``deepbet`` package, not inside it.

    Raises
    ------
    ModuleNotFoundError
        If deepbet is not installed.
    """
    spec = importlib.util.find_spec("deepbet")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            f"mr-brain-mask needs the deepbet package for its weights; {_INSTALL_HINT}",
            name="deepbet",
        )
    return Path(spec.origin).resolve().parents[1] / "data" / "models"


def _missing_weights(folder: Path) -> str | None:
    for filename in (BBOX_WEIGHTS, WEIGHTS):
        path = folder / filename
        if not path.is_file():
            return (
                f"deepbet weights not found at {path}; {_INSTALL_HINT} "
                f"(its wheel puts them in <site-packages>/data/models)"
            )
    return None


@register_model
class MrBrainMaskModel(SegmentationModel):
    """Brain mask on T1-weighted MR: deepbet's pretrained networks (MIT)."""

    name = "mr-brain-mask"
    version = f"deepbet-{DEEPBET_VERSION}"
    queue = "gpu"
    labels = (
        LabelSpec(
            value=BRAIN,
            name="Brain",
            category=_ANATOMICAL_STRUCTURE,
            property_type=Code("12738006", "SCT", "Brain"),
            color_rgb=(250, 200, 80),
        ),
    )
    # deepbet resizes whatever it gets to 128^3 and 256^3; it needs a 3-D head volume.
    accepts = Accepts(modalities=("MR",), min_slices=16)
    description = (
        f"Brain mask (brain and CSF, as for total intracranial volume) on T1-weighted MR by "
        f"deepbet {DEEPBET_VERSION} (github.com/wwu-mmll/deepbet): its pretrained "
        f"TorchScript weights (MIT licence) loaded from the deepbet wheel's "
        f"<site-packages>/data/models/{BBOX_WEIGHTS} and {WEIGHTS}."
    )

    @classmethod
    def missing_requirements(cls) -> str | None:
        try:
            return _missing_weights(deepbet_weights_dir())
        except ModuleNotFoundError as e:
            return str(e)

    @classmethod
    def weights_files(cls) -> tuple[Path, ...]:
        try:
            folder = deepbet_weights_dir()
        except ModuleNotFoundError:
            return ()
        return (folder / BBOX_WEIGHTS, folder / WEIGHTS)

    def __init__(self, weights_dir: Path | None = None) -> None:
        """Load deepbet's two networks once, on CUDA if available, else on the CPU.

        Parameters
        ----------
        weights_dir
            Folder holding ``bbox_model.pt`` and ``model.pt``; default
            :func:`deepbet_weights_dir`.

        Raises
        ------
        ModuleNotFoundError
            If deepbet (or one of its dependencies) is not installed.
        FileNotFoundError
            If a weights file is missing.
        """
        folder = deepbet_weights_dir() if weights_dir is None else Path(weights_dir)
        missing = _missing_weights(folder)
        if missing is not None:
            raise FileNotFoundError(missing)
        try:
            torch = importlib.import_module("torch")
            bet = importlib.import_module("deepbet.bet")
        except ModuleNotFoundError as e:
            raise ModuleNotFoundError(
                f"mr-brain-mask cannot import {e.name}; {_INSTALL_HINT}", name=e.name
            ) from e
        use_cuda = bool(torch.cuda.is_available())
        # BrainExtraction loads each file with torch.jit.load, sets eval() and moves it to
        # CUDA (when no_gpu is False and CUDA is there) or the CPU.
        self._bet: Any = bet.BrainExtraction(
            no_gpu=not use_cuda,
            model_path=str(folder / WEIGHTS),
            bbox_model_path=str(folder / BBOX_WEIGHTS),
        )
        self._device = str(next(self._bet.model.parameters()).device)
        # run_model keeps the bounding box on the instance for postprocess.
        self._lock = threading.Lock()
        logger.info("mr-brain-mask: deepbet weights from %s on %s", folder, self._device)

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """Label the brain (1).

        Parameters
        ----------
        volume
            A T1-weighted MR volume of the head, in any orientation.

        Returns
        -------
        numpy.ndarray
            uint8 label map with ``volume.voxels.shape``; all zeros if no brain is found.

        Raises
        ------
        ModelError
            If the modality is not MR, the volume is not 3-D, holds no contrast, or the
            bounding-box network finds no brain to crop.
        """
        if volume.modality.upper() != "MR":
            raise ModelError(
                f"mr-brain-mask needs an MR series (T1-weighted); this series has modality "
                f"{volume.modality!r}."
            )
        voxels = volume.voxels
        if voxels.ndim != 3:
            raise ModelError(f"mr-brain-mask needs a 3-D volume; found shape {voxels.shape}.")
        finite = voxels[np.isfinite(voxels)]
        if finite.size == 0 or float(finite.min()) == float(finite.max()):
            raise ModelError("mr-brain-mask: the image is blank (every voxel has one value).")

        to_ras = orientations.io_orientation(volume.ras_affine)
        from_ras = orientations.ornt_transform(_RAS, to_ras)
        x = np.array(orientations.apply_orientation(voxels, to_ras), dtype=np.float32)
        with self._lock:
            try:
                probability = self._bet.run_model(x)
            except (AssertionError, ValueError) as e:
                # The bbox network found nothing: keep_largest_connected_component takes
                # the argmax of an empty count (ValueError), or get_bbox asserts.
                raise ModelError(f"mr-brain-mask found no brain in this series ({e}).") from e
            mask = probability > THRESHOLD
            if mask.any():
                mask = self._bet.postprocess(mask)
        labels = np.ascontiguousarray(orientations.apply_orientation(mask, from_ras))
        labels = labels.astype(np.uint8) * np.uint8(BRAIN)
        logger.info(
            "mr-brain-mask: brain %.1f mL on %s",
            float(np.count_nonzero(labels)) * volume.voxel_volume_ml,
            self._device,
        )
        return labels
