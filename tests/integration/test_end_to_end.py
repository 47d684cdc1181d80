"""storescu -> pacsnode (embedded Redis + worker) -> SEG + SR at a dcmtk storescp."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
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

    jobs = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED})
    # The job's manifest names the spooled files, which hold the bytes as sent: same
    # transfer syntax, same pixel data.
    assert jobs[0].manifest is not None
    spooled_by_uid = {i.sop_instance_uid: Path(i.path) for i in jobs[0].manifest.instances}
    for path in series_dir.glob("*.dcm"):
        sent_ds = dcmread(path)
        spooled = dcmread(spooled_by_uid.pop(str(sent_ds.SOPInstanceUID)))
        assert spooled.file_meta.TransferSyntaxUID == sent_ds.file_meta.TransferSyntaxUID
        assert spooled.PixelData == sent_ds.PixelData
    assert spooled_by_uid == {}

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


def _local(scp: StoreSCP) -> dict[str, object]:
    return {"ae_title": scp.ae_title, "host": "127.0.0.1", "port": scp.port}


def test_each_destination_gets_its_profile(phantom_dir: Path, tmp_path: Path) -> None:
    """A modern viewer gets a LABELMAP SEG + SR; an old PACS gets SR + overlay images."""
    from tests.integration.conftest import CT_RULE
    from tests.node_process import node_config

    rule = {**CT_RULE, "send_to": ["viewer", "oldpacs"]}
    with StoreSCP(ae_title="VIEWER") as viewer, StoreSCP(ae_title="OLDPACS") as old:
        config = node_config(
            tmp_path / "data",
            port=0,
            destinations={
                "viewer": {
                    "ae_title": "VIEWER",
                    "host": "127.0.0.1",
                    "port": viewer.port,
                    "seg": "labelmap",
                },
                "oldpacs": {
                    "ae_title": "OLDPACS",
                    "host": "127.0.0.1",
                    "port": old.port,
                    "seg": "none",
                    "overlays": True,
                },
            },
            rules=[rule],
        )
        del config["node"]["port"]
        with NodeProcess(tmp_path / "node", config) as node:
            sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", phantom_dir)
            assert sent.returncode == 0, sent.stderr
            (job,) = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED})
            assert (job.state, job.reason) == (JobStateValues.DELIVERED, None)
            at_viewer = viewer.wait_for_files(2)
            at_old = old.wait_for_files(4)  # SR + soft tissue, lung and bone key images
        viewer_kinds = sorted(str(dcmread(p).Modality) for p in at_viewer)
        old_kinds = sorted(str(dcmread(p).Modality) for p in at_old)
        assert viewer_kinds == ["SEG", "SR"]
        assert old_kinds == ["OT", "OT", "OT", "SR"]
        seg = next(dcmread(p) for p in at_viewer if dcmread(p).Modality == "SEG")
        assert seg.SegmentationType == "LABELMAP"
        assert seg.SeriesDescription == "ct-tissue SEG - NOT FOR CLINICAL USE"
        # The viewer's SR references the label-map SEG it received; the old PACS's SR
        # references the BINARY SEG (kept back, as its profile says).
        viewer_sr = next(dcmread(p) for p in at_viewer if dcmread(p).Modality == "SR")
        old_sr = next(dcmread(p) for p in at_old if dcmread(p).Modality == "SR")
        assert {uid for uid, _ in read_referenced_segments(viewer_sr).values()} == {
            seg.SOPInstanceUID
        }
        assert viewer_sr.SOPInstanceUID != old_sr.SOPInstanceUID
        assert read_volumes_ml(viewer_sr) == read_volumes_ml(old_sr)
        for path in at_old:
            assert dciodvfy_errors(path) == [], path
        source = load_series(sorted(phantom_dir.glob("*.dcm")))
        overlays = sorted(
            (dcmread(p) for p in at_old if dcmread(p).Modality == "OT"),
            key=lambda ds: int(ds.InstanceNumber),
        )
        for ds in overlays:
            assert ds.StudyInstanceUID == source.datasets[0].StudyInstanceUID
            referenced = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
            assert referenced in {str(s.SOPInstanceUID) for s in source.datasets}

        # pacsnode render draws, from the job's SEG, the pictures the old PACS received.
        rendered = subprocess.run(
            [str(Path(sys.executable).parent / "pacsnode"), "render", str(job.id),
             "--config", str(node.config_path), "--out", str(tmp_path / "png")],
            capture_output=True, text=True, timeout=120, check=False,
        )  # fmt: skip
        assert rendered.returncode == 0, rendered.stderr
        pngs = [Path(line) for line in rendered.stdout.split()]
        assert len(pngs) == len(overlays) == 3
        for png, ds in zip(pngs, overlays, strict=True):
            np.testing.assert_array_equal(np.asarray(Image.open(png)), ds.pixel_array)
