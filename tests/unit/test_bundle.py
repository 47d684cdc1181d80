"""MONAI bundles as models (models/bundle.py) and the shipped ct-bone-demo bundle."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from models.base import SegmentationModel
from models.bundle import read_bundle
from models.network import BUNDLES_DIR, network_model_class
from models.registry import available_models, get_model_class, get_segmentation_model
from models.spec import SPEC_FILE, ModelSpecError
from tests.dicom_factory import ChestPhantom, chest_phantom, write_ct_series
from tests.job_requests import job_request
from tests.peers import dciodvfy_errors
from workers.pipeline import run_job
from workers.series import load_series

DEMO = BUNDLES_DIR / "ct-bone-demo"
#: The demo network reaches about 0.99 on this phantom; the threshold leaves a margin.
MIN_DICE = 0.9


def _dice(a: npt.NDArray[np.generic], b: npt.NDArray[np.generic]) -> float:
    x, y = a.astype(bool), b.astype(bool)
    return 2.0 * float(np.count_nonzero(x & y)) / float(np.count_nonzero(x) + np.count_nonzero(y))


@pytest.fixture(scope="module")
def phantom() -> ChestPhantom:
    return chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory, phantom: ChestPhantom) -> Path:
    folder = tmp_path_factory.mktemp("phantom")
    write_ct_series(phantom.hu, folder, spacing_mm=phantom.spacing_mm)
    return folder


@pytest.fixture(scope="module")
def model() -> SegmentationModel:
    return get_segmentation_model("ct-bone-demo")


def _copy_bundle(tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(DEMO, target, ignore=shutil.ignore_patterns("scripts"))
    return target


def test_registered_from_metadata_and_spec() -> None:
    cls = get_model_class("ct-bone-demo")
    assert issubclass(cls, SegmentationModel)
    assert cls.name == "ct-bone-demo"
    assert (cls.version, cls.queue) == ("0.1.0", "cpu")
    assert cls.missing_requirements() is None
    (bone,) = cls.labels
    assert (bone.value, bone.name, bone.color_rgb) == (1, "Bone", (241, 214, 145))
    assert (bone.category.value, bone.category.scheme_designator) == ("85756007", "SCT")
    assert (bone.property_type.value, bone.property_type.meaning) == ("272673000", "Bone")
    assert cls.accepts.modalities == ("CT",)
    assert "DEMONSTRATION" in cls.description
    assert available_models()["ct-bone-demo"] is cls  # discovery is stable across calls


def test_weights_are_small() -> None:
    assert (DEMO / "models" / "model.pt").stat().st_size < 10_000_000


def test_phantom_bone(model: SegmentationModel, series_dir: Path, phantom: ChestPhantom) -> None:
    volume = load_series(sorted(series_dir.glob("*.dcm"))).volume
    labels = model.predict(volume)
    assert labels.dtype == np.uint8
    assert labels.shape == phantom.hu.shape
    assert set(np.unique(labels)) <= {0, 1}
    assert _dice(labels, phantom.spine) >= MIN_DICE


def test_reorientation_and_resampling(tmp_path: Path, phantom: ChestPhantom) -> None:
    """axcodes and spacing_mm from pacsnode.yaml: the label map comes back on our grid."""
    bundle = _copy_bundle(tmp_path, "ct-bone-ras")
    spec = (bundle / SPEC_FILE).read_text()
    spec = spec.replace(
        "preprocessing:\n", "preprocessing:\n  axcodes: RAS\n  spacing_mm: [2.0, 2.0, 4.0]\n"
    )
    (bundle / SPEC_FILE).write_text(spec)
    info = read_bundle(bundle)
    assert (info.preprocessing.axcodes, info.preprocessing.spacing_mm) == ("RAS", (2.0, 2.0, 4.0))
    folder = tmp_path / "series"
    write_ct_series(phantom.hu, folder, spacing_mm=phantom.spacing_mm)
    volume = load_series(sorted(folder.glob("*.dcm"))).volume
    model = network_model_class(bundle)()
    assert isinstance(model, SegmentationModel)
    labels = model.predict(volume)
    assert labels.shape == phantom.hu.shape
    assert _dice(labels, phantom.spine) >= 0.8


def test_missing_weights_named(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    (bundle / "models" / "model.pt").unlink()
    message = network_model_class(bundle).missing_requirements()
    assert message is not None
    assert str(bundle / "models" / "model.pt") in message
    assert "model.ts" in message
    with pytest.raises(ModelSpecError, match=r"has no weights"):
        network_model_class(bundle)()


def test_unknown_spec_key_named(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    spec = bundle / SPEC_FILE
    spec.write_text(spec.read_text().replace("  overlap: 0.25\n", "  overlap: 0.25\n  tile: 3\n"))
    message = network_model_class(bundle).missing_requirements()
    assert message is not None
    assert message.startswith(f"{spec}: inference.tile: Extra inputs are not permitted")


def test_bad_spec_value_named(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    spec = bundle / SPEC_FILE
    spec.write_text(spec.read_text().replace("precision: fp32", "precision: fp8"))
    with pytest.raises(
        ModelSpecError, match=r"pacsnode\.yaml: inference\.precision: Input should be"
    ):
        read_bundle(bundle)


def test_label_without_codes_named(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    spec = bundle / SPEC_FILE
    text = spec.read_text()
    spec.write_text(text[: text.index("labels:")])
    with pytest.raises(
        ModelSpecError, match=r"field 'labels' must give SNOMED CT codes .*1 \('bone'\)"
    ):
        read_bundle(bundle)


def test_metadata_without_channel_def_named(tmp_path: Path) -> None:
    bundle = _copy_bundle(tmp_path)
    metadata = bundle / "configs" / "metadata.json"
    metadata.write_text(metadata.read_text().replace('"channel_def"', '"channels"'))
    message = network_model_class(bundle).missing_requirements()
    assert message is not None
    assert message.startswith(f"{metadata}: field 'network_data_format.outputs.pred.channel_def'")


def test_run_job_writes_valid_seg_and_sr(series_dir: Path, tmp_path: Path) -> None:
    result = run_job(job_request(series_dir, "ct-bone-demo", tmp_path))
    assert result.status == "ok", result
    assert [f.name for f in result.files] == ["seg-binary.dcm", "sr.dcm"]
    # The network reports the parts of its inference, which add up to no more than it.
    timings = result.timings_s
    stages = ["load", "inference", "preprocess", "network", "postprocess", "results"]
    assert list(timings)[: len(stages)] == stages
    parts = timings["preprocess"] + timings["network"] + timings["postprocess"]
    assert 0 < parts <= timings["inference"]
    assert timings["network"] > timings["postprocess"]
    for written in result.files:
        assert dciodvfy_errors(written.path) == [], written


def test_torchscript_bundle(tmp_path: Path, series_dir: Path, model: SegmentationModel) -> None:
    """models/model.ts is used when there is no model.pt, with the same result."""
    import torch
    from monai.bundle import ConfigParser

    bundle = _copy_bundle(tmp_path)
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    net = parser.get_parsed_content("network_def")
    net.load_state_dict(torch.load(bundle / "models" / "model.pt", weights_only=True))
    torch.jit.save(torch.jit.script(net.eval()), str(bundle / "models" / "model.ts"))
    (bundle / "models" / "model.pt").unlink()
    assert read_bundle(bundle).torchscript
    volume = load_series(sorted(series_dir.glob("*.dcm"))).volume
    np.testing.assert_array_equal(
        network_model_class(bundle)().predict(volume), model.predict(volume)
    )


@pytest.mark.parametrize("channels", [1, 2, 4])
def test_argmax_channels_equals_torch_argmax_ties_included(channels: int) -> None:
    import torch

    from models.network import argmax_channels

    generator = torch.Generator().manual_seed(channels)
    logits = torch.randint(0, 3, (channels, 5, 6, 7), generator=generator).float()  # many ties
    expected = torch.argmax(logits, dim=0).to(torch.uint8)
    assert torch.equal(argmax_channels(logits), expected)


def test_stitching_falls_back_to_host_memory(
    model: SegmentationModel, series_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a GPU out of memory while stitching, the same windows are stitched on the host.

    This machine has no GPU, so the runner is told its device is CUDA and MONAI's
    sliding window is wrapped: a call that stitches on the (pretend) GPU raises CUDA's
    out-of-memory error, a call that stitches in host memory runs for real on the CPU.
    """
    import monai.inferers
    import torch

    from models.network import NetworkSegmentationModel, argmax_channels

    assert isinstance(model, NetworkSegmentationModel)
    volume = load_series(sorted(series_dir.glob("*.dcm"))).volume
    expected = model.predict(volume)
    real = monai.inferers.sliding_window_inference
    stitched_on: list[str] = []

    def pretend_gpu(*args: Any, **kwargs: Any) -> Any:
        stitched_on.append(str(kwargs["device"]))
        if kwargs["device"] != torch.device("cpu"):
            raise torch.OutOfMemoryError("CUDA out of memory (pretend)")
        return real(*args, **{**kwargs, "sw_device": torch.device("cpu")})

    runner = model.runner
    with torch.inference_mode():
        x, _ = runner.to_network_input(volume)
        monkeypatch.setattr(runner, "device", torch.device("cuda"))
        monkeypatch.setattr(monai.inferers, "sliding_window_inference", pretend_gpu)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
        logits = runner.sliding_window(x)
    assert stitched_on == ["cuda", "cpu"]
    assert logits.device == torch.device("cpu")
    np.testing.assert_array_equal(argmax_channels(logits[0]).numpy(), expected)
