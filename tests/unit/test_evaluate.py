"""pacsnode evaluate: Dice, HD95 and volumes against references, AUC, sensitivity and
specificity with bootstrap intervals, checked against independent computations."""

from __future__ import annotations

import csv
import hashlib
import math
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import numpy.typing as npt
import pytest
import yaml
from pydicom import dcmread
from scipy import ndimage

from models.base import ClassificationModel
from models.ct_tissue import CtTissueModel
from node.evaluate import (
    EvaluationError,
    classification_score,
    evaluate_classification,
    segmentation_scores,
)
from node.state import PlannedJob, StateDB
from tests.dicom_factory import chest_phantom, demo_radiographs, write_ct_series, write_radiographs
from workers.contract import JobOutcome, JobRequest, file_digest
from workers.pipeline import run_job
from workers.series import load_series

PACSNODE = Path(sys.executable).parent / "pacsnode"


def _dice(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_]) -> float:
    return 2.0 * float(np.count_nonzero(a & b)) / float(np.count_nonzero(a) + np.count_nonzero(b))


def _hd95(a: npt.NDArray[np.bool_], b: npt.NDArray[np.bool_], spacing: tuple[float, ...]) -> float:
    """The symmetric 95th-percentile surface distance, from the definition: the surface
    is the mask minus its erosion; distances in mm to the other surface."""
    surface_a = a & ~ndimage.binary_erosion(a)
    surface_b = b & ~ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~surface_b, sampling=spacing)[surface_a]
    to_a = ndimage.distance_transform_edt(~surface_a, sampling=spacing)[surface_b]
    return float(max(np.percentile(to_b, 95), np.percentile(to_a, 95)))


def test_scores_of_shifted_cubes_equal_the_definitions() -> None:
    spacing = (2.0, 1.0, 0.5)
    prediction = np.zeros((20, 24, 28), np.uint8)
    reference = np.zeros_like(prediction)
    prediction[4:14, 5:15, 6:16] = 1
    reference[6:16, 5:15, 7:17] = 1  # 2 slices and 1 column further
    reference[1:3, 1:3, 1:3] = 2  # a label the model missed
    (found, missed, absent) = segmentation_scores(
        "case", prediction, reference, {"a": (1, 1), "b": (9, 2), "c": (3, 3)}, spacing
    )
    assert found.dice == pytest.approx(_dice(prediction == 1, reference == 1), abs=1e-6)
    assert found.dice == pytest.approx(2 * 8 * 10 * 9 / 2000)
    assert found.hd95_mm == pytest.approx(_hd95(prediction == 1, reference == 1, spacing), abs=1e-4)
    assert found.volume_ml == pytest.approx(1000 * 1.0 / 1000)
    assert found.volume_difference_ml == pytest.approx(0.0)
    assert (missed.dice, missed.hd95_mm) == (0.0, math.inf)
    assert (absent.dice, absent.hd95_mm, absent.volume_ml) == (1.0, 0.0, 0.0)
    with pytest.raises(EvaluationError, match=r"case: the result has shape \(20, 24, 28\)"):
        segmentation_scores("case", prediction, reference[:-1], {"a": (1, 1)}, spacing)


def test_classification_figures_and_intervals() -> None:
    score = classification_score("Nodule", [0, 0, 1, 1, 0, 1], [0.1, 0.4, 0.35, 0.8, 0.7, 0.9], 0.5)
    # AUC by pairs: of 9 (positive, negative) pairs, 7 rank the positive higher.
    assert score.auc.value == pytest.approx(7 / 9)
    assert score.sensitivity.value == pytest.approx(2 / 3)
    assert score.specificity.value == pytest.approx(2 / 3)
    for interval in (score.auc, score.sensitivity, score.specificity):
        assert 0.0 <= interval.low <= interval.value <= interval.high <= 1.0
    assert (score.cases, score.positives) == (6, 3)
    with pytest.raises(EvaluationError, match="need positive and negative cases"):
        classification_score("Nodule", [1, 1], [0.2, 0.9], 0.5)


