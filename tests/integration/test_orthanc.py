"""Orthanc as the PACS: it sends a study to pacsnode and receives the SEG and SR back."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filebase import DicomBytesIO

from node.state import JobStateValues
from tests.integration.conftest import CT_RULE
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config
from tests.peers import Orthanc, free_port, wait_for
from tests.sr_reading import read_volumes_ml

pytestmark = pytest.mark.integration

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


def test_orthanc_sends_study_and_receives_seg_and_sr(tmp_path: Path, phantom_dir: Path) -> None:
    node_port = free_port()
    with Orthanc(
        aet="ORTHANC",
        modalities={"pacsnode": (NODE_AE_TITLE, "127.0.0.1", node_port)},
        workdir=tmp_path / "orthanc",
    ) as orthanc:
        config = node_config(
            tmp_path / "data",
            port=node_port,
            peers=[{"ae_title": "ORTHANC", "host": "127.0.0.1"}],
            destinations={
                "pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}
            },
            rules=[CT_RULE],
        )
        sources = sorted(phantom_dir.glob("*.dcm"))
        for path in sources:
            orthanc.upload(path)
        series_ids = [s["ID"] for s in orthanc.series()]
        assert len(series_ids) == 1

        with NodeProcess(tmp_path / "node", config) as node:
            orthanc.send_to_modality("pacsnode", series_ids)
            jobs = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED})
            assert [(j.state, j.reason) for j in jobs] == [(JobStateValues.DELIVERED, None)]

        segs = wait_for(
            lambda: orthanc.find_instances_by_sop_class(SEG_SOP_CLASS), 10, "the SEG in Orthanc"
        )
        srs = wait_for(
            lambda: orthanc.find_instances_by_sop_class(COMPREHENSIVE_3D_SR),
            10,
            "the SR in Orthanc",
        )
        assert len(segs) == 1
        assert len(srs) == 1
        seg = dcmread(DicomBytesIO(orthanc.get_file(segs[0]["ID"])))
        sr = dcmread(DicomBytesIO(orthanc.get_file(srs[0]["ID"])))

    source = dcmread(sources[0], stop_before_pixels=True)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert sr.StudyInstanceUID == source.StudyInstanceUID
    referenced = {
        item.ReferencedSOPInstanceUID
        for series in seg.ReferencedSeriesSequence
        for item in series.ReferencedInstanceSequence
    }
    assert referenced == {dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in sources}
    assert set(read_volumes_ml(sr)) == {"Soft tissue", "Lung", "Bone"}
