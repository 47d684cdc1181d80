"""A bundle's transforms and inferer are reproduced exactly or refused by name: the grid
of MONAI's Spacing and its inversion, the gaussian sliding window, and every transform
pacsnode does not reproduce."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from models.bundle import INFERENCE_FILE, read_bundle
from models.network import BUNDLES_DIR, NetworkRunner, spacing_inverse, spacing_resample
from models.spec import ModelSpecError

DEMO = BUNDLES_DIR / "ct-bone-demo"


@pytest.mark.parametrize(
    ("spacing", "target"), [((1.3, 0.7, 2.5), (1.0, 1.5, 1.0)), ((0.8, 0.8, 5.0), (1.5, 1.5, 2.0))]
)
def test_spacing_is_monais_spacing_and_back(
    spacing: tuple[float, float, float], target: tuple[float, float, float]
) -> None:
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    volume = torch.from_numpy(np.random.default_rng(0).normal(size=(1, 23, 31, 17)))
    image = MetaTensor(volume.float(), affine=torch.from_numpy(np.diag([*spacing, 1.0])))
    transform = Spacing(pixdim=target, mode="bilinear")
    expected = transform(image)
    resampled = spacing_resample(volume[None].float(), spacing, target)[0]
    assert tuple(resampled.shape) == tuple(expected.shape)
    assert float((resampled - torch.as_tensor(expected)).abs().max()) < 1e-5
    restored = spacing_inverse(resampled[None], spacing, target, volume.shape[1:])[0]
    inverted = torch.as_tensor(transform.inverse(expected))
    assert float((restored - inverted).abs().max()) < 1e-5


def _bundle(tmp_path: Path, change: Any) -> Path:
    folder = tmp_path / "bundle"
    shutil.copytree(DEMO, folder, ignore=shutil.ignore_patterns("scripts"))
    inference = json.loads((folder / INFERENCE_FILE).read_text())
    change(inference)
    (folder / INFERENCE_FILE).write_text(json.dumps(inference))
    return folder


def _pre(inference: dict[str, Any]) -> list[dict[str, Any]]:
    transforms: list[dict[str, Any]] = inference["preprocessing"]["transforms"]
    return transforms


def test_a_gaussian_window_is_monais_gaussian_window(tmp_path: Path) -> None:
    from monai.inferers import sliding_window_inference

    folder = _bundle(
        tmp_path,
        lambda i: i["inferer"].update(mode="gaussian", sigma_scale=0.2, padding_mode="replicate"),
    )
    info = read_bundle(folder)
    assert (info.window_mode, info.sigma_scale, info.padding_mode) == ("gaussian", 0.2, "replicate")
    runner = NetworkRunner(info)
    assert info.roi_size is not None
    x = torch.from_numpy(np.random.default_rng(1).random((1, 1, 40, 72, 72), np.float32))
    with torch.inference_mode():
        logits = runner.sliding_window(x)
        expected = sliding_window_inference(
            x, info.roi_size, runner.sw_batch_size, runner.net, overlap=info.overlap,
            mode="gaussian", sigma_scale=0.2, padding_mode="replicate",
        )  # fmt: skip
    assert torch.equal(logits, torch.as_tensor(expected))


def test_an_at_reference_takes_the_files_literal_value(tmp_path: Path) -> None:
    def spacing_by_reference(inference: dict[str, Any]) -> None:
        inference["pixdim"] = [1.5, 1.5, 2.0]
        _pre(inference)[1:1] = [
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim"},
        ]

    info = read_bundle(_bundle(tmp_path, spacing_by_reference))
    assert info.preprocessing.spacing_mm == (1.5, 1.5, 2.0)
    assert info.preprocessing.axcodes == "RAS"


#: Bundle changes the fast path does not reproduce, and what its refusal says.
NOT_REPRODUCED: list[tuple[Any, str]] = [
    (
        lambda i: _pre(i).insert(1, {"_target_": "CropForegroundd", "keys": "image"}),
        r"preprocessing#transforms#1 CropForegroundd: pacsnode's fast path does not",
    ),
    (
        lambda i: i["postprocessing"]["transforms"].append(
            {"_target_": "KeepLargestConnectedComponentd", "keys": "pred"}
        ),
        r"postprocessing#transforms#1 KeepLargestConnectedComponentd: pacsnode's fast path does not",
    ),
    (
        lambda i: _pre(i).insert(
            1, {"_target_": "Spacingd", "keys": "image", "pixdim": "$[1.0, 1.0, 1.0]"}
        ),
        r"argument 'pixdim' is the expression '\$\[1\.0, 1\.0, 1\.0\]'",
    ),
    (
        lambda i: _pre(i).append(
            {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0, 1.0]}
        ),
        r"#3 Spacingd: comes after ScaleIntensityRange",
    ),
    (
        lambda i: _pre(i).insert(
            1, {"_target_": "Spacingd", "keys": "image", "pixdim": [1, 1, 1], "mode": "nearest"}
        ),
        r"mode='nearest' is not reproduced \(pacsnode uses 'bilinear'\)",
    ),
    (
        lambda i: i["inferer"].update({"_target_": "SliceInferer"}),
        r"inferer SliceInferer is not reproduced",
    ),
    (
        lambda i: _pre(i).insert(
            1, {"_target_": "Spacingd", "keys": "image", "pixdim": [1.0, 1.0, 1.0]}
        ),
        r"#1 Spacingd: Spacing without an Orientation before it",
    ),
    (
        lambda i: _pre(i).insert(
            2, {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 1}
        ),
        r"#2 ScaleIntensityRanged: a second intensity",
    ),
    (
        lambda i: i["inferer"].update(overlap=[0.5, 0.5, 0.5]),
        r"inferer overlap=\[0\.5, 0\.5, 0\.5\] is not reproduced",
    ),
    (
        lambda i: _pre(i).append({"_target_": "Resized", "keys": "image", "spatial_size": [9]}),
        r"#3 Resized: pacsnode's fast path does not",
    ),
    (
        lambda i: i["preprocessing"].update(transforms="$@preprocessing_transforms"),
        r"preprocessing transforms are '\$@preprocessing_transforms', not a list",
    ),
]


@pytest.mark.parametrize(("change", "message"), NOT_REPRODUCED)
def test_what_is_not_reproduced_is_refused_by_name(
    tmp_path: Path, change: Any, message: str
) -> None:
    """Without an evaluator the bundle's own chain cannot run either: refused, naming
    what the fast path does not reproduce and why the chain cannot run."""
    folder = _bundle(tmp_path, change)
    with pytest.raises(ModelSpecError, match=message) as caught:
        read_bundle(folder)
    assert str(folder / INFERENCE_FILE) in str(caught.value)
    assert "the bundle's own chain cannot run" in str(caught.value)


@pytest.mark.parametrize(("change", "message"), NOT_REPRODUCED[:-1])
def test_what_is_not_reproduced_runs_the_bundles_own_chain(
    tmp_path: Path, change: Any, message: str
) -> None:
    """With a SupervisedEvaluator the same bundles run their own chain, and say why."""

    def with_evaluator(inference: dict[str, Any]) -> None:
        _pre(inference)[0] = {"_target_": "LoadImaged", "keys": "image",
                              "ensure_channel_first": True}  # fmt: skip
        change(inference)
        inference["evaluator"] = {"_target_": "SupervisedEvaluator", "device": "@device",
                                  "val_data_loader": "@dataloader", "network": "@network",
                                  "inferer": "@inferer", "postprocessing": "@postprocessing"}  # fmt: skip

    folder = _bundle(tmp_path, with_evaluator)
    spec = yaml.safe_load((folder / "pacsnode.yaml").read_text())
    with pytest.raises(ModelSpecError, match=r"preprocessing\.intensity, inference\.roi_size, "
                       r"inference\.overlap set, but the bundle runs its own chain"):  # fmt: skip
        read_bundle(folder)  # the fast path's settings would be ignored
    del spec["preprocessing"], spec["inference"]
    (folder / "pacsnode.yaml").write_text(yaml.safe_dump(spec))
    info = read_bundle(folder)
    assert info.chain == "bundle"
    assert re.search(message, info.fast_path_refusal or "")


def test_fast_only_refuses_what_the_fast_path_does_not_reproduce(tmp_path: Path) -> None:
    folder = _bundle(tmp_path, NOT_REPRODUCED[0][0])
    spec = folder / "pacsnode.yaml"
    spec.write_text(
        spec.read_text().replace("  precision: fp32", "  precision: fp32\n  chain: fast")
    )
    with pytest.raises(ModelSpecError, match=NOT_REPRODUCED[0][1]) as caught:
        read_bundle(folder)
    assert "own chain" not in str(caught.value)


def test_pretrained_backbone_weights_are_not_downloaded(tmp_path: Path) -> None:
    """breast_density's network_def asks for ImageNet weights (``pretrained: true``);
    they would be replaced by models/model.pt anyway, and the download fails offline."""
    from monai.networks.nets import DenseNet121

    from tests import model_zoo as zoo

    network_def = {"_target_": "DenseNet121", "spatial_dims": 2, "in_channels": 3,
                   "out_channels": 4, "pretrained": True}  # fmt: skip
    classes = [{"name": c, "finding": {"value": "129715009", "meaning": c}} for c in "ABCD"]
    bundle = zoo.make_bundle(
        "breast_density_classification", tmp_path / "density", network_def,
        spec={"task": "classification", "input": "image", "classes": classes,
              "activation": "sigmoid"},
    )  # fmt: skip
    torch.manual_seed(0)
    weights = DenseNet121(spatial_dims=2, in_channels=3, out_channels=4).state_dict()
    torch.save(weights, bundle / "models" / "model.pt")
    runner = NetworkRunner(read_bundle(bundle))
    loaded = runner.net.state_dict()
    assert all(torch.equal(loaded[k].cpu(), v) for k, v in weights.items())