def test_classification_reads_the_reported_probabilities(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.db")
    truth = {}
    for number, probability in enumerate([0.2, 0.9, 0.6, 0.1]):
        study, series, sop = f"1.2.{number}", f"1.2.{number}.1", f"1.2.{number}.1.1"
        db.record_instance(
            sop_instance_uid=sop, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
            series_instance_uid=series, study_instance_uid=study, calling_ae_title="S",
            path=Path(f"/spool/{sop}.dcm"), size=1, sha256=hashlib.sha256(sop.encode()).hexdigest(),
        )  # fmt: skip
        db.mark_series_complete(series)
        (job_id,) = db.route_series(
            series, [PlannedJob("xr-nodule-demo", "r", [], lineage=f"{study}/x/{series}")]
        )
        job = db.job(job_id)
        assert job is not None
        assert job.manifest is not None
        db.mark_job_queued(
            job_id, "t", JobRequest(job_id=job_id, model="xr-nodule-demo", manifest=job.manifest, output_dir="/o")
        )  # fmt: skip
        finding = {"name": "Nodule", "probability": probability, "present": probability >= 0.5,
                   "sop_instance_uids": [sop]}  # fmt: skip
        db.record_results(job_id, JobOutcome(status="ok", findings=(finding,)), {})
        truth[sop] = int(number in (1, 2))
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "key,class,truth\n"
        + "".join(f"{key},Nodule,{value}\n" for key, value in truth.items())
        + "9.9.9,Nodule,1\n"
    )
    (score,), curves, problems = evaluate_classification("xr-nodule-demo", labels, db=db)
    assert (score.auc.value, score.sensitivity.value, score.specificity.value) == (1.0, 1.0, 1.0)
    assert curves == [("Nodule", [0, 1, 1, 0], [0.2, 0.9, 0.6, 0.1])]
    assert problems == [f"{labels}: no result of xr-nodule-demo for Nodule on 9.9.9"]
    db.close()


