"""Real Model Zoo bundles give MONAI's own answer in pacsnode.

For each configuration in ``tests/data/model_zoo`` (see ``tests/model_zoo.py`` for how
it is made runnable offline), pacsnode's label map for a real series is compared with
what ``monai.bundle`` writes for the same DICOM series read by MONAI's ITKReader: at
least 99 % of voxels equal and Dice at least 0.95 for every label covering a real
region; the classifier's probabilities equal within 1e-4. The affine pacsnode hands the
bundle must equal ITKReader's, so the comparison is voxel for voxel on the same grid.
The path each bundle takes (pacsnode's fast path or the bundle's own chain) is asserted
too, so a change in what the fast path reproduces shows up here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models.base import ClassificationModel, SegmentationModel, Volume
from models.bundle_chain import itk_layout
from models.network import network_model_class
from tests import model_zoo as zoo
from tests.dicom_factory import (
    CH2_PATH,
    cranium_hu,
    write_ct_series,
    write_mr_series_from_nifti,
    write_radiographs,
)
from workers.series import load_images, load_series

REGION_VOXELS = zoo.REGION_VOXELS


@pytest.fixture(scope="module")
def head_ct() -> tuple[np.ndarray, tuple[float, float, float]]:
    """The real head CT at half its in-plane resolution (108 x 128 x 128), to keep the
    runs short on two cores."""
    hu, spacing = cranium_hu()
    return hu[:, ::2, ::2], (spacing[0], spacing[1] * 2, spacing[2] * 2)


def _ct_series(head_ct: Any, folder: Path, orientation: str) -> Path:
    hu, spacing = head_ct
    write_ct_series(hu, folder, spacing_mm=spacing, orientation=orientation)  # type: ignore[arg-type]
    return folder


def _compare(bundle: Path, series: Path, volume: Volume, tmp_path: Path, chain: str) -> None:
    model = network_model_class(bundle)()
    assert isinstance(model, SegmentationModel)
    assert model.runner.info.chain == chain, model.runner.info.fast_path_refusal
    labels = model.predict(volume)
    reference, affine = zoo.saved_labels(
        zoo.monai_reference(bundle, {"image": str(series)}, tmp_path / "monai")
    )
    _, pacsnode_affine = itk_layout(volume)
    np.testing.assert_allclose(pacsnode_affine, affine, atol=1e-4)
    ours = labels.transpose(2, 1, 0)
    assert ours.shape == reference.shape
    equal = float((ours == reference).mean())
    regions = [c for c in range(1, int(reference.max()) + 1)
               if int((reference == c).sum()) >= REGION_VOXELS]  # fmt: skip
    dices = {c: zoo.dice(ours == c, reference == c) for c in regions}
    assert len(regions) >= 1 + (reference.max() > 1), (np.bincount(reference.ravel()), dices)
    assert equal >= 0.99, (equal, dices)
    assert all(d >= 0.95 for d in dices.values()), dices


CT_CASES = [
    # bundle, orientation, the path pacsnode takes, pacsnode.yaml additions, config edits,
    # where the bundle's own config loads its weights from, output channels
    ("spleen_ct_segmentation", "axial", "fast", {}, None, "models/model.pt", 2),
    ("spleen_ct_segmentation", "oblique", "fast", {}, None, "models/model.pt", 2),
    ("spleen_ct_segmentation", "sagittal", "bundle", {"inference": {"chain": "bundle"}},
     None, "models/model.pt", 2),
    ("swin_unetr_btcv_segmentation", "coronal", "fast", {}, None, "models/model.pt", 14),
    ("wholeBody_ct_segmentation", "axial", "bundle", {}, None, "models/model.pt", 105),
    ("wholeBody_ct_segmentation", "sagittal", "bundle", {},
     {"displayable_configs": {"highres": False, "sw_overlap": 0.25, "sw_batch_size": 1}},
     "models/model_lowres.pt", 105),
    ("pediatric_abdominal_ct_segmentation", "axial", "bundle", {}, None,
     "models/dynunet_FT.pt", 4),
]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "orientation", "chain", "spec", "edit", "weights", "channels"),
    CT_CASES,
    ids=[f"{c[0]}-{c[1]}-{c[2]}" + ("-lowres" if c[4] else "") for c in CT_CASES],
)
def test_ct_bundle_gives_monais_labels(
    head_ct: Any,
    tmp_path: Path,
    name: str,
    orientation: str,
    chain: str,
    spec: dict[str, Any],
    edit: dict[str, Any] | None,
    weights: str,
    channels: int,
) -> None:
    series = _ct_series(head_ct, tmp_path / "series", orientation)
    bundle = zoo.make_bundle(
        name,
        tmp_path / name,
        zoo.small_network(3, 1, channels),
        spec=zoo.segmentation_spec(channels, **spec),
        weights=sorted({"models/model.pt", weights}),
        edit=edit,
    )
    image = zoo.preprocessed(bundle, {"image": str(series)})["image"]
    zoo.train_and_save(bundle, image, classes=min(channels, 3))
    volume = load_series(sorted(series.glob("*.dcm"))).volume
    _compare(bundle, series, volume, tmp_path, chain)


def test_cardiac_slice_bundle_gives_monais_labels(tmp_path: Path) -> None:
    """ventricular_short_axis_3label: a 2-D network run slice by slice by MONAI's
    SliceInferer over the loaded array's third axis, on a real T1 MR series."""
    series = tmp_path / "series"
    write_mr_series_from_nifti(CH2_PATH, series, patient_id="MR-ZOO")
    bundle = zoo.make_bundle(
        "ventricular_short_axis_3label",
        tmp_path / "ventricular",
        zoo.small_network(2, 1, 4),
        spec=zoo.segmentation_spec(4, accepts={"modalities": ["MR"]}),
    )
    image = zoo.preprocessed(bundle, {"image": str(series)})["image"]
    zoo.train_and_save(bundle, image, classes=3, slices=True)
    volume = load_series(sorted(series.glob("*.dcm"))).volume
    model = network_model_class(bundle)()
    assert isinstance(model, SegmentationModel)
    assert model.runner.info.chain == "bundle"
    labels = model.predict(volume)
    reference, affine = zoo.saved_labels(
        zoo.monai_reference(bundle, {"image": str(series)}, tmp_path / "monai", run_id="evaluating")
    )
    np.testing.assert_allclose(itk_layout(volume)[1], affine, atol=1e-4)
    ours = labels.transpose(2, 1, 0)
    assert float((ours == reference).mean()) >= 0.99
    regions = [c for c in (1, 2, 3) if int((reference == c).sum()) >= REGION_VOXELS]
    assert len(regions) >= 2, np.bincount(reference.ravel())
    assert all(zoo.dice(ours == c, reference == c) >= 0.95 for c in regions)


