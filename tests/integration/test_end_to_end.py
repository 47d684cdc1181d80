"""storescu -> pacsnode (embedded Redis + worker) -> SEG + SR at a dcmtk storescp."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from models.ct_tissue import CtTissueModel
from node.state import JobStateValues
from tests.integration.conftest import received_by_modality, seg_label_map
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, dciodvfy_errors, run_storescu
from tests.sr_reading import read_referenced_segments, read_volumes_ml
from workers.series import load_series

pytestmark = pytest.mark.integration

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.mark.parametrize("series_fixture", ["phantom_dir", "phantom_jpeg2000_dir", "cranium_dir"])
def test_series_comes_back_as_seg_and_sr(
    series_fixture: str,
    request: pytest.FixtureRequest,
    node: NodeProcess,
    destination: StoreSCP,
) -> None:
    series_dir: Path = request.getfixturevalue(series_fixture)
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", series_dir)
    assert sent.returncode == 0, sent.stdout + sent.stderr

    # The spool holds the bytes as sent: same transfer syntax, same pixel data.
    for path in series_dir.glob("*.dcm"):
        sent_ds = dcmread(path)
        spooled = dcmread(
            node.data_dir / "spool" / sent_ds.StudyInstanceUID / sent_ds.SeriesInstanceUID
            / f"{sent_ds.SOPInstanceUID}.dcm"
        )  # fmt: skip
        assert spooled.file_meta.TransferSyntaxUID == sent_ds.file_meta.TransferSyntaxUID
        assert spooled.PixelData == sent_ds.PixelData

    jobs = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED})
    assert [(job.model, job.state, job.reason) for job in jobs] == [
        ("ct-tissue", JobStateValues.DELIVERED, None)
    ]
    files = destination.wait_for_files(2)
    received = received_by_modality(files)
    assert set(received) == {"SEG", "SR"}
    seg, sr = received["SEG"], received["SR"]
    assert seg.SOPClassUID == SEG_SOP_CLASS
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR

    for path in files:
        assert dciodvfy_errors(path) == [], path

    # The SEG, read back by highdicom, is the model's mask voxel for voxel.
    source = load_series(sorted(series_dir.glob("*.dcm")))
    model = CtTissueModel()
    expected = model.predict(source.volume)
    seg_path = next(p for p in files if dcmread(p, stop_before_pixels=True).Modality == "SEG")
    actual = seg_label_map(seg_path, list(source.datasets), model)
    assert (actual == expected).all()
    assert seg.FrameOfReferenceUID == source.datasets[0].FrameOfReferenceUID
    assert seg.StudyInstanceUID == source.datasets[0].StudyInstanceUID
    assert seg.PatientID == source.datasets[0].PatientID

    # The SR's volumes are the mask's, within 1 %, and each references the SEG.
    volumes = read_volumes_ml(sr)
    present = {spec.name: spec.value for spec in model.labels if (expected == spec.value).any()}
    assert set(volumes) == set(present)
    for name, value in present.items():
        mask_ml = float((expected == value).sum()) * source.volume.voxel_volume_ml
        assert volumes[name] == pytest.approx(mask_ml, rel=0.01), name
    for seg_uid, _segment in read_referenced_segments(sr).values():
        assert seg_uid == seg.SOPInstanceUID