def _ran(db: StateDB, folder: Path, data_dir: Path) -> tuple[str, Path]:
    """Record a series like the node and run ct-tissue on it like a worker."""
    files = sorted(folder.glob("*.dcm"))
    first = dcmread(files[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    for path in files:
        size, sha256 = file_digest(path)
        db.record_instance(
            sop_instance_uid=str(dcmread(path, stop_before_pixels=True).SOPInstanceUID),
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2", series_instance_uid=series,
            study_instance_uid=study, calling_ae_title="S", path=path, size=size, sha256=sha256,
        )  # fmt: skip
    db.mark_series_complete(series)
    (job_id,) = db.route_series(series, [PlannedJob("ct-tissue", "r", [], lineage=study)])
    job = db.job(job_id)
    assert job is not None
    assert job.manifest is not None
    request = JobRequest(
        job_id=job_id, model="ct-tissue", manifest=job.manifest,
        output_dir=str(data_dir / "results" / f"job-{job_id}"),
    )  # fmt: skip
    db.mark_job_queued(job_id, "t", request)
    outcome = run_job(request)
    assert outcome.status == "ok", outcome.reason
    db.record_results(job_id, outcome, {})
    return study, files[0]


def test_evaluate_three_studies_against_shifted_references(tmp_path: Path) -> None:
    """Each study's reference is its own result moved by 0, 1 or 2 slices, as a NIfTI
    file on the patient grid: the CSV holds exactly the definitions' figures."""
    data_dir = tmp_path / "data"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"node": {"data_dir": str(data_dir)}}))
    db = StateDB(data_dir / "state.db")
    model = CtTissueModel()
    references = tmp_path / "references"
    references.mkdir()
    expected: dict[tuple[str, str], tuple[float, float]] = {}
    for shift in (0, 1, 2):
        phantom = chest_phantom((12, 64, 64), (5.0, 3.0, 3.0))
        folder = tmp_path / "studies" / f"ct{shift}"
        write_ct_series(phantom.hu, folder, spacing_mm=phantom.spacing_mm, patient_id=f"E{shift}")
        study, _ = _ran(db, folder, data_dir)
        volume = load_series(sorted(folder.glob("*.dcm"))).volume
        prediction = model.predict(volume)
        reference = np.zeros_like(prediction)
        reference[shift:] = prediction[: len(prediction) - shift]
        # NIfTI stores (i, j, k) -> RAS, written here by hand: columns go along patient
        # x (LPS, so -x in RAS) 3 mm, rows along y (-y in RAS) 3 mm, slices along z 5 mm,
        # from the writer's origin (-100, -120, -50) LPS.
        affine = np.array(
            [[-3.0, 0, 0, 100.0], [0, -3.0, 0, 120.0], [0, 0, 5.0, -50.0], [0, 0, 0, 1]]
        )
        nibabel.Nifti1Image(reference.transpose(2, 1, 0).astype(np.int16), affine).to_filename(
            references / f"{study}.nii.gz"
        )
        for spec in model.labels:
            p, r = prediction == spec.value, reference == spec.value
            expected[(study, spec.name)] = (_dice(p, r), _hd95(p, r, volume.spacing_mm))
    db.close()

    # A localizer in one study: not a series ct-tissue takes (too few slices), so the
    # run on the folder picks the CT as routing would.
    first_study = dcmread(next((tmp_path / "studies" / "ct0").glob("*.dcm")))
    write_ct_series(
        np.full((1, 64, 64), -1000, dtype=np.int16),
        tmp_path / "studies" / "loc",
        spacing_mm=(5.0, 3.0, 3.0),
        patient_id="E0",
        series_number=9,
        study_instance_uid=str(first_study.StudyInstanceUID),
    )

    # From the data folder's results, and by running the model here on the DICOM files.
    for source in ([], ["--dicom", str(tmp_path / "studies")]):
        out = tmp_path / ("out-run" if source else "out")
        run = subprocess.run(
            [str(PACSNODE), "evaluate", "--config", str(config), "--model", "ct-tissue",
             "--reference", str(references), "--out", str(out), *source],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        assert run.returncode == 0, run.stderr
        with (out / "evaluation.csv").open() as fh:
            rows = list(csv.DictReader(fh))
        assert len(rows) == len(expected) == 9
        for row in rows:
            dice, hd95 = expected[(row["study_instance_uid"], row["label"])]
            assert float(row["dice"]) == pytest.approx(dice, abs=1e-6)
            assert float(row["hd95_mm"]) == pytest.approx(hd95, abs=1e-3)
        unshifted = [
            r for r in rows if float(r["volume_difference_ml"]) == 0 and float(r["dice"]) == 1
        ]
        assert len(unshifted) >= 3  # the study whose reference is its own result
        assert (out / "evaluation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert "Soft tissue: mean Dice" in run.stdout


def test_classifier_run_on_a_folder_of_radiographs(tmp_path: Path) -> None:
    """Without a data folder: each image of the folder is classified here, keyed by its
    SOP Instance UID, and scored against the CSV."""
    from models.registry import get_model
    from workers.series import load_images

    truth = [True, False, True, False, True, False]
    files = write_radiographs(demo_radiographs(truth, seed=4242), tmp_path / "dx")
    model = get_model("xr-nodule-demo")
    assert isinstance(model, ClassificationModel)
    expected = {}
    for image in load_images(files):
        (probability,) = model.predict(image.volume)
        expected[str(image.datasets[0].SOPInstanceUID)] = probability
    keys = list(expected)
    labels = tmp_path / "labels.csv"
    labels.write_text(
        "key,class,truth\n"
        + "".join(f"{k},Nodule,{int(t)}\n" for k, t in zip(keys, truth, strict=True))
    )
    (score,), curves, problems = evaluate_classification(
        "xr-nodule-demo", labels, dicom=tmp_path / "dx"
    )
    assert problems == []
    assert curves == [("Nodule", [int(t) for t in truth], [expected[k] for k in keys])]
    assert score.cases == 6
    assert score.positives == 3
