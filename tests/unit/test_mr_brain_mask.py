"""The mr-brain-mask model (deepbet's pretrained networks) on a real T1 head MR.

The input is ch2 from ``mricron-data`` (the Colin 27 average, 181x217x181 at 1 mm, in
MNI space, so larger than an average head), written as an axial MR series. The tests run
on the CPU; each prediction takes a few seconds there.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from scipy import ndimage

from models.base import ModelError, OrientationValues, SegmentationModel, Volume
from models.mr_brain_mask import BRAIN, MrBrainMaskModel, deepbet_weights_dir
from models.registry import get_model_class, get_segmentation_model
from tests.dicom_factory import CH2_BET_PATH, CH2_PATH, write_mr_series_from_nifti
from tests.job_requests import job_request
from tests.peers import dciodvfy_errors
from tests.sr_reading import read_volumes_ml
from workers.pipeline import run_job
from workers.series import LoadedSeries, load_series

#: deepbet's mask of ch2 is 1956.5 mL on the CPU (brain and CSF, i.e. intracranial
#: volume, of a head scaled to MNI space); BET's brain in ch2bet is 1737 mL.
BRAIN_ML_RANGE = (1880.0, 2040.0)


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ch2")
    write_mr_series_from_nifti(CH2_PATH, folder, patient_id="CH2-001")
    return folder


@pytest.fixture(scope="module")
def series(series_dir: Path) -> LoadedSeries:
    return load_series(sorted(series_dir.glob("*.dcm")))


@pytest.fixture(scope="module")
def model() -> SegmentationModel:
    # The process-wide instance, so run_job below reuses the loaded networks.
    return get_segmentation_model("mr-brain-mask")


@pytest.fixture(scope="module")
def labels(model: SegmentationModel, series: LoadedSeries) -> npt.NDArray[np.uint8]:
    return model.predict(series.volume)


def _sample_nifti(
    volume: Volume, data: npt.NDArray[Any], affine: npt.NDArray[np.float64]
) -> Iterator[npt.NDArray[Any]]:
    """Slice by slice, the NIfTI voxel at each voxel centre of ``volume`` (nearest).

    Goes through patient coordinates only, independent of how the series was written.
    """
    world_to_voxel = np.linalg.inv(affine)
    rows, cols = volume.voxels.shape[1:]
    j, i = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    for k in range(volume.voxels.shape[0]):
        indices = np.stack([np.full(j.size, k), j.ravel(), i.ravel()], axis=1)
        ras = volume.voxel_to_patient(indices) * np.asarray([-1.0, -1.0, 1.0])
        ijk = np.rint(ras @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]).astype(int)
        yield data[ijk[:, 0], ijk[:, 1], ijk[:, 2]].reshape(rows, cols)


def _nifti_on_volume(path: Path, volume: Volume) -> npt.NDArray[Any]:
    img = nib.load(path)
    assert isinstance(img, nib.Nifti1Image)
    return np.stack(list(_sample_nifti(volume, np.asarray(img.dataobj), img.affine)))


def test_registered() -> None:
    cls = get_model_class("mr-brain-mask")
    assert cls is MrBrainMaskModel
    assert (cls.name, cls.version, cls.queue) == ("mr-brain-mask", "deepbet-1.0.2", "gpu")
    (spec,) = cls.labels
    assert (spec.value, spec.name) == (BRAIN, "Brain")
    assert (spec.category.value, spec.category.scheme_designator) == ("91723000", "SCT")
    assert (spec.property_type.value, spec.property_type.meaning) == ("12738006", "Brain")
    assert (cls.algorithm_family.value, cls.algorithm_family.scheme_designator) == (
        "123110",
        "DCM",
    )
    assert "deepbet" in cls.description
    assert "MIT" in cls.description
    assert cls.accepts.reject_reason(
        modality="CT", orientation=OrientationValues.AXIAL, slices=181
    ) == ("modality CT, the model takes MR")
    for orientation in OrientationValues:
        assert cls.accepts.reject_reason(modality="MR", orientation=orientation, slices=181) is None


def test_weights_are_deepbets() -> None:
    folder = deepbet_weights_dir()
    assert folder.parts[-2:] == ("data", "models")
    assert (folder / "model.pt").is_file()
    assert (folder / "bbox_model.pt").is_file()


def test_missing_weights_name_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"bbox_model\.pt; install it with `pip install"):
        MrBrainMaskModel(weights_dir=tmp_path)


def test_ch2_brain_volume_and_shape(series: LoadedSeries, labels: npt.NDArray[np.uint8]) -> None:
    volume = series.volume
    assert labels.shape == volume.voxels.shape
    assert labels.dtype == np.uint8
    assert set(np.unique(labels).tolist()) == {0, BRAIN}
    brain_ml = float(np.count_nonzero(labels)) * volume.voxel_volume_ml
    assert BRAIN_ML_RANGE[0] <= brain_ml <= BRAIN_ML_RANGE[1], brain_ml


def test_ch2_mask_is_one_solid_component_inside_the_head(
    series: LoadedSeries, labels: npt.NDArray[np.uint8]
) -> None:
    mask = labels == BRAIN
    _, count = ndimage.label(mask)
    assert count == 1
    np.testing.assert_array_equal(ndimage.binary_fill_holes(mask), mask)
    # The head: everything brighter than a tenth of the bright end, holes filled.
    voxels = series.volume.voxels
    head = ndimage.binary_fill_holes(voxels > 0.1 * float(np.percentile(voxels, 99.5)))
    assert float(np.count_nonzero(mask & head)) / float(np.count_nonzero(mask)) > 0.99
    # The mask stays clear of the array border (the scalp and skull are outside it).
    assert not mask[:, :, 0].any()
    assert not mask[:, :, -1].any()
    assert not mask[:, 0, :].any()
    assert not mask[:, -1, :].any()
    assert not mask[-1].any()


def test_ch2_agrees_with_bet(series: LoadedSeries, labels: npt.NDArray[np.uint8]) -> None:
    """BET's brain (ch2bet) lies inside deepbet's mask, which adds the outer CSF."""
    bet = _nifti_on_volume(CH2_BET_PATH, series.volume) > 0
    mask = labels == BRAIN
    inside = float(np.count_nonzero(bet & mask)) / float(np.count_nonzero(bet))
    dice = 2.0 * np.count_nonzero(bet & mask) / (np.count_nonzero(bet) + np.count_nonzero(mask))
    assert inside > 0.99
    assert dice > 0.92


def test_ch2_equals_deepbet_on_the_nifti(
    series: LoadedSeries, labels: npt.NDArray[np.uint8]
) -> None:
    """Our reorientation reproduces deepbet's own run on the NIfTI file, voxel for voxel.

    deepbet runs on the same device as the model (CUDA if there is one).
    """
    import torch
    from deepbet.bet import BrainExtraction  # type: ignore[import-untyped]

    img = nib.load(CH2_PATH)
    assert isinstance(img, nib.Nifti1Image)
    _, reference, _ = BrainExtraction(no_gpu=not torch.cuda.is_available()).run(img)
    expected = np.stack(
        list(_sample_nifti(series.volume, np.asarray(reference.dataobj), reference.affine))
    )
    np.testing.assert_array_equal(labels, expected.astype(np.uint8))


def test_sagittal_array_order_gives_the_same_mask(
    model: SegmentationModel, series: LoadedSeries, labels: npt.NDArray[np.uint8]
) -> None:
    """The same voxels as sagittal slices (axes permuted and flipped) give the same mask."""
    volume = series.volume
    n_slices, rows, _ = volume.voxels.shape
    normal = np.asarray(volume.slice_direction)
    column = np.asarray(volume.column_direction)
    # New array axes: (old column, old slice reversed, old row reversed); then
    # new row x new column = (-old column) x (-old normal) = old row = new normal.
    origin = (
        np.asarray(volume.origin)
        + (n_slices - 1) * volume.spacing_mm[0] * normal
        + (rows - 1) * volume.spacing_mm[1] * column
    )
    sagittal = Volume(
        voxels=np.ascontiguousarray(volume.voxels.transpose(2, 0, 1)[:, ::-1, ::-1]),
        origin=(float(origin[0]), float(origin[1]), float(origin[2])),
        row_direction=(-float(column[0]), -float(column[1]), -float(column[2])),
        column_direction=(-float(normal[0]), -float(normal[1]), -float(normal[2])),
        spacing_mm=(volume.spacing_mm[2], volume.spacing_mm[0], volume.spacing_mm[1]),
        modality="MR",
    )
    np.testing.assert_allclose(sagittal.slice_direction, volume.row_direction, atol=1e-9)
    corner = sagittal.voxel_to_patient(np.asarray([[5.0, 7.0, 11.0]]))
    old = volume.voxel_to_patient(np.asarray([[n_slices - 1 - 7.0, rows - 1 - 11.0, 5.0]]))
    np.testing.assert_allclose(corner, old, atol=1e-9)

    result = model.predict(sagittal)
    np.testing.assert_array_equal(result, labels.transpose(2, 0, 1)[:, ::-1, ::-1])


def test_refuses_other_modalities_and_blank_or_brainless_images(
    model: SegmentationModel, series: LoadedSeries
) -> None:
    volume = series.volume
    with pytest.raises(ModelError, match=r"needs an MR series \(T1-weighted\); .* 'CT'"):
        model.predict(dataclasses.replace(volume, modality="CT"))
    with pytest.raises(ModelError, match="the image is blank"):
        model.predict(dataclasses.replace(volume, voxels=np.zeros_like(volume.voxels)))
    cube = np.zeros_like(volume.voxels)
    cube[80:100, 90:110, 80:100] = 100.0
    with pytest.raises(ModelError, match="found no brain"):
        model.predict(dataclasses.replace(volume, voxels=cube))


def test_run_job_writes_valid_seg_and_sr(
    series_dir: Path, model: SegmentationModel, tmp_path: Path
) -> None:
    result = run_job(job_request(series_dir, "mr-brain-mask", tmp_path))
    assert result.status == "ok", result
    seg_path, sr_path = (Path(f.path) for f in result.files)
    for path in (seg_path, sr_path):
        assert dciodvfy_errors(path) == [], path
    seg = dcmread(seg_path)
    assert seg.Modality == "SEG"
    assert seg.SegmentSequence[0].SegmentLabel == "Brain"
    assert seg.NumberOfFrames > 100
    (measurement,) = result.measurements
    assert measurement["name"] == "Brain"
    assert BRAIN_ML_RANGE[0] <= float(measurement["volume_ml"]) <= BRAIN_ML_RANGE[1]
    assert read_volumes_ml(dcmread(sr_path)) == pytest.approx({"Brain": measurement["volume_ml"]})
