"""``pacsnode evaluate``: how a model does on the department's own labelled studies.

Segmentation: for every study with a reference segmentation (a DICOM SEG, or a NIfTI
label image on the study's patient grid) the model's latest results for that study are
read back from the data folder (its SEG on the job's manifest series) and compared per
label: Dice, 95th-percentile Hausdorff distance in mm (MONAI's metrics, with the
series' voxel spacing) and the volume difference. Classification: for every study (or,
for per-image models, image) with a reference label in a CSV, the probability the model
reported, giving AUC, and sensitivity and specificity at the model's threshold
(scikit-learn), each with a bootstrap 95 % interval.

Either the data folder's results are scored (the state DB is opened read-only; nothing
runs or is sent), or, with a folder of DICOM files, the model runs here on each study:
the series it takes are chosen as routing would (the model's ``accepts``, the best fit
of a study's series), and its label maps or probabilities are scored directly, so a
model can be measured on local data before it ever sees a live study.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from node.state import Job, StateDB

if TYPE_CHECKING:
    from workers.series import LoadedSeries

__all__ = [
    "ClassificationScore",
    "EvaluationError",
    "FolderInput",
    "Interval",
    "LabelScore",
    "classification_score",
    "dicom_studies",
    "evaluate_classification",
    "evaluate_segmentation",
    "latest_results",
    "plot_roc",
    "plot_segmentation",
    "reference_on_grid",
    "segmentation_scores",
    "write_csv",
]

#: Bootstrap resamples for the 95 % intervals, and the seed that makes them repeatable.
BOOTSTRAP_RESAMPLES = 1000
BOOTSTRAP_SEED = 0


class EvaluationError(Exception):
    """A reference or a result cannot be compared; the message names which and why."""


@dataclass(frozen=True)
class LabelScore:
    """One label of one study: overlap, surface distance and volumes."""

    case: str
    label: str
    dice: float
    hd95_mm: float
    volume_ml: float
    reference_volume_ml: float

    @property
    def volume_difference_ml(self) -> float:
        return self.volume_ml - self.reference_volume_ml


@dataclass(frozen=True)
class Interval:
    """A value with its bootstrap 95 % interval."""

    value: float
    low: float
    high: float

    def __str__(self) -> str:
        return f"{self.value:.3f} ({self.low:.3f}-{self.high:.3f})"


@dataclass(frozen=True)
class ClassificationScore:
    """AUC, sensitivity and specificity at ``threshold`` over ``cases`` references."""

    label: str
    cases: int
    positives: int
    threshold: float
    auc: Interval
    sensitivity: Interval
    specificity: Interval


def segmentation_scores(
    case: str,
    prediction: npt.NDArray[np.integer],
    reference: npt.NDArray[np.integer],
    labels: dict[str, tuple[int, int]],
    spacing_mm: Sequence[float],
) -> list[LabelScore]:
    """Per label (name -> its value in the prediction and in the reference): Dice,
    HD95 and volumes.

    Dice is 1 and HD95 0 where neither map has the label; HD95 is infinite where only
    one has it (no surface to measure to).

    Raises
    ------
    EvaluationError
        If the two maps differ in shape.
    """
    import torch
    from monai.metrics import compute_dice, compute_hausdorff_distance

    if prediction.shape != reference.shape:
        raise EvaluationError(
            f"{case}: the result has shape {prediction.shape}, the reference {reference.shape}"
        )
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    scores = []
    for name, (predicted_value, reference_value) in labels.items():
        predicted = prediction == predicted_value
        expected = reference == reference_value
        if not predicted.any() and not expected.any():
            dice, hd95 = 1.0, 0.0
        elif not predicted.any() or not expected.any():
            dice, hd95 = 0.0, math.inf
        else:
            p = torch.from_numpy(predicted)[None, None].float()
            r = torch.from_numpy(expected)[None, None].float()
            dice = float(compute_dice(p, r, include_background=True).item())
            hd95 = float(
                compute_hausdorff_distance(
                    p, r, include_background=True, percentile=95, spacing=list(spacing_mm)
                ).item()
            )
        scores.append(
            LabelScore(
                case=case,
                label=name,
                dice=dice,
                hd95_mm=hd95,
                volume_ml=float(np.count_nonzero(predicted)) * voxel_ml,
                reference_volume_ml=float(np.count_nonzero(expected)) * voxel_ml,
            )
        )
    return scores


def _bootstrap(
    values: npt.NDArray[np.float64], statistic: object, truth: npt.NDArray[np.int_]
) -> tuple[float, float]:
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    samples = []
    for _ in range(BOOTSTRAP_RESAMPLES):
        pick = rng.integers(0, len(values), len(values))
        result = statistic(truth[pick], values[pick])  # type: ignore[operator]
        if result is not None and not math.isnan(result):
            samples.append(result)
    if not samples:
        return math.nan, math.nan
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)


def classification_score(
    label: str, truth: Sequence[int], probabilities: Sequence[float], threshold: float
) -> ClassificationScore:
    """AUC (scikit-learn), sensitivity and specificity at ``threshold``, each with a
    bootstrap 95 % interval (:data:`BOOTSTRAP_RESAMPLES` resamples, seeded).

    Raises
    ------
    EvaluationError
        If there are no cases, or the references hold only one class (no AUC).
    """
    from sklearn.metrics import roc_auc_score

    y = np.asarray(truth, dtype=np.int_)
    scores = np.asarray(probabilities, dtype=np.float64)
    if len(y) == 0 or len(set(y.tolist())) < 2:
        raise EvaluationError(
            f"{label}: the references need positive and negative cases; found "
            f"{int(y.sum())} positive of {len(y)}"
        )

    def auc(t: npt.NDArray[np.int_], s: npt.NDArray[np.float64]) -> float | None:
        return float(roc_auc_score(t, s)) if len(set(t.tolist())) == 2 else None

    def sensitivity(t: npt.NDArray[np.int_], s: npt.NDArray[np.float64]) -> float | None:
        positive = t == 1
        return float(np.mean(s[positive] >= threshold)) if positive.any() else None

    def specificity(t: npt.NDArray[np.int_], s: npt.NDArray[np.float64]) -> float | None:
        negative = t == 0
        return float(np.mean(s[negative] < threshold)) if negative.any() else None

    def interval(statistic: object) -> Interval:
        value = statistic(y, scores)  # type: ignore[operator]
        return Interval(float(value), *_bootstrap(scores, statistic, y))

    return ClassificationScore(
        label=label,
        cases=len(y),
        positives=int(y.sum()),
        threshold=threshold,
        auc=interval(auc),
        sensitivity=interval(sensitivity),
        specificity=interval(specificity),
    )


def latest_results(db: StateDB, model: str) -> dict[str, Job]:
    """Study Instance UID -> the newest job of ``model`` on it that has results."""
    latest: dict[str, Job] = {}
    for job in db.jobs():
        if job.model == model and job.result is not None and job.result.status == "ok":
            latest[job.study_instance_uid] = job  # jobs come in id order: newest wins
    return latest


def reference_on_grid(
    path: Path, ras_affine: npt.NDArray[np.float64], shape: tuple[int, int, int]
) -> npt.NDArray[np.int16]:
    """A NIfTI label image sampled (nearest voxel) on a series' grid, (k, j, i) order.

    Raises
    ------
    EvaluationError
        If the file cannot be read, or no voxel of the series falls inside it.
    """
    import nibabel

    try:
        image: Any = nibabel.load(str(path))
        data = np.asarray(image.dataobj)
    except Exception as exc:  # nibabel raises many kinds for a bad file
        raise EvaluationError(f"{path}: not a readable NIfTI file ({exc})") from exc
    if data.ndim != 3:
        raise EvaluationError(f"{path}: a label image needs 3 dimensions, found {data.ndim}")
    to_reference = np.linalg.inv(image.affine) @ ras_affine
    result = np.zeros(shape, dtype=np.int16)
    rows, columns = np.meshgrid(np.arange(shape[1]), np.arange(shape[2]), indexing="ij")
    inside_any = False
    for k in range(shape[0]):
        voxels = np.stack(
            [np.full(rows.size, k), rows.ravel(), columns.ravel(), np.ones(rows.size)]
        )
        index = np.rint(to_reference @ voxels)[:3].astype(np.int64)
        inside = np.all((index >= 0) & (index < np.asarray(data.shape)[:, None]), axis=0)
        inside_any |= bool(inside.any())
        values = np.zeros(rows.size, dtype=np.int16)
        values[inside] = data[index[0, inside], index[1, inside], index[2, inside]]
        result[k] = values.reshape(shape[1], shape[2])
    if not inside_any:
        raise EvaluationError(f"{path}: the label image does not cover the series")
    return result


def write_csv(path: Path, rows: Iterable[dict[str, object]]) -> None:
    rows = list(rows)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]) if rows else [])
        writer.writeheader()
        writer.writerows(rows)


def _reference_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    suffixes = (".dcm", ".nii", ".nii.gz")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))


def _study_map(path: Path | None) -> dict[str, str]:
    """File name -> Study Instance UID, from a CSV with ``file`` and
    ``study_instance_uid`` columns."""
    if path is None:
        return {}
    with path.open(newline="") as fh:
        return {Path(row["file"]).name: row["study_instance_uid"] for row in csv.DictReader(fh)}


@dataclass(frozen=True)
class FolderInput:
    """What a model takes of one study in a folder: the files of its series (for a
    multi-series model the reference input's) and the other inputs' files by name."""

    paths: list[Path]
    other_inputs: dict[str, list[Path]]


def dicom_studies(folder: Path, model: str) -> tuple[dict[str, list[FolderInput]], list[str]]:
    """Study Instance UID -> what ``model`` takes of the study under ``folder``, chosen as
    routing chooses it; and one line per study it takes none of."""
    from pydicom import dcmread
    from pydicom.errors import InvalidDicomError

    from node.config import Rule
    from node.routing import candidate_from_paths, plan_study

    files: dict[str, dict[str, list[Path]]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            header = dcmread(path, stop_before_pixels=True)
            study_uid, series_uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
        except (InvalidDicomError, AttributeError, OSError, ValueError, EOFError):
            continue  # not a DICOM image: a README, a NIfTI reference, ...
        files.setdefault(study_uid, {}).setdefault(series_uid, []).append(path)
    rule = Rule(name="evaluate", models=[model])
    chosen: dict[str, list[FolderInput]] = {}
    problems: list[str] = []
    for study, series in sorted(files.items()):
        candidates = [candidate_from_paths(uid, paths) for uid, paths in series.items()]
        plans = plan_study(candidates, [rule])
        taken = [
            FolderInput(series[uid], {name: series[other] for name, other in job.other_inputs})
            for uid, plan in plans.items()
            for job in plan.jobs
            if job.model == model and job.skipped_reason is None
        ]
        if taken:
            chosen[study] = taken
        else:
            reasons = {
                reason
                for plan in plans.values()
                for reason in [plan.ignored_reason, *(j.skipped_reason for j in plan.jobs)]
                if reason
            }
            problems.append(f"{folder}: study {study}: {model} takes none of its series "
                            f"({'; '.join(sorted(reasons))})")  # fmt: skip
    return chosen, problems


def _predictions_from_results(
    db: StateDB, model: str
) -> Callable[[str], tuple[LoadedSeries, npt.NDArray[Any], dict[str, int]]]:
    """For a study: its series, the model's latest SEG on it (segment numbers) and
    label name -> segment number."""
    from workers.render import read_seg
    from workers.series import load_series

    results = latest_results(db, model)

    def predict(study: str) -> tuple[LoadedSeries, npt.NDArray[Any], dict[str, int]]:
        job = results.get(study)
        if job is None or job.result is None:
            raise EvaluationError(f"no results of {model} for study {study}")
        segs = [f for f in job.result.files if f.name.startswith("seg-")]
        if not segs:
            raise EvaluationError(f"job {job.id} wrote no SEG")
        series = load_series(job.source_paths)
        predicted, segments = read_seg(Path(segs[0].path), series)
        return series, predicted, {i.label.name: i.segment_number for i in segments}

    return predict


def _predictions_by_running(
    folder: Path, model: str, problems: list[str]
) -> Callable[[str], tuple[LoadedSeries, npt.NDArray[Any], dict[str, int]]]:
    """For a study under ``folder``: the series the model takes, its label map from
    running the model here, and label name -> value."""
    from models.registry import get_segmentation_model
    from workers.pipeline import stack_inputs
    from workers.series import load_series

    studies, skipped = dicom_studies(folder, model)
    problems.extend(skipped)
    segmenter = get_segmentation_model(model)

    def predict(study: str) -> tuple[LoadedSeries, npt.NDArray[Any], dict[str, int]]:
        if study not in studies:
            raise EvaluationError(f"no series of study {study} under {folder} for {model}")
        taken = studies[study][0]
        series = load_series(taken.paths)
        volume = series.volume
        if taken.other_inputs:  # a multi-series model: its inputs as the worker stacks them
            volume, _ = stack_inputs(series, taken.other_inputs, segmenter)
        labels = segmenter.predict(volume)
        return series, labels, {spec.name: spec.value for spec in segmenter.labels}

    return predict


def evaluate_segmentation(
    model: str,
    reference: Path,
    study_map: Path | None = None,
    *,
    db: StateDB | None = None,
    dicom: Path | None = None,
) -> tuple[list[LabelScore], list[str]]:
    """Score the model against every reference under ``reference``: its latest results
    in ``db``, or its output when run here on the DICOM files under ``dicom``.

    A DICOM SEG names its study and its segments (matched to the model's labels by
    name); a NIfTI label image holds the model's label values and is matched to a study
    by ``study_map`` or by its file name (``<StudyInstanceUID>.nii.gz``). Returns the
    scores and, one line each, the references that could not be scored and why.
    """
    from pydicom import dcmread

    from models.registry import get_model_class
    from workers.render import read_seg

    cls = get_model_class(model)
    model_labels = {spec.name: spec.value for spec in getattr(cls, "labels", ())}
    problems: list[str] = []
    if dicom is not None:
        predict = _predictions_by_running(dicom, model, problems)
    elif db is not None:
        predict = _predictions_from_results(db, model)
    else:
        raise ValueError("give the state DB or a folder of DICOM files")
    names = _study_map(study_map)
    scores: list[LabelScore] = []
    for path in _reference_files(reference):
        try:
            if path.name.endswith(".dcm"):
                header = dcmread(path, stop_before_pixels=True)
                if header.get("Modality") != "SEG":
                    continue  # an image, e.g. when the references sit beside the studies
                study = str(header.StudyInstanceUID)
            else:
                study = names.get(path.name) or path.name.removesuffix(".gz").removesuffix(".nii")
            series, predicted, by_name = predict(study)
            if path.name.endswith(".dcm"):
                expected, reference_segments = read_seg(path, series)
                reference_values = {i.label.name: i.segment_number for i in reference_segments}
            else:
                shape = series.volume.voxels.shape
                expected = reference_on_grid(path, series.volume.ras_affine, shape)
                reference_values = model_labels
            labels = {
                name: (by_name.get(name, -1), reference_values[name])
                for name in model_labels
                if name in reference_values
            }
            scores += segmentation_scores(
                study, predicted, expected, labels, series.volume.spacing_mm
            )
        except (EvaluationError, ValueError, OSError) as exc:
            problems.append(f"{path}: {exc}")
    return scores, problems


def _reported_probabilities(db: StateDB, model: str) -> dict[tuple[str, str], float]:
    """(study or SOP Instance UID, class) -> the probability the model's latest job
    reported."""
    reported: dict[tuple[str, str], float] = {}
    for study, job in latest_results(db, model).items():
        assert job.result is not None
        for finding in job.result.findings:
            name, probability = str(finding["name"]), float(finding["probability"])
            reported.setdefault((study, name), probability)
            for uid in finding.get("sop_instance_uids", []):
                reported[(str(uid), name)] = probability
    return reported


def _probabilities_by_running(
    folder: Path, model: str, problems: list[str]
) -> dict[tuple[str, str], float]:
    """(study, or SOP Instance UID for per-image models, class) -> probability, from
    running the model here on the DICOM files under ``folder``."""
    from models.base import ClassificationModel, InputKindValues
    from models.registry import get_model
    from workers.series import load_images, load_series

    classifier = get_model(model)
    if not isinstance(classifier, ClassificationModel):
        raise EvaluationError(f"model {model!r} does not classify")
    studies, skipped = dicom_studies(folder, model)
    problems.extend(skipped)
    reported: dict[tuple[str, str], float] = {}
    for study, taken in studies.items():
        for files in (entry.paths for entry in taken):
            if classifier.input_kind == InputKindValues.IMAGE:
                for image in load_images(files):
                    sop = str(image.datasets[0].SOPInstanceUID)
                    for spec, p in zip(classifier.classes, classifier.predict(image.volume),
                                       strict=True):  # fmt: skip
                        reported[(sop, spec.name)] = p
            else:
                volume = load_series(files).volume
                for spec, p in zip(classifier.classes, classifier.predict(volume), strict=True):
                    reported[(study, spec.name)] = p
    return reported


def evaluate_classification(
    model: str, labels_csv: Path, *, db: StateDB | None = None, dicom: Path | None = None
) -> tuple[list[ClassificationScore], list[tuple[str, list[int], list[float]]], list[str]]:
    """Score the model's probabilities against a CSV of reference labels: those its
    latest jobs in ``db`` reported, or those it gives when run here on ``dicom``.

    The CSV has columns ``key`` (a Study Instance UID, or for per-image models a SOP
    Instance UID), ``class`` (the model's class name) and ``truth`` (1 present, 0
    absent). Returns the scores per class, the (class, truths, probabilities) they came
    from, and the rows that had no result.
    """
    from models.registry import get_model_class

    threshold = float(getattr(get_model_class(model), "threshold", 0.5))
    problems: list[str] = []
    if dicom is not None:
        reported = _probabilities_by_running(dicom, model, problems)
    elif db is not None:
        reported = _reported_probabilities(db, model)
    else:
        raise ValueError("give the state DB or a folder of DICOM files")
    by_class: dict[str, tuple[list[int], list[float]]] = {}
    with labels_csv.open(newline="") as fh:
        for row in csv.DictReader(fh):
            key, name = row["key"].strip(), row["class"].strip()
            if (key, name) not in reported:
                problems.append(f"{labels_csv}: no result of {model} for {name} on {key}")
                continue
            try:
                truth = int(float(row["truth"]))
            except (TypeError, ValueError):
                problems.append(f"{labels_csv}: truth {row['truth']!r} for {key} is not 1 or 0")
                continue
            truths, probabilities = by_class.setdefault(name, ([], []))
            truths.append(truth)
            probabilities.append(reported[(key, name)])
    scores = [
        classification_score(name, truths, probabilities, threshold)
        for name, (truths, probabilities) in sorted(by_class.items())
    ]
    return scores, [(n, t, p) for n, (t, p) in sorted(by_class.items())], problems


def plot_segmentation(scores: Sequence[LabelScore], path: Path) -> None:
    """Per-case Dice, one bar group per case, one colour per label (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = sorted({s.case for s in scores})
    labels = sorted({s.label for s in scores})
    figure, axes = plt.subplots(figsize=(max(6.0, 1.2 * len(cases) * len(labels)), 4.0))
    width = 0.8 / max(1, len(labels))
    for index, label in enumerate(labels):
        values = [
            next((s.dice for s in scores if s.case == c and s.label == label), 0.0) for c in cases
        ]
        axes.bar(np.arange(len(cases)) + index * width, values, width, label=label)
    axes.set_xticks(np.arange(len(cases)) + width * (len(labels) - 1) / 2)
    axes.set_xticklabels([c[-12:] for c in cases], rotation=30, ha="right")
    axes.set_ylim(0, 1)
    axes.set_ylabel("Dice")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def plot_roc(curves: Sequence[tuple[str, list[int], list[float]]], path: Path) -> None:
    """One ROC curve per class (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    figure, axes = plt.subplots(figsize=(5.0, 5.0))
    for name, truths, probabilities in curves:
        false_positive, true_positive, _ = roc_curve(truths, probabilities)
        axes.plot(false_positive, true_positive, label=name)
    axes.plot([0, 1], [0, 1], linestyle=":", color="grey")
    axes.set_xlabel("1 - specificity")
    axes.set_ylabel("sensitivity")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
