"""Classification models: the TorchScript loader, 2-D (per image) and 3-D (per series)
inference, the classification SR, and the shipped xr-nodule-demo classifier."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydicom import dcmread

from models.base import ClassificationModel, InputKindValues, ModelError, SegmentationModel
from models.exported import read_exported_model
from models.network import BUNDLES_DIR, network_model_class
from models.registry import get_model, get_model_class
from models.spec import SPEC_FILE, ModelSpecError
from tests.dicom_factory import (
    chest_phantom,
    demo_radiographs,
    pydicom_data_file,
    write_ct_series,
    write_radiographs,
)
from tests.job_requests import job_request
from tests.peers import dciodvfy_errors
from tests.sr_reading import read_findings
from workers.pipeline import run_job
from workers.series import load_images, load_series

DEMO = BUNDLES_DIR / "xr-nodule-demo"
NODULE = "27925004"


@pytest.fixture(scope="module")
def demo() -> ClassificationModel:
    model = get_model("xr-nodule-demo")
    assert isinstance(model, ClassificationModel)
    return model


@pytest.fixture(scope="module")
def radiographs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[bool]]:
    """Six synthetic DX images (held-out seed), three with an opacity, MONOCHROME1."""
    truth = [True, False, True, False, True, False]
    images = demo_radiographs(truth, seed=20261126)
    folder = tmp_path_factory.mktemp("dx")
    write_radiographs(images, folder, monochrome1=True)
    return folder, truth


def test_demo_registered_from_its_spec() -> None:
    cls = get_model_class("xr-nodule-demo")
    assert issubclass(cls, ClassificationModel)
    assert (cls.version, cls.queue, cls.input_kind) == ("0.1.0", "cpu", InputKindValues.IMAGE)
    (nodule,) = cls.classes
    assert (nodule.name, nodule.finding.value, nodule.finding.scheme_designator) == (
        "Nodule",
        NODULE,
        "SCT",
    )
    assert cls.threshold == 0.5
    assert cls.accepts.modalities == ("CR", "DX")
    assert "DEMONSTRATION" in cls.description
    assert cls.missing_requirements() is None
    assert (DEMO / "model.ts").stat().st_size < 10_000_000


def test_monochrome1_reads_as_monochrome2(tmp_path: Path) -> None:
    image = np.arange(12 * 10, dtype=np.uint16).reshape(12, 10) * 30
    (one,) = load_images(write_radiographs([image], tmp_path / "m1", monochrome1=True))
    (two,) = load_images(write_radiographs([image], tmp_path / "m2", monochrome1=False))
    np.testing.assert_array_equal(one.volume.voxels, two.volume.voxels)
    np.testing.assert_array_equal(two.volume.voxels[0], image.astype(np.float32))
    assert one.volume.spacing_mm == (1.0, 0.15, 0.15)  # ImagerPixelSpacing


def test_demo_finds_the_synthetic_opacities(
    demo: ClassificationModel, radiographs: tuple[Path, list[bool]]
) -> None:
    folder, truth = radiographs
    images = load_images(sorted(folder.glob("*.dcm")))
    probabilities = [demo.predict(image.volume)[0] for image in images]
    assert [p >= demo.threshold for p in probabilities] == truth, probabilities


def test_run_job_sr_says_what_the_model_returned(
    demo: ClassificationModel, radiographs: tuple[Path, list[bool]], tmp_path: Path
) -> None:
    folder, _ = radiographs
    result = run_job(job_request(folder, "xr-nodule-demo", tmp_path))
    assert result.status == "ok", result
    (sr_path,) = (f.path for f in result.files)
    assert dciodvfy_errors(sr_path) == []
    sr = dcmread(sr_path)
    findings = read_findings(sr)
    images = load_images(sorted(folder.glob("*.dcm")))
    assert len(findings) == len(images) == len(result.findings)
    for image, reported in zip(images, result.findings, strict=True):
        (probability,) = demo.predict(image.volume)
        number = image.datasets[0].InstanceNumber
        code, in_sr, verdict = findings[f"Nodule (image {number})"]
        assert code == NODULE
        assert in_sr == pytest.approx(probability, rel=1e-9, abs=1e-12)
        assert verdict == ("present" if probability >= 0.5 else "absent")
        assert reported["probability"] == probability
        assert reported["sop_instance_uids"] == [image.datasets[0].SOPInstanceUID]
    assert sr.PatientID == "XR-001"
    assert sr.StudyInstanceUID == images[0].datasets[0].StudyInstanceUID


def test_real_cr_compressed_or_not_gives_one_answer(demo: ClassificationModel) -> None:
    """RG1 (pydicom-data): a real 1955x1841 MONOCHROME1 CR, as stored and as JPEG 2000."""
    raw, j2k = (load_images([pydicom_data_file(n)]) for n in ("RG1_UNCR.dcm", "RG1_J2KR.dcm"))
    np.testing.assert_array_equal(raw[0].volume.voxels, j2k[0].volume.voxels)
    assert raw[0].volume.voxels.shape == (1, 1955, 1841)
    (p_raw,) = demo.predict(raw[0].volume)
    (p_j2k,) = demo.predict(j2k[0].volume)
    assert 0.0 <= p_raw <= 1.0
    assert p_raw == p_j2k


# --- a 3-D TorchScript classifier written by the test ------------------------------------


class _TinyNet3D(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))
        return logits


VOLUME_SPEC = """\
version: 2.0.1
task: classification
input: volume
queue: cpu
accepts: {modalities: [CT], min_slices: 4}
preprocessing:
  intensity: {a_min: -1000, a_max: 1000}
  input_size: [8, 32, 32]
