"""``pacsnode render``: a job's overlay key images as PNG files, for a quick look.

The label map comes back from the SEG the job wrote (BINARY or LABELMAP, read with
highdicom), so nothing runs the model again; the pictures are drawn by the same code as
the overlay images sent to PACS (:mod:`workers.overlays`). A job that wrote no SEG but
overlay images gets those as PNG.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom import Dataset, dcmread

from models.base import Code, LabelSpec
from workers.outputs import OVERLAY_PREFIX
from workers.overlays import key_images
from workers.seg import SegmentInfo
from workers.series import LoadedSeries, load_series

__all__ = ["RenderError", "read_seg", "render_job"]


class RenderError(Exception):
    """The job has nothing to render; the message says why."""


def _code(item: Dataset) -> Code:
    return Code(str(item.CodeValue), str(item.CodingSchemeDesignator), str(item.CodeMeaning))


def _segments(seg: hd.seg.Segmentation) -> list[SegmentInfo]:
    """The SEG's own segment descriptions (name, codes, colour) as SegmentInfos whose
    label value is the segment number."""
    segments = []
    for item in seg.SegmentSequence:
        number = int(item.SegmentNumber)
        if number == 0:
            continue  # a label-map SEG's background
        lab = item.get("RecommendedDisplayCIELabValue")
        rgb = hd.color.CIELabColor.from_dicom_value(lab).to_rgb() if lab else (255, 0, 0)
        label = LabelSpec(
            value=number,
            name=str(item.SegmentLabel),
            category=_code(item.SegmentedPropertyCategoryCodeSequence[0]),
            property_type=_code(item.SegmentedPropertyTypeCodeSequence[0]),
            color_rgb=(int(rgb[0]), int(rgb[1]), int(rgb[2])),
        )
        segments.append(SegmentInfo(number, label, str(item.get("TrackingUID", ""))))
    return segments


def read_seg(path: Path, series: LoadedSeries) -> tuple[npt.NDArray[np.integer], list[SegmentInfo]]:
    """A SEG (BINARY or LABELMAP) read back onto its source series: the label map in the
    series' voxel order, valued by segment number, and the segments it describes.

    Raises
    ------
    ValueError
        If the SEG references instances the series lacks.
    """
    seg = hd.seg.segread(path)
    label_map = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[str(ds.SOPInstanceUID) for ds in series.datasets],
        combine_segments=True,
        ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True,
    )
    return np.asarray(label_map), _segments(seg)


def render_job(
    source_paths: list[Path], results_dir: Path, out_dir: Path, notice: str = ""
) -> list[Path]:
    """Write one PNG per segment of the job's SEG into ``out_dir``.

    Parameters
    ----------
    source_paths
        The job's source instances (its manifest's files).
    results_dir
        The job's result files.
    out_dir
        Where the PNG files go (created).
    notice
        Text added to each legend (config.yaml ``results.notice``).

    Returns
    -------
    list[Path]
        The PNG files, one per segment present.

    Raises
    ------
    RenderError
        If the job wrote neither a SEG nor overlay images, or its SEG is empty.
    """
    segs = sorted(results_dir.glob("seg-*.dcm"))
    overlays = sorted(results_dir.glob(f"{OVERLAY_PREFIX}*.dcm"))
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if not segs:
        if not overlays:
            raise RenderError(
                f"{results_dir} holds no SEG and no overlay images (a classification job, "
                "or a job that has not finished)"
            )
        for path in overlays:
            target = out_dir / f"{path.stem}.png"
            Image.fromarray(dcmread(path).pixel_array).save(target)
            written.append(target)
        return written
    series = load_series(source_paths)
    label_map, segments = read_seg(segs[0], series)
    voxel_ml = series.volume.voxel_volume_ml
    volumes = {
        info.label_value: float(np.count_nonzero(label_map == info.label_value)) * voxel_ml
        for info in segments
    }
    images = key_images(series, label_map, segments, volumes, notice)
    if not images:
        raise RenderError(f"{segs[0]} holds no segment pixels (the model found nothing)")
    for number, image in enumerate(images, start=1):
        name = "".join(c if c.isalnum() else "-" for c in image.segment.name.lower())
        target = out_dir / f"{number:03d}-{name}-slice{image.slice_index + 1}.png"
        Image.fromarray(image.rgb).save(target)
        written.append(target)
    return written
