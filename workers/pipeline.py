"""One job, start to finish: its manifest's files -> model -> result files on disk (SEG
+ SR for a segmentation, SR for a classification, a rejection note per destination that
withdraws the previous version).

Pure functions called by the Celery task; no Celery here, so tests call them directly.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
from pydicom import Dataset

from models.base import (
    ClassificationModel,
    InputKindValues,
    ModelError,
    SegmentationModel,
    Volume,
)
from models.registry import get_model
from workers.contract import JobOutcome, JobRequest, ResultInstance
from workers.inputs import ManifestError, manifest_reader, take
from workers.outputs import DEFAULT_SEG, OVERLAY_PREFIX, SR_FILE, OutputRequest
from workers.overlays import KeyImage, build_overlay_images, key_images
from workers.rejection import build_rejection_note
from workers.seg import SegmentInfo, build_seg, plan_segments, write_seg
from workers.seg_check import SegPlacementError, check_seg_placement
from workers.series import (
    FileReader,
    LoadedSeries,
    SeriesError,
    load_images,
    load_series,
    read_file,
    resample_onto,
)
from workers.sr import SegmentMeasurement, build_classification_sr, build_sr, measure_segments
from workers.stages import JobStages, job_stages
from workers.storage import write_dataset_atomic
from workers.uids import ResultUids

__all__ = ["run_job", "write_segmentation_results"]

logger = logging.getLogger(__name__)

REJECTION_PREFIX = "rejection-"


def _failed(job_id: int, reason: str) -> JobOutcome:
    logger.warning("job %d failed: %s", job_id, reason, extra={"job_id": job_id})
    return JobOutcome.failed(reason)


def _result(ds: Dataset, path: Path) -> ResultInstance:
    return ResultInstance(
        path=str(path),
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
    )


def _stamp(ds: Dataset, created: datetime | None) -> None:
    """Date the object by its job's request instead of the clock (highdicom's default),
    so that the same request always writes the same bytes: a job run again after a
    crash re-sends objects identical to any its destinations already hold."""
    if created is None:
        return
    date, time_of_day = created.strftime("%Y%m%d"), created.strftime("%H%M%S.%f")
    ds.InstanceCreationDate, ds.InstanceCreationTime = date, time_of_day
    if "ContentDate" in ds:
        ds.ContentDate, ds.ContentTime = date, time_of_day
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = date + time_of_day


def _write(ds: Dataset, path: Path, created: datetime | None) -> ResultInstance:
    _stamp(ds, created)
    write_dataset_atomic(ds, path)
    return _result(ds, path)


def _created(request: JobRequest) -> datetime | None:
    return None if request.created_at is None else datetime.fromtimestamp(request.created_at)


def _predecessors(reports: Sequence[ResultInstance], sr_file_name: str) -> list[Dataset]:
    """The previous version's SRs that an SR written as ``sr_file_name`` replaces: the
    one of the same name, else all of them."""
    same = [r for r in reports if r.name == sr_file_name]
    previous = []
    for report in same or reports:
        ds = Dataset()
        ds.StudyInstanceUID = report.study_instance_uid
        ds.SeriesInstanceUID = report.series_instance_uid
        ds.SOPClassUID = report.sop_class_uid
        ds.SOPInstanceUID = report.sop_instance_uid
        previous.append(ds)
    return previous


def run_job(request: JobRequest) -> JobOutcome:
    """Run one job on exactly its manifest and describe the outcome.

    ``request.outputs`` says which result files to write (SEG variants, SR, overlays)
    and the settings they share. A problem with the input (a file changed or missing,
    an unreadable or inconsistent series, unsuitable input) or a SEG that would be
    misplaced is a failed outcome with the reason, for the node to record; anything
    unexpected is logged and raised. A model that finds nothing is a result
    (``empty``): the SR says so.

    Each step runs in its stage (:mod:`workers.stages`), so that an overlapping worker
    loads the next job and writes the previous one while this one has the model.
    """
    paths = [Path(i.path) for i in request.manifest.instances]
    with job_stages() as stages:
        stages.enter("load")
        started = time.perf_counter()
        model = get_model(request.model)
        if isinstance(model, ClassificationModel):
            outcome = _classify(request, model, paths, stages)
        elif isinstance(model, SegmentationModel):
            outcome = _segment(request, model, paths, stages)
        else:
            raise TypeError(
                f"model {model.name} is neither a segmentation nor a classification model"
            )
    if outcome.status != "ok":
        return outcome
    total = time.perf_counter() - started
    logger.info(
        "job %d: %s on %d instances done in %.2f s",
        request.job_id,
        model.name,
        len(paths),
        total,
        extra={"job_id": request.job_id},
    )
    waits = {f"wait for {stage}": seconds for stage, seconds in stages.waited_s.items()}
    return outcome.model_copy(
        update={
            "timings_s": {**outcome.timings_s, **waits, "total": total},
            "stages_at": {**stages.entered, "done": time.time()},
        }
    )


def _uids(request: JobRequest, series_instance_uid: str, model_version: str) -> ResultUids:
    return ResultUids.for_job(series_instance_uid, request.model, model_version, request.result_key)


def _rejection_notes(
    request: JobRequest, source: Dataset, uids: ResultUids, output_dir: Path
) -> tuple[list[ResultInstance], dict[str, str]]:
    """One IOCM rejection note per destination that holds objects of the previous
    version (``request.rejections``), in the study of ``source``."""
    files: list[ResultInstance] = []
    notes: dict[str, str] = {}
    for number, (destination, rejected) in enumerate(sorted(request.rejections.items()), 1):
        if not rejected:
            continue
        note = build_rejection_note(
            source,
            rejected,
            series_instance_uid=uids.derive("rejection-series"),
            sop_instance_uid=uids.derive("rejection", destination),
            series_number=request.outputs.rejection_series_number,
            series_description=request.outputs.describe(
                request.model, "rejection note", request.revision
            ),
        )
        path = output_dir / f"{REJECTION_PREFIX}{number:03d}.dcm"
        files.append(_write(note, path, _created(request)))
        notes[destination] = path.name
    return files, notes


def _previous_reports(request: JobRequest) -> tuple[ResultInstance, ...]:
    return request.predecessor.reports if request.predecessor is not None else ()


def _segment(
    request: JobRequest, model: SegmentationModel, paths: list[Path], stages: JobStages
) -> JobOutcome:
    """Series -> label map -> the SEG variants, the SRs, overlays and rejection notes
    the request names."""
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    read = manifest_reader(request.manifest.all_instances)
    try:
        preloaded = take(request.manifest.instances)
        series = preloaded or load_series(paths, read)
        volume, other_inputs = series.volume, list[LoadedSeries]()
        if model.inputs:
            others = {
                other.name: [Path(i.path) for i in other.instances]
                for other in request.manifest.other_inputs
            }
            volume, other_inputs = stack_inputs(series, others, model, read)
    except (ManifestError, SeriesError) as exc:
        return _failed(request.job_id, str(exc))
    timings["load"] = time.perf_counter() - mark

    stages.enter("model")
    mark = time.perf_counter()
    try:
        label_map = model.predict(volume)
    except ModelError as exc:
        return _failed(request.job_id, f"{model.name}: {exc}")
    timings["inference"] = time.perf_counter() - mark
    timings.update(model.last_stage_seconds())
    if label_map.shape != series.volume.voxels.shape:
        raise RuntimeError(
            f"model {model.name} returned shape {label_map.shape} for a volume of "
            f"shape {series.volume.voxels.shape}"
        )
    empty = not np.any(label_map)
    if empty:
        logger.info("job %d: %s found none of its labels", request.job_id, model.name)

    stages.enter("write")
    mark = time.perf_counter()
    output_dir = Path(request.output_dir)
    uids = _uids(request, str(series.datasets[0].SeriesInstanceUID), model.algorithm_version())
    try:
        files, measurements = write_segmentation_results(
            series,
            label_map,
            model,
            uids,
            request.outputs,
            output_dir,
            revision=request.revision,
            previous_reports=_previous_reports(request),
            other_inputs=other_inputs,
            created=_created(request),
        )
    except SegPlacementError as exc:
        return _failed(request.job_id, f"a SEG was not sent, it would be misplaced: {exc}")
    notes, by_destination = _rejection_notes(request, series.datasets[0], uids, output_dir)
    timings["results"] = time.perf_counter() - mark
    return JobOutcome(
        status="ok",
        files=(*files, *notes),
        empty=empty,
        measurements=tuple(m.as_dict() for m in measurements),
        timings_s=timings,
        rejection_notes=by_destination,
        preloaded=preloaded is not None,
    )


def stack_inputs(
    reference: LoadedSeries,
    other_inputs: Mapping[str, Iterable[Path]],
    model: SegmentationModel,
    read: FileReader = read_file,
) -> tuple[Volume, list[LoadedSeries]]:
    """A multi-series model's input: each input series loaded (its files read by
    ``read``) and resampled onto the reference series' grid, stacked as channels in the
    model's input order; and the series other than the reference (the SR lists them).

    Raises
    ------
    SeriesError
        If an input is missing or lies in another frame of reference.
    """
    loaded = {str(model.reference_input): reference}
    for name, paths in other_inputs.items():
        loaded[name] = load_series(paths, read)
    missing = [name for name in model.inputs if name not in loaded]
    if missing:
        raise SeriesError(f"the job has no series for input(s) {', '.join(missing)}")
    frame = reference.datasets[0].get("FrameOfReferenceUID")
    for name, series in loaded.items():
        if series.datasets[0].get("FrameOfReferenceUID") != frame:
            raise SeriesError(
                f"input {name!r} (series {series.datasets[0].SeriesInstanceUID}) is in frame "
                f"of reference {series.datasets[0].get('FrameOfReferenceUID')}, the reference "
                f"series in {frame}: their positions cannot be related"
            )
    channels = [resample_onto(loaded[name].volume, reference.volume) for name in model.inputs]
    others = [series for series in loaded.values() if series is not reference]
    return dataclasses.replace(reference.volume, voxels=np.stack(channels)), others


def write_segmentation_results(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    model: SegmentationModel,
    uids: ResultUids,
    request: OutputRequest,
    output_dir: Path,
    *,
    revision: int = 1,
    previous_reports: Sequence[ResultInstance] = (),
    other_inputs: Sequence[LoadedSeries] = (),
    created: datetime | None = None,
) -> tuple[list[ResultInstance], list[SegmentMeasurement]]:
    """The result step of a segmentation: the SEG variants, SRs and overlay images that
    ``request`` names, written into ``output_dir``.

    Parameters
    ----------
    series
        The series the label map lies on (a multi-series model's reference input).
    uids
        The job's result UIDs (:meth:`workers.uids.ResultUids.for_job`).
    revision
        The version of these results; above 1 the series descriptions say so.
    previous_reports
        The SRs of the version these results replace, named as predecessors.
    other_inputs
        A multi-series model's other input series; the SRs list them as evidence.
    created
        When the job was requested: every object's creation and content time (None:
        now).

    Returns
    -------
    tuple[list[ResultInstance], list[SegmentMeasurement]]
        The files written and what the SRs measured.

    Raises
    ------
    SegPlacementError
        If a SEG would not sit on its source slices (it is not written, and the files
        written before it are removed).
    """
    output_dir.mkdir(parents=True, exist_ok=True)
    files: list[ResultInstance] = []
    segments = plan_segments(label_map, model, uids)
    with ThreadPoolExecutor(max_workers=1) as pool:
        # Statistics and key images are numpy work that releases the GIL: they run beside
        # the SEG build, which is mostly Python.
        numbers = pool.submit(_measure_and_draw, series, label_map, segments, request)
        # Every SEG sent, plus any an SR must reference although nobody receives it.
        needed = list(request.seg_variants)
        needed += [v for v in request.sr_references if v not in needed]
        for variant in needed:
            seg, _ = build_seg(
                series,
                label_map,
                model,
                uids,
                seg_type=variant.seg_type,
                omit_empty_frames=variant.omit_empty_frames,
                series_number=request.seg_series_number,
                series_description=request.describe(model.name, "SEG", revision),
                segments=segments,
            )
            if variant in request.seg_variants:
                try:
                    check_seg_placement(seg, series)
                except SegPlacementError as exc:
                    for written in files:
                        Path(written.path).unlink()  # nothing of this job may be sent
                    raise SegPlacementError(f"{variant.file_name}: {exc}") from exc
                path = output_dir / variant.file_name
                _stamp(seg, created)
                write_seg(seg, path)
                files.append(_result(seg, path))
            if variant in request.sr_references:
                measurements, _ = numbers.result()
                sr, _ = build_sr(
                    series,
                    label_map,
                    model,
                    seg,
                    segments,
                    uids,
                    series_number=request.sr_series_number,
                    series_description=request.describe(model.name, "SR", revision),
                    sop_instance_uid=(
                        None if variant == DEFAULT_SEG else uids.derive("sr", variant.file_name)
                    ),
                    instance_number=variant.instance_number,
                    measurements=measurements,
                    previous_versions=_predecessors(previous_reports, variant.sr_file_name),
                    other_inputs=other_inputs,
                )
                files.append(_write(sr, output_dir / variant.sr_file_name, created))
        measurements, images = numbers.result()
    if images:
        overlays = build_overlay_images(
            series,
            images,
            uids,
            series_number=request.overlay_series_number,
            series_description=request.describe(model.name, "Overlay", revision),
            notice=request.notice,
        )
        for number, overlay in enumerate(overlays, start=1):
            path = output_dir / f"{OVERLAY_PREFIX}{number:03d}.dcm"
            files.append(_write(overlay, path, created))
    return files, measurements


def _measure_and_draw(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    segments: list[SegmentInfo],
    request: OutputRequest,
) -> tuple[list[SegmentMeasurement], list[KeyImage]]:
    """Statistics of the segments present, and their key images if overlays are wanted."""
    # plan_segments lists the labels present, or all of them when none is (empty result).
    present = segments if np.any(label_map) else []
    measurements = measure_segments(series, label_map, present)
    images: list[KeyImage] = []
    if request.overlays and present:
        volumes = {m.label_value: m.volume_ml for m in measurements}
        images = key_images(series, label_map, present, volumes, request.notice)
    return measurements, images


def _classify(
    request: JobRequest, model: ClassificationModel, paths: list[Path], stages: JobStages
) -> JobOutcome:
    """Series (or each image of it) -> class probabilities -> SR (+ rejection notes)."""
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    read = manifest_reader(request.manifest.all_instances)
    try:
        if model.input_kind == InputKindValues.IMAGE:
            sources = load_images(paths, read)
        else:
            sources = [load_series(paths, read)]
    except (ManifestError, SeriesError) as exc:
        return _failed(request.job_id, str(exc))
    timings["load"] = time.perf_counter() - mark

    stages.enter("model")
    mark = time.perf_counter()
    results = []
    for source in sources:
        try:
            probabilities = model.predict(source.volume)
        except ModelError as exc:
            name = source.datasets[0].get("SOPInstanceUID", "?")
            return _failed(request.job_id, f"{model.name} on instance {name}: {exc}")
        if len(probabilities) != len(model.classes):
            raise RuntimeError(
                f"model {model.name} returned {len(probabilities)} probabilities for "
                f"{len(model.classes)} classes"
            )
        results.append((source, probabilities))
    timings["inference"] = time.perf_counter() - mark
    if len(sources) == 1:  # a per-image model's parts would be the last image's only
        timings.update(model.last_stage_seconds())

    stages.enter("write")
    mark = time.perf_counter()
    first = sources[0].datasets[0]
    uids = _uids(request, str(first.SeriesInstanceUID), model.algorithm_version())
    outputs = request.outputs
    sr, findings = build_classification_sr(
        results,
        model,
        uids,
        series_number=outputs.sr_series_number,
        series_description=outputs.describe(model.name, "SR", request.revision),
        previous_versions=_predecessors(_previous_reports(request), SR_FILE),
    )
    output_dir = Path(request.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    report = _write(sr, output_dir / SR_FILE, _created(request))
    notes, by_destination = _rejection_notes(request, first, uids, output_dir)
    timings["results"] = time.perf_counter() - mark
    return JobOutcome(
        status="ok",
        files=(report, *notes),
        findings=tuple(f.as_dict() for f in findings),
        timings_s=timings,
        rejection_notes=by_destination,
    )
