"""Multi-series models in the worker and in pacsnode.yaml: inputs resampled onto the
reference grid as MONAI resamples them, a frame of reference that does not match
failing the job by name, and inputs declared wrongly refused by field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from pydicom import dcmread

from models import registry
from models.base import SegmentationModel, Volume
from models.network import network_model_class
from models.spec import ModelSpecError, read_spec
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.job_requests import job_request
from workers.contract import InputSeries, Manifest
from workers.pipeline import run_job
from workers.series import resample_onto


def _volume(voxels: np.ndarray, origin: tuple[float, ...], row: tuple[float, ...],
            column: tuple[float, ...], spacing: tuple[float, ...]) -> Volume:  # fmt: skip
    return Volume(voxels.astype(np.float32), origin, row, column, spacing)  # type: ignore[arg-type]


def test_resampling_onto_the_reference_grid_is_monais() -> None:
    """An oblique, coarser series onto an axial grid: MONAI's ResampleToMatch (bilinear,
    zeros outside) gives the same values where both sample inside the moving volume."""
    from monai.data import MetaTensor
    from monai.transforms import ResampleToMatch

    rng = np.random.default_rng(0)
    c, s = np.cos(np.deg2rad(20)), np.sin(np.deg2rad(20))
    moving = _volume(rng.random((14, 20, 18)) * 100, (-20.0, -25.0, -10.0), (c, s, 0.0),
                     (-s, c, 0.0), (3.0, 2.5, 2.0))  # fmt: skip
    target = _volume(np.zeros((20, 24, 24)), (-18.0, -20.0, -6.0), (1.0, 0.0, 0.0),
                     (0.0, 1.0, 0.0), (2.0, 1.5, 1.5))  # fmt: skip
    ours = resample_onto(moving, target)

    def meta(volume: Volume) -> MetaTensor:
        return MetaTensor(torch.from_numpy(volume.voxels[None].copy()),
                          affine=torch.from_numpy(volume.ras_affine))  # fmt: skip

    theirs = ResampleToMatch(mode="bilinear", padding_mode="zeros", dtype=np.float64)(
        meta(moving), meta(target)
    )[0].numpy()
    inside = (ours != moving.voxels.min()) & (theirs != 0)  # away from the edge padding
    assert inside.mean() > 0.3
    np.testing.assert_allclose(ours[inside], theirs[inside], rtol=1e-4, atol=1e-3)


class _TwoSeries(SegmentationModel):
    name = "two-series-test"
    version = "1"
    labels = ()
    inputs = {"a": {"SeriesNumber": 1}, "b": {"SeriesNumber": 2}}
    reference_input = "a"

    def predict(self, volume: Volume) -> Any:
        raise AssertionError("the job must fail before the model runs")


@pytest.fixture
def two_series() -> Iterator[None]:
    state = registry.checkpoint()
    registry.register_model(_TwoSeries)
    yield
    registry.rollback(state)


@pytest.mark.usefixtures("two_series")
def test_an_input_in_another_frame_of_reference_fails_the_job_by_name(tmp_path: Path) -> None:
    phantom = chest_phantom((8, 64, 64), (5.0, 3.0, 3.0))
    write_ct_series(phantom.hu, tmp_path / "a", spacing_mm=phantom.spacing_mm, series_number=1)
    write_ct_series(phantom.hu, tmp_path / "b", spacing_mm=phantom.spacing_mm, series_number=2)
    other = Manifest.of_files("b", sorted((tmp_path / "b").glob("*.dcm")))
    request = job_request(tmp_path / "a", "two-series-test", tmp_path / "out")
    manifest = request.manifest.model_copy(
        update={
            "reference_input": "a",
            "other_inputs": (
                InputSeries(name="b", series_instance_uid="b", instances=other.instances),
            ),
        }
    )
    outcome = run_job(request.model_copy(update={"manifest": manifest}))
    assert outcome.status == "failed"
    frame_b = dcmread(next((tmp_path / "b").glob("*.dcm"))).FrameOfReferenceUID
    assert "input 'b' (series " in str(outcome.reason)
    assert f"is in frame of reference {frame_b}" in str(outcome.reason)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"inputs": {"a": {"match": {"Modality": "MR"}}, "b": {"match": {"Modality": "MR"}}},
          "reference": "c"}, "reference must name one of the inputs"),
        ({"inputs": {"a": {"match": {"Modality": "MR"}}}, "reference": "a"},
         "inputs are for models of two series or more"),
        ({"task": "classification", "classes": [{"name": "x", "finding": {"value": "1", "meaning": "x"}}],
          "activation": "sigmoid", "inputs": {"a": {"match": {"Modality": "MR"}},
          "b": {"match": {"Modality": "MR"}}}, "reference": "a"},
         "inputs are for segmentation models of volumes"),
    ],
)  # fmt: skip
def test_inputs_declared_wrongly_are_refused(
    tmp_path: Path, spec: dict[str, Any], message: str
) -> None:
    path = tmp_path / "pacsnode.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ModelSpecError, match=message) as caught:
        read_spec(path)
    assert str(path) in str(caught.value)


TWO_INPUT_SPEC = """\
version: 1.0.0
queue: cpu
accepts: {modalities: [CT]}
inputs:
  plain: {match: {SeriesNumber: 1}}
  shifted: {match: {SeriesNumber: 2}}
reference: plain
preprocessing:
  intensity: {a_min: -1000, a_max: 1000}
inference: {roi_size: [8, 32, 32]}
labels:
  1: {name: Left, category: {value: "91723000", meaning: Anatomical Structure},
      property_type: {value: "87784001", meaning: Soft tissue}}
"""


def test_a_torchscript_model_of_two_series_sees_them_as_channels(tmp_path: Path) -> None:
    """The fast path with two inputs: (channel, k, j, i) voxels become a 2-channel network
    input; the labels equal the network run by hand on the two windowed channels."""
    from monai.inferers import sliding_window_inference

    torch.manual_seed(3)
    net = torch.nn.Conv3d(2, 2, 3, padding=1).eval()
    folder = tmp_path / "two-inputs"
    folder.mkdir()
    torch.jit.save(torch.jit.script(net), str(folder / "model.ts"))
    (folder / "pacsnode.yaml").write_text(TWO_INPUT_SPEC)
    model = network_model_class(folder)()
    assert isinstance(model, SegmentationModel)
    assert list(model.inputs) == ["plain", "shifted"]
    assert model.reference_input == "plain"

    phantom = chest_phantom((8, 64, 64), (5.0, 3.0, 3.0))
    voxels = np.stack([phantom.hu, np.roll(phantom.hu, 7, axis=2)]).astype(np.float32)
    volume = _volume(voxels, (0.0, 0.0, 0.0), (1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (5.0, 3.0, 3.0))
    labels = model.predict(volume)
    with torch.inference_mode():
        x = (torch.from_numpy(voxels).clamp(-1000, 1000) + 1000) / 2000
        logits = sliding_window_inference(x[None], (8, 32, 32), 4, net, overlap=0.25)
        expected = torch.argmax(torch.as_tensor(logits)[0], dim=0).numpy()
    assert labels.shape == phantom.hu.shape
    assert (labels == expected).mean() > 0.999
    assert 0.05 < labels.mean() < 0.95  # both labels present: the test can fail
