"""A Japanese study (ISO 2022 IR 87, with the default repertoire first) and a Korean
one (ISO 2022 IR 149) sent by storescu: the SEG and SR at the storescp carry the
source's Specific Character Set and its patient and study attributes attribute by
attribute, and the console lists the patient under the name the scanner sent."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from pydicom import dcmread

from node.state import JobStateValues
from tests.integration.conftest import make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, run_storescu

pytestmark = pytest.mark.integration

CASES = {
    "japanese": (["", "ISO 2022 IR 87"], "Yamada^Tarou=山田^太郎=やまだ^たろう"),
    "korean": (["", "ISO 2022 IR 149"], "Hong^Gildong=洪^吉洞=홍^길동"),
}
COPIED = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
          "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName", "StudyID")  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_study_in_iso_2022_comes_back_in_its_own_character_set(
    case: str, node: NodeProcess, destination: StoreSCP, tmp_path: Path
) -> None:
    charset, name = CASES[case]
    folder = make_phantom_series(tmp_path / "ct", f"CS-{case[:2].upper()}")
    for path in folder.glob("*.dcm"):
        ds = dcmread(path)
        ds.SpecificCharacterSet = charset
        ds.PatientName = name
        ds.ReferringPhysicianName = name
        ds.save_as(path)
    sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", folder)
    assert sent.returncode == 0, sent.stderr
    (job,) = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED})
    assert job.state == JobStateValues.DELIVERED, job.reason
    source = dcmread(min(folder.glob("*.dcm")))
    for path in destination.wait_for_files(2):
        result = dcmread(path)
        assert result.SpecificCharacterSet == source.SpecificCharacterSet, path.name
        for keyword in COPIED:
            assert result.get(keyword) == source.get(keyword), (path.name, keyword)
    studies = requests.get(f"{node.console_url}/api/studies", timeout=30).json()["studies"]
    assert [s["patient_name"] for s in studies] == [name]
