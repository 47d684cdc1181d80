"""ONNX models: ``model.onnx`` + ``pacsnode.yaml`` run through onnxruntime give what the
same network gives in torch, for segmentation and classification."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from models.base import ClassificationModel, SegmentationModel, Volume
from models.exported import read_exported_model
from models.network import network_model_class
from models.spec import SPEC_FILE, ModelSpecError
from tests.dicom_factory import chest_phantom, write_ct_series
from workers.series import load_series

SEGMENTATION_SPEC = """\
version: 1.0.0
task: segmentation
queue: cpu
accepts: {modalities: [CT]}
preprocessing:
  intensity: {a_min: -1000, a_max: 1000}
inference: {roi_size: [8, 32, 32]}
labels:
  1: {name: Soft tissue, category: {value: "91723000", meaning: Anatomical Structure},
      property_type: {value: "87784001", meaning: Soft tissue}}
  2: {name: Bone, category: {value: "91723000", meaning: Anatomical Structure},
      property_type: {value: "272673000", meaning: Bone}}
"""

CLASSIFICATION_SPEC = """\
version: 2.0.1
task: classification
input: volume
preprocessing:
  intensity: {a_min: -1000, a_max: 1000}
  input_size: [8, 32, 32]
classes:
  - {name: Grade 1, finding: {value: "258215001", meaning: Grade 1}}
  - {name: Grade 2, finding: {value: "258219007", meaning: Grade 2}}
activation: softmax
"""


def _bands() -> torch.nn.Module:
    """Three channels by intensity band (air, soft tissue, bone after the window), with a
    little seeded spatial context so the 3x3x3 taps matter."""
    torch.manual_seed(5)
    net = torch.nn.Conv3d(1, 3, 3, padding=1)
    with torch.no_grad():
        net.weight.mul_(0.05)
        net.weight[:, 0, 1, 1, 1] += torch.tensor([0.0, 10.0, 20.0])
        assert net.bias is not None
        net.bias.copy_(torch.tensor([0.0, -4.0, -11.0]))
    return net.eval()


class _Classifier(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))
        return logits


def _export(net: torch.nn.Module, example: torch.Tensor, folder: Path, spec: str) -> Path:
    """The same network twice: as model.onnx in ``folder``, as model.ts beside it."""
    folder.mkdir(parents=True)
    (folder / SPEC_FILE).write_text(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter
        torch.onnx.export(
            net, (example,), str(folder / "model.onnx"), dynamo=False,
            input_names=["image"], output_names=["scores"],
            dynamic_axes={"image": {0: "batch"}, "scores": {0: "batch"}},
        )  # fmt: skip
    twin = folder.with_name(folder.name + "-ts")
    twin.mkdir()
    (twin / SPEC_FILE).write_text(spec)
    torch.jit.save(torch.jit.script(net), str(twin / "model.ts"))
    return twin


@pytest.fixture
def volume(tmp_path: Path) -> Volume:
    phantom = chest_phantom(shape=(12, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    return load_series(sorted((tmp_path / "ct").glob("*.dcm"))).volume


def test_onnx_segmentation_equals_the_torch_network(tmp_path: Path, volume: Volume) -> None:
    onnx_folder = tmp_path / "bands-onnx"
    twin = _export(_bands(), torch.zeros(1, 1, 8, 32, 32), onnx_folder, SEGMENTATION_SPEC)
    onnx_class = network_model_class(onnx_folder)
    assert (onnx_class.model_format, network_model_class(twin).model_format) == (
        "onnx",
        "torchscript",
    )
    onnx_model, torch_model = onnx_class(), network_model_class(twin)()
    assert isinstance(onnx_model, SegmentationModel)
    assert isinstance(torch_model, SegmentationModel)
    labels = onnx_model.predict(volume)
    expected = torch_model.predict(volume)
    assert {int(v) for v in np.unique(expected)} == {0, 1, 2}  # every label covers voxels
    assert float(np.mean(labels == expected)) >= 0.9999
    assert np.count_nonzero(labels != expected) <= 2  # only floating-point ties may differ


def test_a_graph_with_a_fixed_batch_size_takes_any_number_of_windows(
    tmp_path: Path, volume: Volume
) -> None:
    """torch.onnx.export without dynamic axes fixes the batch at the example's (3 here);
    the sliding window sends 4 windows a pass, and the last pass fewer."""
    folder = tmp_path / "fixed-onnx"
    folder.mkdir()
    (folder / SPEC_FILE).write_text(SEGMENTATION_SPEC)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            _bands(), (torch.zeros(3, 1, 8, 32, 32),), str(folder / "model.onnx"), dynamo=False
        )
    twin = tmp_path / "fixed-ts"
    twin.mkdir()
    (twin / SPEC_FILE).write_text(SEGMENTATION_SPEC)
    torch.jit.save(torch.jit.script(_bands()), str(twin / "model.ts"))
    onnx_model, torch_model = network_model_class(folder)(), network_model_class(twin)()
    assert isinstance(onnx_model, SegmentationModel)
    assert isinstance(torch_model, SegmentationModel)
    assert onnx_model.runner.net.fixed_batch == 3
    labels, expected = onnx_model.predict(volume), torch_model.predict(volume)
    assert np.count_nonzero(labels != expected) <= 2


def test_onnx_classifier_equals_the_torch_network(tmp_path: Path, volume: Volume) -> None:
    onnx_folder = tmp_path / "grade-onnx"
    twin = _export(
        _Classifier().eval(), torch.zeros(1, 1, 8, 32, 32), onnx_folder, CLASSIFICATION_SPEC
    )
    onnx_model, torch_model = network_model_class(onnx_folder)(), network_model_class(twin)()
    assert isinstance(onnx_model, ClassificationModel)
    assert isinstance(torch_model, ClassificationModel)
    np.testing.assert_allclose(
        onnx_model.predict(volume), torch_model.predict(volume), rtol=1e-5, atol=1e-6
    )


def test_a_folder_with_both_files_is_refused_by_name(tmp_path: Path) -> None:
    folder = tmp_path / "both"
    twin = _export(_bands(), torch.zeros(1, 1, 8, 32, 32), folder, SEGMENTATION_SPEC)
    shutil.copy(twin / "model.ts", folder / "model.ts")
    with pytest.raises(ModelSpecError, match=r"both model\.ts and model\.onnx"):
        read_exported_model(folder)
