"""Tests for the weight-free ct-tissue model on a phantom and on a real head CT."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom.uid import RLELossless

from models.base import ModelError, SegmentationModel, Volume
from models.ct_tissue import BONE, LUNG, SOFT_TISSUE, CtTissueModel
from models.registry import get_model_class
from tests.dicom_factory import chest_phantom, cranium_hu, write_ct_series
from workers.series import load_series


def _volume(
    hu: npt.NDArray[np.int16],
    spacing_mm: tuple[float, float, float],
    modality: str = "CT",
) -> Volume:
    return Volume(
        voxels=hu.astype(np.float32),
        origin=(0.0, 0.0, 0.0),
        row_direction=(1.0, 0.0, 0.0),
        column_direction=(0.0, 1.0, 0.0),
        spacing_mm=spacing_mm,
        modality=modality,
    )


@pytest.fixture(scope="module")
def model() -> SegmentationModel:
    return CtTissueModel()


def test_registered() -> None:
    cls = get_model_class("ct-tissue")
    assert cls is CtTissueModel
    assert (cls.name, cls.version, cls.queue) == ("ct-tissue", "1.0.0", "cpu")
    assert [spec.value for spec in cls.labels] == [SOFT_TISSUE, LUNG, BONE]
    assert [spec.property_type.value for spec in cls.labels] == [
        "87784001",
        "39607008",
        "272673000",
    ]
    assert cls.algorithm_family.value == "123104"


def test_phantom_exact(model: SegmentationModel) -> None:
    phantom = chest_phantom()
    labels = model.predict(_volume(phantom.hu, phantom.spacing_mm))
    assert labels.dtype == np.uint8
    np.testing.assert_array_equal(labels, phantom.expected_labels)
    lung_ml = float(np.count_nonzero(labels == LUNG)) * phantom.voxel_volume_ml
    assert lung_ml > 200.0


def test_phantom_through_dicom(tmp_path: Path, model: SegmentationModel) -> None:
    phantom = chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    paths = write_ct_series(
        phantom.hu,
        tmp_path,
        spacing_mm=phantom.spacing_mm,
        transfer_syntax=RLELossless,
        signed=False,
        shuffle=True,
    )
    labels = model.predict(load_series(paths).volume)
    np.testing.assert_array_equal(labels, phantom.expected_labels)


def test_small_air_pocket_and_bone_fragment_are_soft_tissue(model: SegmentationModel) -> None:
    phantom = chest_phantom()
    hu = phantom.hu.copy()
    expected = phantom.expected_labels
    # An air pocket of about 0.7 mL and a bone fragment of about 0.02 mL in soft tissue,
    # between the right lung and the body outline.
    soft = np.argwhere(expected[20] == SOFT_TISSUE)
    j, i = soft[np.argmin(soft[:, 1])] + np.array([0, 6])
    assert (expected[18:23, j - 2 : j + 3, i - 2 : i + 3] == SOFT_TISSUE).all()
    hu[18:23, j - 2 : j + 3, i - 2 : i + 3] = -1000
    hu[20, j - 6 : j - 4, i : i + 2] = 900
    assert (expected[20, j - 6 : j - 4, i : i + 2] == SOFT_TISSUE).all()
    labels = model.predict(_volume(hu, phantom.spacing_mm))
    np.testing.assert_array_equal(labels, expected)


def test_cranium(model: SegmentationModel) -> None:
    hu, spacing = cranium_hu()
    assert hu.shape == (108, 256, 256)
    assert hu.dtype == np.int16
    assert spacing == pytest.approx((1.5, 0.957, 0.957), abs=1e-3)
    volume = _volume(hu, spacing)
    labels = model.predict(volume)
    ml = {
        value: float(np.count_nonzero(labels == value)) * volume.voxel_volume_ml
        for value in (1, 2, 3)
    }
    assert ml[LUNG] == 0.0, "the airway and sinuses of a head CT are not lung"
    assert 300.0 < ml[BONE] < 1500.0
    assert 1000.0 < ml[SOFT_TISSUE] < 6000.0


def test_not_ct(model: SegmentationModel) -> None:
    phantom = chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    volume = _volume(phantom.hu, phantom.spacing_mm, modality="MR")
    with pytest.raises(ModelError, match="needs a CT series; this series has modality 'MR'"):
        model.predict(volume)


def test_no_body(model: SegmentationModel) -> None:
    volume = _volume(np.full((4, 32, 32), -1000, dtype=np.int16), (2.0, 1.0, 1.0))
    with pytest.raises(ModelError, match="no body found"):
        model.predict(volume)
    with pytest.raises(ModelError, match="needs a CT series"):
        model.predict(replace(volume, modality=""))
