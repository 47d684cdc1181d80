"""One job, start to finish: series on disk -> model -> result files on disk (SEG + SR
for a segmentation, SR for a classification).

Pure functions called by the Celery task; no Celery here, so tests call them directly.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from models.base import ClassificationModel, InputKindValues, ModelError, SegmentationModel
from models.registry import get_model
from workers.outputs import DEFAULT_SEG, OVERLAY_PREFIX, SR_FILE, OutputRequest
from workers.overlays import KeyImage, build_overlay_images, key_images
from workers.seg import SegmentInfo, build_seg, plan_segments
from workers.seg_check import SegPlacementError, check_seg_placement
from workers.series import LoadedSeries, SeriesError, load_images, load_series
from workers.sr import SegmentMeasurement, build_classification_sr, build_sr, measure_segments
from workers.storage import write_dataset_atomic
from workers.uids import ResultUids

__all__ = ["run_job", "write_segmentation_results"]

logger = logging.getLogger(__name__)


def _failed(job_id: int, reason: str) -> dict[str, Any]:
    logger.warning("job %d failed: %s", job_id, reason, extra={"job_id": job_id})
    return {"status": "failed", "reason": reason}


def run_job(
    *,
    job_id: int,
    model_name: str,
    series_dir: Path,
    output_dir: Path,
    outputs: OutputRequest | None = None,
) -> dict[str, Any]:
    """Run one job and describe the outcome as JSON-able data.

    ``outputs`` says which result files to write (SEG variants, SR, overlays) and the
    settings they share; by default a BINARY SEG and an SR. A problem with the input
    (unreadable or inconsistent series, unsuitable input) or a SEG that would be
    misplaced is returned as ``{"status": "failed", "reason": ...}`` for the node to
    record; anything unexpected is logged and raised. A model that finds nothing is a
    result (``"empty": true``): the SR says so.

    Returns
    -------
    dict
        ``{"status": "ok", "files": [...], "empty": bool, "timings_s": {...}, ...}``
        with the SEG's ``measurements`` or the classifier's ``findings``, or the failure
        above.
    """
    request = outputs if outputs is not None else OutputRequest()
    started = time.perf_counter()
    paths = sorted(series_dir.glob("*.dcm"))
    if not paths:
        return _failed(job_id, f"no instances found in {series_dir}")
    model = get_model(model_name)
    if isinstance(model, ClassificationModel):
        outcome = _classify(job_id, model, paths, output_dir, request)
    elif isinstance(model, SegmentationModel):
        outcome = _segment(job_id, model, paths, output_dir, request)
    else:
        raise TypeError(f"model {model.name} is neither a segmentation nor a classification model")
    if outcome["status"] == "ok":
        outcome["outputs"] = request.model_dump(mode="json")  # who gets which file
        outcome["timings_s"]["total"] = time.perf_counter() - started
        logger.info(
            "job %d: %s on %d instances done in %.2f s",
            job_id,
            model.name,
            len(paths),
            outcome["timings_s"]["total"],
            extra={"job_id": job_id},
        )
    return outcome


def _segment(
    job_id: int,
    model: SegmentationModel,
    paths: list[Path],
    output_dir: Path,
    request: OutputRequest,
) -> dict[str, Any]:
    """Series -> label map -> the SEG variants, the SR and overlays the request names."""
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    try:
        series = load_series(paths)
    except SeriesError as exc:
        return _failed(job_id, str(exc))
    timings["load"] = time.perf_counter() - mark

    mark = time.perf_counter()
    try:
        label_map = model.predict(series.volume)
    except ModelError as exc:
        return _failed(job_id, f"{model.name}: {exc}")
    timings["inference"] = time.perf_counter() - mark
    if label_map.shape != series.volume.voxels.shape:
        raise RuntimeError(
            f"model {model.name} returned shape {label_map.shape} for a volume of "
            f"shape {series.volume.voxels.shape}"
        )
    empty = not np.any(label_map)
    if empty:
        logger.info("job %d: %s found none of its labels", job_id, model.name)

    mark = time.perf_counter()
    try:
        files, measurements = write_segmentation_results(
            series, label_map, model, request, output_dir
        )
    except SegPlacementError as exc:
        return _failed(job_id, f"a SEG was not sent, it would be misplaced: {exc}")
    timings["results"] = time.perf_counter() - mark
    return {
        "status": "ok",
        "files": [str(path) for path in files],
        "empty": empty,
        "measurements": [m.as_dict() for m in measurements],
        "timings_s": timings,
    }


def write_segmentation_results(
    series: LoadedSeries,
    label_map: npt.NDArray[np.integer],
    model: SegmentationModel,
    request: OutputRequest,
    output_dir: Path,
) -> tuple[list[Path], list[SegmentMeasurement]]:
    """The result step of a segmentation: the SEG variants, SRs and overlay images that
    ``request`` names, written into ``output_dir``.

    Returns
    -------
    tuple[list[Path], list[SegmentMeasurement]]
        The files written and what the SRs measured.

    Raises
    ------
    SegPlacementError
        If a SEG read back does not sit on its source slices (the file is removed).
    """
    uids = ResultUids.for_job(series.datasets[0].SeriesInstanceUID, model.name, model.version)
    output_dir.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
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
                series_description=request.describe(model.name, "SEG"),
                segments=segments,
            )
            if variant in request.seg_variants:
                path = output_dir / variant.file_name
                write_dataset_atomic(seg, path)
                try:
                    check_seg_placement(path, series)
                except SegPlacementError as exc:
                    for written in [*files, path]:  # nothing of this job may be sent
                        written.unlink()
                    raise SegPlacementError(f"{variant.file_name}: {exc}") from exc
                files.append(path)
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
                    series_description=request.describe(model.name, "SR"),
                    sop_instance_uid=(
                        None if variant == DEFAULT_SEG else uids.derive("sr", variant.file_name)
                    ),
                    instance_number=variant.instance_number,
                    measurements=measurements,
                )
                write_dataset_atomic(sr, output_dir / variant.sr_file_name)
                files.append(output_dir / variant.sr_file_name)
        measurements, images = numbers.result()
    if images:
        overlays = build_overlay_images(
            series,
            images,
            uids,
            series_number=request.overlay_series_number,
            series_description=request.describe(model.name, "Overlay"),
            notice=request.notice,
        )
        for number, overlay in enumerate(overlays, start=1):
            path = output_dir / f"{OVERLAY_PREFIX}{number:03d}.dcm"
            write_dataset_atomic(overlay, path)
            files.append(path)
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
    job_id: int,
    model: ClassificationModel,
    paths: list[Path],
    output_dir: Path,
    request: OutputRequest,
) -> dict[str, Any]:
    """Series (or each image of it) -> class probabilities -> SR."""
    timings: dict[str, float] = {}
    mark = time.perf_counter()
    try:
        if model.input_kind == InputKindValues.IMAGE:
            sources = load_images(paths)
        else:
            sources = [load_series(paths)]
    except SeriesError as exc:
        return _failed(job_id, str(exc))
    timings["load"] = time.perf_counter() - mark

    mark = time.perf_counter()
    results = []
    for source in sources:
        try:
            probabilities = model.predict(source.volume)
        except ModelError as exc:
            name = source.datasets[0].get("SOPInstanceUID", "?")
            return _failed(job_id, f"{model.name} on instance {name}: {exc}")
        if len(probabilities) != len(model.classes):
            raise RuntimeError(
                f"model {model.name} returned {len(probabilities)} probabilities for "
                f"{len(model.classes)} classes"
            )
        results.append((source, probabilities))
    timings["inference"] = time.perf_counter() - mark

    mark = time.perf_counter()
    first = sources[0].datasets[0]
    uids = ResultUids.for_job(first.SeriesInstanceUID, model.name, model.version)
    sr, findings = build_classification_sr(
        results,
        model,
        uids,
        series_number=request.sr_series_number,
        series_description=request.describe(model.name, "SR"),
    )
    output_dir.mkdir(parents=True, exist_ok=True)
    sr_path = output_dir / SR_FILE
    write_dataset_atomic(sr, sr_path)
    timings["results"] = time.perf_counter() - mark
    return {
        "status": "ok",
        "files": [str(sr_path)],
        "empty": False,
        "sr_sop_instance_uid": str(sr.SOPInstanceUID),
        "findings": [f.as_dict() for f in findings],
        "timings_s": timings,
    }
