"""Every shipped model through the whole path: storescu -> pacsnode -> SEG + SR at storescp.

ct-tissue has its own, deeper test (test_end_to_end.py); here the pretrained
mr-brain-mask on the real T1 brain MR and the ct-bone-demo MONAI bundle on the phantom.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from models.registry import get_model
from node.state import JobStateValues
from tests.dicom_factory import CH2_PATH, write_mr_series_from_nifti
from tests.integration.conftest import received_by_modality, seg_label_map
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config
from tests.peers import StoreSCP, dciodvfy_errors, run_storescu
from tests.sr_reading import read_volumes_ml
from workers.series import load_series

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def brain_mr_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ch2")
    write_mr_series_from_nifti(CH2_PATH, folder, patient_id="CH2")
    return folder


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
        config = node_config(
            tmp_path / "data",
            port=0,
            destinations={
                "pacs": {"ae_title": "DESTPACS", "host": "127.0.0.1", "port": destination.port}
            },
            rules=[rule],
        )
        del config["node"]["port"]
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
        model = get_model(model_name)
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