classes:
  - {name: Grade 1, finding: {value: "258215001", meaning: Grade 1}}
  - {name: Grade 2, finding: {value: "258219007", meaning: Grade 2}}
  - {name: Grade 3, finding: {value: "258224005", meaning: Grade 3}}
activation: softmax
threshold: 0.4
"""


@pytest.fixture
def volume_classifier(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(3)
    net = _TinyNet3D().eval()
    folder = tmp_path / "ct-grade-test"
    folder.mkdir()
    torch.jit.save(torch.jit.script(net), str(folder / "model.ts"))
    (folder / SPEC_FILE).write_text(VOLUME_SPEC)
    return folder, net


def test_volume_classifier_equals_its_network(
    volume_classifier: tuple[Path, torch.nn.Module], tmp_path: Path
) -> None:
    folder, net = volume_classifier
    phantom = chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    volume = load_series(sorted((tmp_path / "ct").glob("*.dcm"))).volume
    cls = network_model_class(folder)
    assert issubclass(cls, ClassificationModel)
    assert cls.input_kind == InputKindValues.VOLUME
    probabilities = cls().predict(volume)

    x = torch.from_numpy(volume.voxels)[None, None].clamp(-1000, 1000)
    x = (x + 1000) / 2000
    x = F.interpolate(x, size=[8, 32, 32], mode="trilinear", align_corners=False)
    with torch.inference_mode():
        expected = torch.softmax(net(x)[0], dim=0)
    np.testing.assert_allclose(probabilities, expected.numpy(), rtol=1e-5)
    assert sum(probabilities) == pytest.approx(1.0)


def test_spec_errors_name_file_and_field(tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / SPEC_FILE).write_text(VOLUME_SPEC)
    with pytest.raises(ModelSpecError, match=r"bad/model\.ts is missing"):
        read_exported_model(folder)
    (folder / "model.ts").write_bytes(b"")
    cases = {
        "activation: softmax": (
            (
                "activation: softmax\nlabels: {1: {category: {value: '1', meaning: a}, "
                "property_type: {value: '2', meaning: b}}}"
            ),
            "labels are for segmentation models",
        ),
        "version: 2.0.1\n": ("", "field 'version' is needed"),
        "input: volume": ("input: image", r"input_size needs 2 numbers"),
    }
    for old, (new, message) in cases.items():
        (folder / SPEC_FILE).write_text(VOLUME_SPEC.replace(old, new))
        with pytest.raises(ModelSpecError, match=message) as caught:
            read_exported_model(folder)
        assert str(folder / SPEC_FILE) in str(caught.value)
    one_class = VOLUME_SPEC[: VOLUME_SPEC.index("  - {name: Grade 2")] + "activation: softmax\n"
    (folder / SPEC_FILE).write_text(one_class)
    with pytest.raises(ModelSpecError, match="softmax needs two classes"):
        read_exported_model(folder)


def test_dropped_into_models_folder_runs_by_name(
    volume_classifier: tuple[Path, torch.nn.Module],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A folder copied under models/bundles/ is a model named after it, with no code."""
    folder, _ = volume_classifier
    from models import network, registry

    # Register into copies, so the test's model stays out of the other tests' registry.
    monkeypatch.setattr(registry, "_MODEL_CLASSES", dict(registry._MODEL_CLASSES))
    monkeypatch.setattr(registry, "_INSTANCES", dict(registry._INSTANCES))
    target = tmp_path / "zoo"
    shutil.copytree(folder, target / "ct-grade-test")
    classes = network.discover_network_models(target)
    assert [c.name for c in classes] == ["ct-grade-test"]
    registry.register_model(classes[0])
    phantom = chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    result = run_job(job_request(tmp_path / "ct", "ct-grade-test", tmp_path, job_id=2))
    assert result.status == "ok", result
    findings = read_findings(dcmread(result.files[0].path))
    assert sorted(findings) == ["Grade 1", "Grade 2", "Grade 3"]
    for reported in result.findings:
        _, probability, verdict = findings[reported["name"]]
        assert probability == pytest.approx(reported["probability"], rel=1e-9)
        assert verdict == ("present" if reported["probability"] >= 0.4 else "absent")
    assert dciodvfy_errors(result.files[0].path) == []


def test_segmentation_network_with_too_few_channels_fails_clearly(tmp_path: Path) -> None:
    """One output channel cannot hold label 1 (channel 0 is background): the job's input
    is not to blame, but the model says so instead of reporting everything absent."""
    folder = tmp_path / "one-channel"
    folder.mkdir()
    torch.jit.save(torch.jit.script(torch.nn.Conv3d(1, 1, 1)), str(folder / "model.ts"))
    (folder / SPEC_FILE).write_text(
        "version: '1'\ntask: segmentation\ninference: {roi_size: [8, 16, 16]}\n"
        "labels: {1: {name: Liver, category: {value: '123037004', meaning: Anatomical "
        "Structure}, property_type: {value: '10200004', meaning: Liver}}}\n"
    )
    phantom = chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    volume = load_series(sorted((tmp_path / "ct").glob("*.dcm"))).volume
    model = network_model_class(folder)()
    assert isinstance(model, SegmentationModel)
    with pytest.raises(ModelError, match="returned 1 output channels; its labels up to 1 need"):
        model.predict(volume)
    (folder / SPEC_FILE).write_text((folder / SPEC_FILE).read_text().replace("{1: {", "{300: {"))
    with pytest.raises(
        ModelSpecError, match=r"labels\.300: every label needs a value from 1 to 255"
    ):
        read_exported_model(folder)
