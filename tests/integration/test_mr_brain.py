"""The pretrained mr-brain-mask model through the whole path, on a real T1 brain MR."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from models.mr_brain_mask import MrBrainMaskModel
from node.state import JobStateValues
from tests.dicom_factory import CH2_PATH, write_mr_series_from_nifti
from tests.integration.conftest import received_by_modality, seg_label_map
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config
from tests.peers import StoreSCP, dciodvfy_errors, run_storescu
from tests.sr_reading import read_volumes_ml
from workers.series import load_series

pytestmark = pytest.mark.integration

MR_RULE: dict[str, Any] = {
    "name": "brain",
    "match": {"Modality": "MR", "min_instances": 16},
    "models": ["mr-brain-mask"],
    "send_to": ["pacs"],
}


def test_brain_mr_comes_back_with_brain_mask_and_volume(tmp_path: Path) -> None:
    series = write_mr_series_from_nifti(CH2_PATH, tmp_path / "mr", patient_id="CH2")
    with StoreSCP(ae_title="DESTPACS") as destination:
        config = node_config(
            tmp_path / "data",
            port=0,
            destinations={
                "pacs": {"ae_title": "DESTPACS", "host": "127.0.0.1", "port": destination.port}
            },
            rules=[MR_RULE],
        )
        del config["node"]["port"]
        with NodeProcess(tmp_path / "node", config) as node:
            sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", series[0].parent)
            assert sent.returncode == 0, sent.stderr
            (job,) = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED}, 300)
            assert (job.model, job.state, job.reason) == ("mr-brain-mask", "delivered", None)
            files = destination.wait_for_files(2)
        _check_results(files, series)


def _check_results(files: list[Path], series: list[Path]) -> None:
    for path in files:
        assert dciodvfy_errors(path) == [], path
    received = received_by_modality(files)
    source = load_series(series)
    model = MrBrainMaskModel()
    expected = model.predict(source.volume)
    seg_path = next(p for p in files if p.name.startswith("SG"))
    assert (seg_label_map(seg_path, list(source.datasets), model) == expected).all()
    brain_ml = float(expected.sum()) * source.volume.voxel_volume_ml
    assert 1880 < brain_ml < 2040  # ch2 (Colin 27 in MNI space), brain + CSF
    assert read_volumes_ml(received["SR"]) == {"Brain": pytest.approx(brain_ml, rel=0.01)}
