"""A model of several series: a four-sequence MR study sent by storescu reaches the
Model Zoo's BraTS configuration (T1c, T1, T2 and FLAIR as four channels); routing gives
each input its series, the worker resamples them onto the reference series' grid, and
the SEG at the destination refers to the reference series, with MONAI's own labels.

The four series are made from the real T1 MR of ``mricron-data`` with other intensities
and, for two of them, another slice geometry, so that the resampling matters. MONAI's
reference run gets the same four series read by ITKReader and resampled onto the
reference grid by MONAI's ``ResampleToMatch``: nothing of pacsnode's code.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from node.state import JobStateValues
from tests import model_zoo as zoo
from tests.dicom_factory import CH2_PATH, write_mr_series_from_nifti
from tests.integration.conftest import ct_node_config
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, run_storescu
from workers.render import read_seg
from workers.series import load_series

pytestmark = pytest.mark.integration

PACSNODE = Path(sys.executable).parent / "pacsnode"

_CODE = {"category": {"value": "49755003", "meaning": "Morphologically Altered Structure"},
         "property_type": {"value": "108369006", "meaning": "Neoplasm"}}  # fmt: skip
BRATS_SPEC: dict[str, Any] = {
    "queue": "cpu",
    "accepts": {"modalities": ["MR"]},
    "inputs": {  # the bundle's channel order: T1c, T1, T2, FLAIR
        "t1c": {"match": {"SeriesDescription": {"regex": r"(?i)t1.*(post|gd|\+c)"}}},
        "t1": {"match": {"SeriesDescription": {"regex": r"(?i)t1(?!.*(post|gd|\+c))"}}},
        "t2": {"match": {"SeriesDescription": {"regex": r"(?i)t2(?!.*flair)"}}},
        "flair": {"match": {"SeriesDescription": {"regex": r"(?i)flair"}}},
    },
    "reference": "t1c",
    "label_values": "declared",  # its postprocessing writes 1, 2 and 4
    "labels": {
        1: {"name": "Tumor core", **_CODE},
        2: {"name": "Edema", **_CODE},
        4: {"name": "Enhancing tumor", **_CODE},
    },
}

#: (description, intensity change, voxel step along the NIfTI axes): the reference
#: first, then T1 with 2 mm slices, T2 on the reference grid, FLAIR at half resolution.
SEQUENCES: list[tuple[str, Callable[[npt.NDArray[Any]], npt.NDArray[Any]], tuple[int, ...]]] = [
    ("T1 post Gd", lambda v: v, (1, 1, 1)),
    ("T1 3D FLASH", lambda v: v * 0.8, (1, 1, 2)),
    ("T2 TSE", lambda v: np.sqrt(v) * 16.0, (1, 1, 1)),
    ("FLAIR", lambda v: v * 1.3, (2, 2, 1)),
]


def _write_study(folder: Path) -> list[Path]:
    """The four series of one study, one folder each, in SEQUENCES order."""
    source = nib.load(CH2_PATH)
    assert isinstance(source, nib.Nifti1Image)
    data = np.asarray(source.dataobj, dtype=np.float64)
    study, frame = generate_uid(), generate_uid()
    folder.mkdir(parents=True)
    folders = []
    for number, (description, change, step) in enumerate(SEQUENCES, start=1):
        affine = source.affine.copy()
        affine[:3, :3] = affine[:3, :3] * np.asarray(step, dtype=np.float64)
        sliced = change(data)[:: step[0], :: step[1], :: step[2]]
        nifti = folder / f"sequence{number}.nii.gz"
        nib.Nifti1Image(sliced.astype(np.float32), affine).to_filename(nifti)
        series = folder / f"series{number}"
        write_mr_series_from_nifti(
            nifti, series, patient_id="BRATS-1", study_instance_uid=study,
            frame_of_reference_uid=frame, series_number=number, series_description=description,
        )  # fmt: skip
        folders.append(series)
    return folders


def test_four_sequence_study_reaches_brats_and_gives_monais_labels(
    tmp_path: Path, destination: StoreSCP
) -> None:
    series = _write_study(tmp_path / "study")
    models = tmp_path / "models"
    models.mkdir()
    bundle = zoo.make_bundle(
        "brats_mri_segmentation", models / "brats-test", zoo.small_network(3, 4, 3),
        spec=BRATS_SPEC,
    )  # fmt: skip
    inputs = zoo.on_reference_grid(series, 0, tmp_path / "monai-inputs")
    image = zoo.preprocessed(bundle, {"image": inputs}, reader=None)["image"]
    zoo.train_and_save(bundle, image, classes=3, multilabel=True)
    reference, _ = zoo.saved_labels(
        zoo.monai_reference(bundle, {"image": inputs}, tmp_path / "monai", reader=None)
    )
    assert {1, 2, 4} <= set(np.unique(reference).tolist())

    config = ct_node_config(tmp_path / "data", destination, models_dir=str(models))
    config["rules"] = [{"name": "brain-mr", "match": {"Modality": "MR"},
                        "models": ["brats-test"], "send_to": ["pacs"]}]  # fmt: skip
    with NodeProcess(tmp_path / "node", config) as node:
        files = [f for folder in series for f in sorted(folder.glob("*.dcm"))]
        sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", files)
        assert sent.returncode == 0, sent.stderr
        settled = {JobStateValues.DELIVERED, JobStateValues.FAILED, JobStateValues.SKIPPED}
        jobs = node.wait_for_jobs(4, settled, 300)
        (job,) = [j for j in jobs if j.state != JobStateValues.SKIPPED]
        assert job.state == JobStateValues.DELIVERED, job.reason
        uids = [str(dcmread(next(s.glob("*.dcm"))).SeriesInstanceUID) for s in series]
        assert job.series_instance_uid == uids[0]  # the reference input, T1 post Gd
        assert job.manifest is not None
        assert {(i.name, i.series_instance_uid) for i in job.manifest.other_inputs} == {
            ("t1", uids[1]),
            ("t2", uids[2]),
            ("flair", uids[3]),
        }
        skipped = {j.series_instance_uid: j.reason for j in jobs
                   if j.state == JobStateValues.SKIPPED}  # fmt: skip
        assert set(skipped) == set(uids[1:])
        assert f"input 'flair' of brats-test, which runs on series {uids[0]}" in str(
            skipped[uids[3]]
        )
        received = destination.wait_for_files(2)

    by_modality = {str(dcmread(p, stop_before_pixels=True).Modality): p for p in received}
    seg = dcmread(by_modality["SEG"])
    assert {str(r.SeriesInstanceUID) for r in seg.ReferencedSeriesSequence} == {uids[0]}
    sr = dcmread(by_modality["SR"])
    evidence = {
        str(s.SeriesInstanceUID)
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for s in study.ReferencedSeriesSequence
    }
    assert set(uids) <= evidence  # the SR lists every input series

    loaded = load_series(sorted(series[0].glob("*.dcm")))
    written, segments = read_seg(by_modality["SEG"], loaded)
    value_of = {entry["name"]: value for value, entry in BRATS_SPEC["labels"].items()}
    ours = np.zeros(written.shape, dtype=np.int64)
    for info in segments:  # segments are numbered 1, 2, 3; the labels are 1, 2, 4
        ours[written == info.segment_number] = value_of[info.label.name]
    ours = ours.transpose(2, 1, 0)  # to the (column, row, slice) axes MONAI loaded
    assert ours.shape == reference.shape
    assert float((ours == reference).mean()) >= 0.99
    for value in (1, 2, 4):
        if int((reference == value).sum()) >= zoo.REGION_VOXELS:
            assert zoo.dice(ours == value, reference == value) >= 0.95, value

    # pacsnode evaluate runs the model on the study folder and scores it against MONAI's
    # labels as a NIfTI reference: the same figures.
    references = tmp_path / "references"
    references.mkdir()
    study_uid = str(seg.StudyInstanceUID)
    (monai_labels,) = (tmp_path / "monai").rglob("*.nii.gz")
    shutil.copy(monai_labels, references / f"{study_uid}.nii.gz")
    run = subprocess.run(
        [str(PACSNODE), "evaluate", "--config", str(node.config_path), "--model", "brats-test",
         "--reference", str(references), "--dicom", str(tmp_path / "study"),
         "--out", str(tmp_path / "evaluation")],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    with (tmp_path / "evaluation" / "evaluation.csv").open() as fh:
        rows = {row["label"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"Tumor core", "Edema", "Enhancing tumor"}
    for name, value in value_of.items():
        if int((reference == value).sum()) >= zoo.REGION_VOXELS:
            assert float(rows[name]["dice"]) >= 0.95, rows[name]
