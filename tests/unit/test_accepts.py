"""What a model accepts: orientation from ImageOrientationPatient, and the skip reasons."""

from __future__ import annotations

import pytest

from models.base import Accepts, OrientationValues, orientation_of
from models.ct_tissue import CtTissueModel


@pytest.mark.parametrize(
    ("iop", "expected"),
    [
        ([1, 0, 0, 0, 1, 0], OrientationValues.AXIAL),
        ([1, 0, 0, 0, -1, 0], OrientationValues.AXIAL),  # feet first / flipped
        ([0, 1, 0, 0, 0, -1], OrientationValues.SAGITTAL),
        ([1, 0, 0, 0, 0, -1], OrientationValues.CORONAL),
        ([1, 0, 0, 0, 0.9848, -0.1736], OrientationValues.AXIAL),  # 10 degree gantry tilt
        ([1, 0, 0, 0, 0.7071, -0.7071], OrientationValues.OBLIQUE),  # 45 degrees
    ],
)
def test_orientation_of(iop: list[float], expected: OrientationValues) -> None:
    assert orientation_of(iop) == expected


def test_orientation_of_refuses_bad_values() -> None:
    with pytest.raises(ValueError, match=r"must hold 6 values\. Found 3"):
        orientation_of([1, 0, 0])
    with pytest.raises(ValueError, match="parallel"):
        orientation_of([1, 0, 0, 1, 0, 0])


def test_reject_reasons_name_what_does_not_fit() -> None:
    accepts = Accepts(modalities=("MR",), orientations=(OrientationValues.AXIAL,), min_slices=20)
    assert (
        accepts.reject_reason(modality="MR", orientation=OrientationValues.AXIAL, slices=20) is None
    )
    assert (
        accepts.reject_reason(modality="CT", orientation=OrientationValues.AXIAL, slices=20)
        == "modality CT, the model takes MR"
    )
    assert (
        accepts.reject_reason(modality="MR", orientation=OrientationValues.SAGITTAL, slices=20)
        == "sagittal slices, the model takes axial"
    )
    assert (
        accepts.reject_reason(modality="MR", orientation=OrientationValues.AXIAL, slices=12)
        == "12 slices, the model needs at least 20"
    )
    assert Accepts().reject_reason(modality="", orientation=None, slices=1) is None


def test_ct_tissue_takes_ct_in_any_orientation() -> None:
    accepts = CtTissueModel.accepts
    for orientation in OrientationValues:
        assert accepts.reject_reason(modality="CT", orientation=orientation, slices=2) is None
    assert accepts.reject_reason(modality="MR", orientation=None, slices=50) == (
        "modality MR, the model takes CT"
    )