def test_mammogram_classifier_gives_monais_probabilities(tmp_path: Path) -> None:
    """breast_density_classification on the bundle's own sample mammogram: MONAI reads
    the JPEG, pacsnode the same pixels as an MG DICOM image; the four sigmoid
    probabilities agree within 1e-4."""
    from PIL import Image

    jpeg = zoo.ZOO / "breast_density_classification" / "sample_A1.jpg"
    rgb = np.asarray(Image.open(jpeg))
    assert (rgb[..., 0] == rgb[..., 2]).all()  # a grey image saved in colour
    files = write_radiographs(
        [rgb[..., 0].astype(np.uint16)], tmp_path / "mg", bits_stored=8, modality="MG"
    )
    classes = [
        {"name": f"Density {c}", "finding": {"value": "129715009", "meaning": f"Density {c}"}}
        for c in "ABCD"
    ]
    bundle = zoo.make_bundle(
        "breast_density_classification",
        tmp_path / "breast_density",
        zoo.small_classifier((3, 299, 299), 4),
        spec={"task": "classification", "input": "image", "queue": "cpu",
              "accepts": {"modalities": ["MG"]}, "classes": classes, "activation": "sigmoid"},
    )  # fmt: skip
    zoo.save_seeded(bundle)
    model = network_model_class(bundle)()
    assert isinstance(model, ClassificationModel)
    assert model.runner.info.chain == "bundle"
    [image] = load_images(files)
    probabilities = model.predict(image.volume)
    out = zoo.monai_reference(
        bundle, {"image": str(jpeg)}, tmp_path / "monai", reader="PILReader", run_id="evaluating"
    )
    with (out / "predictions.csv").open() as fh:
        [row] = list(csv.reader(fh))
    expected = [float(v) for v in row[1:]]
    assert len(expected) == 4
    assert np.allclose(probabilities, expected, atol=1e-4), (probabilities, expected)
    assert max(expected) - min(expected) > 1e-3  # the network tells the classes apart
