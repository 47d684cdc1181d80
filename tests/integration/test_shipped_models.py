"""Every shipped model through the whole path: storescu -> pacsnode -> results at storescp.

ct-tissue has its own, deeper test (test_end_to_end.py); here the pretrained
mr-brain-mask on the real T1 brain MR, the ct-bone-demo MONAI bundle on the phantom, and
the xr-nodule-demo TorchScript classifier on synthetic DX images and a real CR.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from models.base import ClassificationModel
from models.registry import get_model, get_segmentation_model
from node.state import JobStateValues
from tests.dicom_factory import (
    CH2_PATH,
    demo_radiographs,
    pydicom_data_file,
    write_mr_series_from_nifti,
    write_radiographs,
)
from tests.integration.conftest import received_by_modality, seg_label_map
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config
from tests.peers import StoreSCP, dciodvfy_errors, run_storescu
from tests.sr_reading import read_findings, read_volumes_ml
from workers.series import load_images, load_series

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def brain_mr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ch2")
    write_mr_series_from_nifti(CH2_PATH, folder, patient_id="CH2")
    return folder


def _node_config(tmp_path: Path, destination: StoreSCP, rule: dict[str, Any]) -> dict[str, Any]:
    config = node_config(
        tmp_path / "data",
        port=0,
        destinations={
            "pacs": {"ae_title": "DESTPACS", "host": "127.0.0.1", "port": destination.port}
        },
        rules=[rule],
    )
    del config["node"]["port"]
    return config


@pytest.mark.parametrize(
    ("model_name", "modality", "series_fixture"),
    [("mr-brain-mask", "MR", "brain_mr_dir"), ("ct-bone-demo", "CT", "phantom_dir")],
)
def test_model_result_reaches_the_destination(
    model_name: str,
    modality: str,
    series_fixture: str,
    request: pytest.FixtureRequest,
    tmp_path: Path,
) -> None:
    series_dir: Path = request.getfixturevalue(series_fixture)
    rule = {"name": model_name, "match": {"Modality": modality}, "models": [model_name], "send_to": ["pacs"]}  # fmt: skip
    with StoreSCP(ae_title="DESTPACS") as destination:
        config = _node_config(tmp_path, destination, rule)
        with NodeProcess(tmp_path / "node", config) as node:
            sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", series_dir)
            assert sent.returncode == 0, sent.stderr
            (job,) = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED}, 300)
            assert (job.model, job.state, job.reason) == (model_name, "delivered", None)
            files = destination.wait_for_files(2)
        for path in files:
            assert dciodvfy_errors(path) == [], path
        received = received_by_modality(files)
        seg_path = next(p for p in files if p.name.startswith("SG"))

        # The SEG is what the model gives on the same series, voxel for voxel; the SR's
        # volumes are the mask's.
        source = load_series(sorted(series_dir.glob("*.dcm")))
        model = get_segmentation_model(model_name)
        expected = model.predict(source.volume)
        assert expected.any()
        assert (seg_label_map(seg_path, list(source.datasets), model) == expected).all()
        volumes = read_volumes_ml(received["SR"])
        for spec in model.labels:
            mask_ml = float((expected == spec.value).sum()) * source.volume.voxel_volume_ml
            if mask_ml:
                assert volumes[spec.name] == pytest.approx(mask_ml, rel=0.01)
    if model_name == "mr-brain-mask":
        brain_ml = volumes["Brain"]
        assert 1880 < brain_ml < 2040  # ch2 (Colin 27 in MNI space), brain + CSF


def test_classifier_result_reaches_the_destination(tmp_path: Path) -> None:
    """Two studies: synthetic DX images (one with an opacity) and the real CR RG1."""
    dx_dir = tmp_path / "dx"
    write_radiographs(demo_radiographs([True, False], seed=11), dx_dir, monochrome1=True)
    cr_path = pydicom_data_file("RG1_J2KR.dcm")  # real CR, JPEG 2000, MONOCHROME1
    rule = {"name": "xr", "match": {"Modality": {"regex": "^(CR|DX)$"}}, "models": ["xr-nodule-demo"], "send_to": ["pacs"]}  # fmt: skip
    with StoreSCP(ae_title="DESTPACS") as destination:
        with NodeProcess(tmp_path / "node", _node_config(tmp_path, destination, rule)) as node:
            for source in (dx_dir, cr_path):
                sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", source)
                assert sent.returncode == 0, sent.stderr
            jobs = node.wait_for_jobs(2, {JobStateValues.DELIVERED, JobStateValues.FAILED}, 300)
            assert [(j.state, j.reason) for j in jobs] == [("delivered", None)] * 2
            files = destination.wait_for_files(2)
        # Read while storescp's folder exists; by study, as the two SRs arrive in any order.
        for path in files:
            assert dciodvfy_errors(path) == [], path
        reports = {str(dcmread(path).StudyInstanceUID): dcmread(path) for path in files}
    model = get_model("xr-nodule-demo")
    assert isinstance(model, ClassificationModel)
    for images in (load_images(sorted(dx_dir.glob("*.dcm"))), load_images([cr_path])):
        findings = read_findings(reports[str(images[0].datasets[0].StudyInstanceUID)])
        assert len(findings) == len(images)
        for image in images:
            (probability,) = model.predict(image.volume)
            number = image.datasets[0].InstanceNumber
            code, in_sr, verdict = findings[
                f"Nodule (image {number})" if len(images) > 1 else "Nodule"
            ]
            assert code == "27925004"
            assert in_sr == pytest.approx(probability, rel=1e-9, abs=1e-12)
            assert verdict == ("present" if probability >= model.threshold else "absent")
        if len(images) > 1:  # the synthetic pair: opacity in image 1 only
            assert [findings[f"Nodule (image {n})"][2] for n in (1, 2)] == ["present", "absent"]
