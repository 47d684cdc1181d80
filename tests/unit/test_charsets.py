"""Studies in every character set scanners send: the SEG, SR, overlay images and
rejection note carry the patient and study attributes exactly as the source had them,
in the source's Specific Character Set, and pass dciodvfy."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.tag import Tag

from tests.dicom_factory import chest_phantom, write_ct_series
from tests.job_requests import job_request
from tests.peers import dciodvfy_errors
from workers.outputs import OutputProfile, OutputRequest
from workers.pipeline import run_job
from workers.rejection import build_rejection_note
from workers.series import load_series

#: (Specific Character Set, PatientName, StudyDescription, ReferringPhysicianName)
CHARSETS = {
    "latin-1": ("ISO_IR 100", "Müller^Jürgen", "Thorax ohne KM, Überweisung", "Schäfer^Anna"),
    "utf-8": ("ISO_IR 192", "Wang^XiaoDong=王^小東", "胸部 CT 平扫", "Ólafsdóttir^Björk"),
    "japanese": (
        ["", "ISO 2022 IR 87"],
        "Yamada^Tarou=山田^太郎=やまだ^たろう",
        "胸部CT",
        "Sato^Hanako=佐藤^花子=さとう^はなこ",
    ),
    "korean": (
        ["", "ISO 2022 IR 149"],
        "Hong^Gildong=洪^吉洞=홍^길동",
        "흉부 CT",
        "Kim^Minsu=金^民洙=김^민수",
    ),
}
#: Copied into every result object (Patient and General Study modules, type 1 and 2).
COPIED = ("PatientName", "PatientID", "ReferringPhysicianName", "AccessionNumber")


def _raw_value(path: Path, keyword: str) -> bytes:
    """The bytes of an attribute as written in the file (not decoded)."""
    ds = dcmread(path)
    raw = ds.get_item(Tag(keyword))
    return bytes(raw.value) if raw is not None and raw.value is not None else b""


@pytest.mark.parametrize("charset", sorted(CHARSETS))
def test_results_keep_the_source_character_set_and_text(charset: str, tmp_path: Path) -> None:
    specific, name, description, physician = CHARSETS[charset]
    phantom = chest_phantom(shape=(8, 96, 96), spacing_mm=(5.0, 2.0, 2.0))
    folder = tmp_path / "ct"
    write_ct_series(phantom.hu, folder, spacing_mm=phantom.spacing_mm, patient_id="CS-1")
    for path in sorted(folder.glob("*.dcm")):
        ds = dcmread(path)
        ds.SpecificCharacterSet = specific
        ds.PatientName = name
        ds.StudyDescription = description
        ds.ReferringPhysicianName = physician
        ds.AccessionNumber = "A-77"
        ds.save_as(path)
    source = min(folder.glob("*.dcm"))
    outputs = OutputRequest.for_profiles([OutputProfile(seg="binary", overlays=True)])
    result = run_job(job_request(folder, "ct-tissue", tmp_path / "out", outputs=outputs))
    assert result.status == "ok", result.reason
    files = [Path(f.path) for f in result.files]
    assert {f.name.split("-")[0] for f in files} >= {"seg", "sr.dcm", "overlay"}

    series = load_series(sorted(folder.glob("*.dcm")))
    note = build_rejection_note(
        series.datasets[0], list(result.files), series_instance_uid="2.25.1",
        sop_instance_uid="2.25.2", series_number=904, series_description="note",
    )  # fmt: skip
    note_path = tmp_path / "note.dcm"
    note.save_as(note_path, enforce_file_format=True)

    original = dcmread(source)
    for path in [*files, note_path]:
        written = dcmread(path)
        assert written.SpecificCharacterSet == original.SpecificCharacterSet, path.name
        # StudyDescription (type 3) where the object carries it.
        for keyword in (*COPIED, *(["StudyDescription"] if "StudyDescription" in written else [])):
            assert str(written[keyword].value) == str(original[keyword].value), (path.name, keyword)
            assert _raw_value(path, keyword) == _raw_value(source, keyword), (path.name, keyword)
        assert read_file_meta_info(path).TransferSyntaxUID  # a whole file
        assert dciodvfy_errors(path) == [], path.name
