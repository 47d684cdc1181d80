"""SEG write time: pacsnode's writer against highdicom's defaults and dcmqi, same mask, same CT.

Usage::

    python benchmarks/seg_write.py [--slices 300] [--size 512] [--repeat 3] [--no-variants]

A chest phantom (``tests.dicom_factory.chest_phantom``, ``--slices`` x ``--size`` x
``--size``, 1 mm slices, 358.4 mm field of view: 0.7 mm pixels at 512) is written as a CT
series and read once with ``workers.series.load_series``. A 5-label uint8 mask of the same
shape is painted from ellipsoids; at the defaults: soft tissue (261 of 300 slices), two
lungs (139), heart (79), spine (every slice) and a nodule (12), i.e. 791 non-empty (label,
slice) pairs of 1500, so omitting empty frames matters. A ``SegmentationModel`` subclass
defined here declares the five labels (SNOMED CT codes from pydicom's ``codes.SCT``); it
only names and codes the segments.

Three writers turn the mask into a BINARY DICOM Segmentation of the series:

- pacsnode: ``workers.seg.build_seg`` (construct), then ``workers.seg.write_seg``
  (save: temporary file, fsync, rename, folder fsync), in this process. Both are looked up
  through their modules at call time, so later changes to pacsnode's writer are measured.
  Each run's time is split by clocks wrapped around ``workers.seg.present_labels``,
  ``workers.seg_frames.build_segmentation`` (as ``workers.seg`` calls it), inside it
  ``highdicom.seg.Segmentation.__init__`` (the SEG of the first slice, pacsnode's
  template) and ``pydicom.Dataset.save_as`` (a part that is not called any more is
  reported as such).
- highdicom with its default arguments: ``highdicom.seg.Segmentation`` with only the
  required arguments (source images, the mask itself as a label-map ``pixel_array``, its
  values 1..5 being the segment numbers, segment descriptions, UIDs, series and instance
  numbers, equipment), then ``save_as``, in this process; no fsync. The source images are
  the headers ``load_series`` keeps (``series.datasets``, pixel data removed): highdicom
  needs no pixel data, so nothing is read again. Its defaults already omit empty frames
  (``omit_empty_frames=True``).
- dcmqi ``itkimage2segimage`` as a whole process, from start to exit: it reads the 300
  DICOM files (``--inputDICOMDirectory``), the mask as an uncompressed NIfTI file and a
  metadata JSON (``segmentAttributes`` for the five labels), and writes the SEG; empty
  frames are skipped (its default ``--skip 1``); no fsync. The native binary of the dcmqi
  wheel is run directly, not the Python console-script wrapper (about 60 ms more). Writing
  the NIfTI file is setup, not timed. The NIfTI affine is ``Volume.ras_affine`` with its
  columns reordered from (k, j, i) to NIfTI's (i, j, k), on the transposed mask.

Every writer runs once as a warm-up and then ``--repeat`` times, each time to a fresh path;
the fastest run counts, and the warm-up (a worker writes one SEG per job, cold) is shown
too. Outside the timing, each written SEG is read back with pydicom: its frames, segments
and size are printed, and every frame is checked against the mask (the slice found from its
ImagePositionPatient, orientation, segment, pixels) and every non-empty (label, slice) must
have a frame. dcmqi's SEG is also converted back with ``segimage2itkimage`` once and each
segment compared with the mask, voxel by voxel and affine.

Last (unless ``--no-variants``), highdicom is timed with single arguments changed from the
defaults: ``workers``, ``use_extended_offset_table``, ``omit_empty_frames=False``,
``dimension_organization_type="3D"`` and ``segmentation_type=LABELMAP``.

Bars: pacsnode writes this SEG (300x512x512, 5 labels) in 0.5 s or less, and at least 3x
faster than highdicom's defaults on the same machine (issue #10).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import highdicom as hd
import nibabel as nib
import numpy as np
import numpy.typing as npt
import pydicom
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code as PydicomCode

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from models.base import Code, LabelSpec, SegmentationModel, Volume
from tests.dicom_factory import chest_phantom, write_ct_series
from workers.series import LoadedSeries, load_series

logger = logging.getLogger("benchmarks.seg_write")

STEP_BAR_SECONDS = 1.0
BAR_SECONDS = 0.5
RATIO_BAR = 3.0
SLICE_SPACING_MM = 1.0
#: Field of view across rows and columns; pixel spacing is this over ``--size``.
FIELD_OF_VIEW_MM = 358.4
DCMQI_TIMEOUT_SECONDS = 600.0
MANUFACTURER = "seg-write benchmark"
SERIES_NUMBER = 902


def _code(code: PydicomCode) -> Code:
    return Code(code.value, code.scheme_designator, code.meaning)


_ANATOMY = _code(codes.SCT.AnatomicalStructure)

LABELS: tuple[LabelSpec, ...] = (
    LabelSpec(
        1, "Soft tissue", _code(codes.SCT.Tissue), _code(codes.SCT.SoftTissue), (177, 122, 101)
    ),
    LabelSpec(2, "Lung", _ANATOMY, _code(codes.SCT.Lung), (197, 165, 145)),
    LabelSpec(3, "Heart", _ANATOMY, _code(codes.SCT.Heart), (206, 110, 84)),
    LabelSpec(4, "Spine", _ANATOMY, _code(codes.SCT.Spine), (241, 214, 145)),
    LabelSpec(
        5,
        "Nodule",
        _code(codes.SCT.MorphologicallyAbnormalStructure),
        _code(codes.SCT.Nodule),
        (255, 0, 0),
    ),
)

#: (label, centre, semi-axes), as fractions of (slices, rows, columns); painted in this
#: order, later ones over earlier ones. The spine's long axis exceeds the volume, so it is
#: in every slice.
ELLIPSOIDS: tuple[tuple[int, tuple[float, float, float], tuple[float, float, float]], ...] = (
    (1, (0.5, 0.5, 0.5), (0.435, 0.33, 0.44)),
    (2, (0.433, 0.47, 0.29), (0.233, 0.195, 0.117)),
    (2, (0.433, 0.47, 0.71), (0.233, 0.195, 0.117)),
    (3, (0.5, 0.47, 0.5), (0.133, 0.117, 0.117)),
    (4, (0.5, 0.74, 0.5), (10.0, 0.06, 0.06)),
    (5, (0.467, 0.43, 0.31), (0.02, 0.023, 0.023)),
)


class BenchModel(SegmentationModel):
    """Five labels; ``predict`` returns the benchmark's mask (build_seg only reads the labels)."""

    name: ClassVar[str] = "seg-write-bench"
    version: ClassVar[str] = "1.0"
    labels: ClassVar[tuple[LabelSpec, ...]] = LABELS

    def __init__(self, label_map: npt.NDArray[np.uint8]) -> None:
        self.label_map = label_map

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        """The fixed mask."""
        return self.label_map


@dataclass(frozen=True)
class Timing:
    """One write: total seconds, its construct and save parts, pacsnode's finer split."""

    seconds: float
    construct: float | None = None
    save: float | None = None
    parts: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class SegFacts:
    """What a written SEG holds, and what the check against the mask found."""

    frames: int
    segments: int
    size_bytes: int
    transfer_syntax: str
    empty_frames: int
    segment_labels: dict[int, int]
    problems: tuple[str, ...]


@dataclass(frozen=True)
class Row:
    """One writer: the best run, the warm-up, the SEG it wrote."""

    tool: str
    best: Timing | None
    warm_up: float | None
    facts: SegFacts | None
    note: str = ""


# --- the data -------------------------------------------------------------------------


def paint_ellipsoid(
    mask: npt.NDArray[np.uint8],
    label: int,
    centre: tuple[float, float, float],
    semi_axes: tuple[float, float, float],
) -> None:
    """Set the voxels of an axis-aligned ellipsoid (fractions of the shape) to `label`."""
    slices, rows, cols = mask.shape
    ck, cj, ci = (c * n for c, n in zip(centre, mask.shape, strict=True))
    ak, aj, ai = (max(a * n, 0.5) for a, n in zip(semi_axes, mask.shape, strict=True))
    j = (np.arange(rows, dtype=np.float32) - cj) / aj
    i = (np.arange(cols, dtype=np.float32) - ci) / ai
    in_plane = j[:, None] ** 2 + i[None, :] ** 2
    for k in range(max(0, int(np.ceil(ck - ak))), min(slices, int(np.floor(ck + ak)) + 1)):
        limit = 1.0 - ((k - ck) / ak) ** 2
        if limit >= 0.0:
            mask[k][in_plane <= limit] = label


def make_mask(shape: tuple[int, int, int]) -> npt.NDArray[np.uint8]:
    """The 5-label mask of ``ELLIPSOIDS``."""
    mask = np.zeros(shape, dtype=np.uint8)
    for label, centre, semi_axes in ELLIPSOIDS:
        paint_ellipsoid(mask, label, centre, semi_axes)
    return mask


def label_presence(mask: npt.NDArray[np.uint8]) -> dict[int, npt.NDArray[np.bool_]]:
    """Per label, which slices hold it."""
    return {spec.value: np.asarray((mask == spec.value).any(axis=(1, 2))) for spec in LABELS}


def nifti_affine(volume: Volume) -> npt.NDArray[np.float64]:
    """Voxel (i, j, k) -> RAS mm: ``Volume.ras_affine`` (for (k, j, i)) with columns reordered."""
    return np.asarray(volume.ras_affine[:, [2, 1, 0, 3]], dtype=np.float64)


def write_nifti(mask: npt.NDArray[np.uint8], volume: Volume, path: Path) -> None:
    """The mask as NIfTI-1: array axes (i, j, k), qform and sform both the scanner affine."""
    affine = nifti_affine(volume)
    image = nib.nifti1.Nifti1Image(mask.transpose(2, 1, 0), affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.nifti1.save(image, path)


def dcmqi_metadata(path: Path) -> None:
    """itkimage2segimage's --inputMetadata: one input file whose labelIDs are the labels."""
    attributes = [
        {
            "labelID": spec.value,
            "SegmentLabel": spec.name,
            "SegmentDescription": spec.name,
            "SegmentedPropertyCategoryCodeSequence": {
                "CodeValue": spec.category.value,
                "CodingSchemeDesignator": spec.category.scheme_designator,
                "CodeMeaning": spec.category.meaning,
            },
            "SegmentedPropertyTypeCodeSequence": {
                "CodeValue": spec.property_type.value,
                "CodingSchemeDesignator": spec.property_type.scheme_designator,
                "CodeMeaning": spec.property_type.meaning,
            },
            "SegmentAlgorithmType": "AUTOMATIC",
            "SegmentAlgorithmName": BenchModel.name,
            "recommendedDisplayRGBValue": list(spec.color_rgb),
        }
        for spec in LABELS
    ]
    meta = {
        "ContentCreatorName": "Benchmark^SEG",
        "ClinicalTrialSeriesID": "1",
        "ClinicalTrialTimePointID": "1",
        "ClinicalTrialCoordinatingCenterName": "pacsnode",
        "SeriesDescription": "dcmqi SEG",
        "SeriesNumber": str(SERIES_NUMBER),
        "InstanceNumber": "1",
        "BodyPartExamined": "CHEST",
        "segmentAttributes": [attributes],
    }
    path.write_text(json.dumps(meta, indent=2), encoding="utf-8")


# --- the writers ----------------------------------------------------------------------


def clocked(fn: Callable[..., Any], spans: dict[str, float], name: str) -> Callable[..., Any]:
    """`fn`, adding the seconds of each call to ``spans[name]``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spans[name] = spans.get(name, 0.0) + time.perf_counter() - start

    return wrapper


PRESENT_LABELS = "present_labels"
FRAMES = "build_segmentation"
HIGHDICOM_INIT = "highdicom Segmentation()"
SAVE_AS = "Dataset.save_as"


@contextmanager
def pacsnode_clocks(spans: dict[str, float]) -> Iterator[None]:
    """Clocks around the parts of pacsnode's writer that exist (looked up now)."""
    from workers import seg as seg_module

    with ExitStack() as stack:
        for name in (PRESENT_LABELS, FRAMES):
            if hasattr(seg_module, name):
                original = getattr(seg_module, name)
                stack.enter_context(
                    mock.patch.object(seg_module, name, new=clocked(original, spans, name))
                )
        init = hd.seg.Segmentation.__init__
        stack.enter_context(
            mock.patch.object(
                hd.seg.Segmentation, "__init__", new=clocked(init, spans, HIGHDICOM_INIT)
            )
        )
        stack.enter_context(
            mock.patch.object(Dataset, "save_as", new=clocked(Dataset.save_as, spans, SAVE_AS))
        )
        yield


def pacsnode_write(
    series: LoadedSeries, mask: npt.NDArray[np.uint8], model: BenchModel, path: Path
) -> Timing:
    """``build_seg`` then ``write_seg``, each looked up through its module now."""
    from workers import seg as seg_module
    from workers.uids import ResultUids

    uids = ResultUids.for_job(
        str(series.datasets[0].SeriesInstanceUID), model.name, model.version, "benchmark"
    )
    spans: dict[str, float] = {}
    with pacsnode_clocks(spans):
        start = time.perf_counter()
        seg, _segments = seg_module.build_seg(series, mask, model, uids)
        built = time.perf_counter()
        seg_module.write_seg(seg, path)
        end = time.perf_counter()
    return Timing(end - start, built - start, end - built, spans)


def result_step_seconds(
    series: LoadedSeries, mask: npt.NDArray[np.uint8], model: BenchModel, out: Path, repeat: int
) -> float:
    """Best time of the worker's whole result step (SEG + placement check + SR + overlays)
    after one warm-up."""
    from workers.outputs import OutputProfile, OutputRequest
    from workers.pipeline import write_segmentation_results
    from workers.uids import ResultUids

    uids = ResultUids.for_job(
        str(series.datasets[0].SeriesInstanceUID), model.name, model.version, "benchmark"
    )
    request = OutputRequest.for_profiles([OutputProfile(overlays=True)])
    times = []
    for _ in range(repeat + 1):
        start = time.perf_counter()
        write_segmentation_results(series, mask, model, uids, request, out)
        times.append(time.perf_counter() - start)
    return min(times[1:])


def segment_descriptions() -> list[Any]:
    """highdicom SegmentDescriptions of ``LABELS``, numbered by label value."""
    algorithm = hd.AlgorithmIdentificationSequence(
        name=BenchModel.name, family=codes.cid7162.ArtificialIntelligence, version="1.0"
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=spec.value,
            segment_label=spec.name,
            segmented_property_category=PydicomCode(
                spec.category.value, spec.category.scheme_designator, spec.category.meaning
            ),
            segmented_property_type=PydicomCode(
                spec.property_type.value,
                spec.property_type.scheme_designator,
                spec.property_type.meaning,
            ),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for spec in LABELS
    ]


def highdicom_write(
    series: LoadedSeries,
    mask: npt.NDArray[np.uint8],
    path: Path,
    options: dict[str, Any] | None = None,
) -> tuple[Timing, int]:
    """``highdicom.seg.Segmentation`` (defaults, or with `options`) and ``save_as``.

    Returns
    -------
    tuple[Timing, int]
        The timing and the SEG's NumberOfFrames.
    """
    kwargs: dict[str, Any] = {"segmentation_type": hd.seg.SegmentationTypeValues.BINARY}
    kwargs.update(options or {})
    series_uid, instance_uid = hd.UID(), hd.UID()
    start = time.perf_counter()
    seg = hd.seg.Segmentation(
        source_images=list(series.datasets),
        pixel_array=mask,
        segment_descriptions=segment_descriptions(),
        series_instance_uid=series_uid,
        series_number=SERIES_NUMBER,
        sop_instance_uid=instance_uid,
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=MANUFACTURER,
        software_versions="1.0",
        device_serial_number="1",
        **kwargs,
    )
    built = time.perf_counter()
    seg.save_as(path)
    end = time.perf_counter()
    return Timing(end - start, built - start, end - built), int(seg.NumberOfFrames)


def dcmqi_write(tool: Path, nifti: Path, series_dir: Path, meta: Path, path: Path) -> Timing:
    """itkimage2segimage from start to exit.

    Raises
    ------
    RuntimeError
        If it fails.
    """
    command = [
        str(tool),
        "--inputImageList",
        str(nifti),
        "--inputDICOMDirectory",
        str(series_dir),
        "--inputMetadata",
        str(meta),
        "--outputDICOM",
        str(path),
    ]
    start = time.perf_counter()
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=DCMQI_TIMEOUT_SECONDS, check=False
    )
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()[-500:]
        raise RuntimeError(f"itkimage2segimage exited with status {result.returncode}: {output}")
    return Timing(seconds)


def best_of(run: Callable[[], Timing], path: Path, repeat: int, what: str) -> tuple[Timing, float]:
    """One warm-up, then the fastest of `repeat` runs; each run writes `path` afresh.

    Returns
    -------
    tuple[Timing, float]
        The best run and the warm-up's seconds.
    """
    best: Timing | None = None
    warm_up = 0.0
    for i in range(repeat + 1):
        path.unlink(missing_ok=True)
        timing = run()
        label = "warm-up" if i == 0 else f"run {i}/{repeat}"
        logger.info("%s %s: %.3f s", what, label, timing.seconds)
        if i == 0:
            warm_up = timing.seconds
        elif best is None or timing.seconds < best.seconds:
            best = timing
    assert best is not None
    return best, warm_up


# --- checks ---------------------------------------------------------------------------


def _item(frame: Dataset, shared: Dataset, keyword: str) -> Dataset:
    """The first item of a functional group, per frame or else shared."""
    sequence = frame.get(keyword) or shared.get(keyword)
    if not sequence:
        raise ValueError(f"no {keyword}, neither per frame nor shared")
    item: Dataset = sequence[0]
    return item


def check_seg(
    path: Path,
    mask: npt.NDArray[np.uint8],
    volume: Volume,
    presence: dict[int, npt.NDArray[np.bool_]],
) -> SegFacts:
    """Read a SEG and check every frame against the mask.

    A frame's slice comes from its ImagePositionPatient, its label from the segment's
    SegmentLabel; its pixels must equal ``mask[slice] == label``, its orientation the
    series', and every (label, slice) that the mask holds must have a frame.
    """
    ds = dcmread(path)
    frames = int(ds.get("NumberOfFrames", 1))
    names = {spec.name: spec.value for spec in LABELS}
    segment_labels = {
        int(item.SegmentNumber): names.get(str(item.SegmentLabel), -1)
        for item in ds.SegmentSequence
    }
    pixels = ds.pixel_array.reshape(frames, int(ds.Rows), int(ds.Columns))
    shared = (
        ds.SharedFunctionalGroupsSequence[0]
        if "SharedFunctionalGroupsSequence" in ds
        else Dataset()
    )
    orientation = np.concatenate([volume.row_direction, volume.column_direction])
    origin = np.asarray(volume.origin, dtype=np.float64)
    normal = np.asarray(volume.slice_direction, dtype=np.float64)
    step = volume.spacing_mm[0]
    problems: list[str] = []
    found: set[tuple[int, int]] = set()
    empty = 0
    for index, frame in enumerate(ds.PerFrameFunctionalGroupsSequence):
        where = f"frame {index + 1}"
        iop = [
            float(v)
            for v in _item(frame, shared, "PlaneOrientationSequence").ImageOrientationPatient
        ]
        if not np.allclose(iop, orientation, atol=1e-4):
            problems.append(f"{where}: ImageOrientationPatient {iop}")
            continue
        ipp = [float(v) for v in _item(frame, shared, "PlanePositionSequence").ImagePositionPatient]
        offset = np.asarray(ipp) - origin
        along = float(offset @ normal)
        k = round(along / step)
        if (
            not 0 <= k < mask.shape[0]
            or abs(along - k * step) > 0.01
            or float(np.linalg.norm(offset - along * normal)) > 0.01
        ):
            problems.append(f"{where}: ImagePositionPatient {ipp} is on no slice")
            continue
        number = int(_item(frame, shared, "SegmentIdentificationSequence").ReferencedSegmentNumber)
        label = segment_labels.get(number, -1)
        if (label, k) in found:
            problems.append(f"{where}: second frame of label {label} on slice {k}")
        found.add((label, k))
        if not pixels[index].any():
            empty += 1
        if not np.array_equal(pixels[index] != 0, mask[k] == label):
            problems.append(f"{where}: pixels differ from label {label} on slice {k}")
    expected = {(label, int(k)) for label, held in presence.items() for k in np.flatnonzero(held)}
    missing = sorted(expected - found)
    if missing:
        problems.append(
            f"{len(missing)} non-empty (label, slice) without a frame, e.g. {missing[0]}"
        )
    return SegFacts(
        frames=frames,
        segments=len(ds.SegmentSequence),
        size_bytes=path.stat().st_size,
        transfer_syntax=str(ds.file_meta.TransferSyntaxUID.name),
        empty_frames=empty,
        segment_labels=segment_labels,
        problems=tuple(problems),
    )


def dcmqi_round_trip(
    tool: Path,
    seg_path: Path,
    out_dir: Path,
    mask: npt.NDArray[np.uint8],
    affine: npt.NDArray[np.float64],
    segment_labels: dict[int, int],
) -> list[str]:
    """segimage2itkimage on dcmqi's SEG; each segment's NIfTI must equal the mask's label.

    Returns
    -------
    list[str]
        The problems found; empty if it round-trips.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    command = [str(tool), "--inputDICOM", str(seg_path), "--outputDirectory", str(out_dir)]
    result = subprocess.run(
        [*command, "-t", "nii"],
        capture_output=True,
        text=True,
        timeout=DCMQI_TIMEOUT_SECONDS,
        check=False,
    )
    if result.returncode != 0:
        return [f"segimage2itkimage exited with status {result.returncode}"]
    problems: list[str] = []
    images = sorted(p for p in out_dir.glob("*.nii*") if p.name.split(".")[0].isdigit())
    if len(images) != len(segment_labels):
        problems.append(f"{len(images)} segment images for {len(segment_labels)} segments")
    ijk_mask = mask.transpose(2, 1, 0)
    for image_path in images:
        number = int(image_path.name.split(".")[0])
        label = segment_labels.get(number, -1)
        image = nib.nifti1.load(image_path)
        if not np.allclose(image.affine, affine, atol=1e-3):
            problems.append(f"segment {number}: affine {image.affine.tolist()}")
            continue
        data = np.asanyarray(image.dataobj)
        if data.shape != ijk_mask.shape or not np.array_equal(data != 0, ijk_mask == label):
            problems.append(f"segment {number}: voxels differ from label {label}")
    return problems


# --- report ---------------------------------------------------------------------------


def dcmqi_binary(name: str) -> Path | None:
    """The native dcmqi executable `name` of the dcmqi wheel, else the one on PATH."""
    try:
        files = distribution("dcmqi").files or []
    except PackageNotFoundError:
        files = []
    for file in files:
        if str(file) == f"dcmqi/bin/{name}":
            return Path(str(file.locate())).resolve()
    found = shutil.which(name)
    return Path(found) if found else None


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def machine_line() -> str:
    """Where and with what the benchmark ran."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return (
        f"machine: {platform.platform()}, {platform.machine()}, {cpu}, {os.cpu_count()} CPUs; "
        f"python {platform.python_version()}; numpy {np.__version__}; "
        f"pydicom {pydicom.__version__}; highdicom {hd.__version__}; dcmqi {_version('dcmqi')}; "
        f"nibabel {nib.__version__}\n"
    )


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def format_table(rows: list[Row], title: str) -> str:
    """The writers side by side, with each one's time relative to pacsnode's."""
    pacsnode = next((r for r in rows if r.tool == "pacsnode" and r.best), None)
    header = (
        f"{'tool':<22} {'best s':>7} {'construct':>9} {'save':>6} {'warm-up':>7} "
        f"{'frames':>6} {'empty':>5} {'segs':>4} {'MiB':>6} {'tool / pacsnode':>15}"
    )
    lines = [title, header]
    for r in rows:
        if r.best is None:
            lines.append(f"{r.tool:<22} {r.note}")
            continue
        ratio = (
            f"{r.best.seconds / pacsnode.best.seconds:.2f}x" if pacsnode and pacsnode.best else "-"
        )
        facts = r.facts
        frames = str(facts.frames) if facts else "-"
        empty = str(facts.empty_frames) if facts else "-"
        segs = str(facts.segments) if facts else "-"
        size = f"{facts.size_bytes / 2**20:.1f}" if facts else "-"
        lines.append(
            f"{r.tool:<22} {r.best.seconds:>7.3f} {_seconds(r.best.construct):>9} "
            f"{_seconds(r.best.save):>6} {_seconds(r.warm_up):>7} {frames:>6} {empty:>5} "
            f"{segs:>4} {size:>6} {ratio:>15}"
        )
    lines.append(
        "tool / pacsnode: the tool's best seconds divided by pacsnode's (above 1: pacsnode is "
        "faster). construct: build_seg / Segmentation(); save: write_dataset_atomic (fsync + "
        "rename) / save_as (no fsync); dcmqi: the whole process (reads the DICOM series and "
        "the NIfTI mask, writes the SEG, no fsync). empty: frames with no pixel set."
    )
    for r in rows:
        if r.facts is None:
            continue
        check = "ok" if not r.facts.problems else "FAILED: " + "; ".join(r.facts.problems[:5])
        lines.append(f"check {r.tool}: {r.facts.transfer_syntax}; frames against the mask {check}")
        if r.note:
            lines.append(f"  {r.note}")
    return "\n".join(lines) + "\n"


def format_split(timing: Timing) -> str:
    """Where pacsnode's best run spent its time."""
    parts = timing.parts
    construct = timing.construct or 0.0
    save = timing.save or 0.0
    frames = parts.get(FRAMES)
    template = parts.get(HIGHDICOM_INIT)
    rows: list[tuple[str, float | None]] = [
        ("workers.seg.present_labels", parts.get(PRESENT_LABELS)),
        ("seg_frames.build_segmentation", frames),
        ("  of it highdicom Segmentation() (1 slice)", template),
        (
            "  of it frames, references (seg_frames)",
            None if frames is None else frames - (template or 0.0),
        ),
        ("rest of build_seg", construct - parts.get(PRESENT_LABELS, 0.0) - (frames or 0.0)),
        ("Dataset.save_as (encode + write)", parts.get(SAVE_AS)),
        ("rest of write_dataset_atomic", save - parts.get(SAVE_AS, 0.0)),
        ("total", timing.seconds),
    ]
    lines = [
        "pacsnode split of its best run",
        f"{'part':<40} {'seconds':>8} {'share':>6}",
    ]
    for name, seconds in rows:
        if seconds is None:
            lines.append(f"{name:<40} {'-':>8}")
            continue
        lines.append(f"{name:<40} {seconds:>8.3f} {100.0 * seconds / timing.seconds:>5.1f}%")
    lines.append(
        "rest of build_seg: input checks, the label-value -> segment-number remap, segment "
        "descriptions, UIDs; rest of write_dataset_atomic: temporary file, fsync, rename, "
        "folder fsync. -: not called (or no such part) any more."
    )
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class Variant:
    """highdicom with one argument changed from its defaults."""

    name: str
    best: Timing | None
    frames: int
    size_bytes: int
    note: str


VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("defaults", {}),
    ("workers=<cpu count>", {"workers": os.cpu_count() or 1}),
    ("use_extended_offset_table=True", {"use_extended_offset_table": True}),
    ("omit_empty_frames=False", {"omit_empty_frames": False}),
    ('dimension_organization_type="3D"', {"dimension_organization_type": "3D"}),
    ("segmentation_type=LABELMAP", {"segmentation_type": "LABELMAP"}),
)


def measure_variant(
    name: str,
    options: dict[str, Any],
    series: LoadedSeries,
    mask: npt.NDArray[np.uint8],
    path: Path,
    repeat: int,
) -> Variant:
    """highdicom with `options`, best of `repeat` after a warm-up; warnings become the note."""
    frames = 0

    def run() -> Timing:
        nonlocal frames
        timing, frames = highdicom_write(series, mask, path, options)
        return timing

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            best, _warm_up = best_of(run, path, repeat, f"highdicom {name}")
        except (ValueError, TypeError) as e:
            return Variant(name, None, 0, 0, f"rejected: {e}")
    messages = sorted({str(w.message) for w in caught})
    return Variant(name, best, frames, path.stat().st_size, " ".join(messages))


def format_variants(variants: list[Variant], repeat: int) -> str:
    """The highdicom argument variants."""
    header = f"{'argument':<34} {'best s':>7} {'construct':>9} {'save':>6} {'frames':>6} {'MiB':>6}"
    lines = [
        f"highdicom arguments (construct + save_as, best of {repeat} after 1 warm-up)",
        f"{header}  note",
    ]
    for v in variants:
        if v.best is None:
            lines.append(f"{v.name:<34} {v.note}")
            continue
        lines.append(
            f"{v.name:<34} {v.best.seconds:>7.3f} {_seconds(v.best.construct):>9} "
            f"{_seconds(v.best.save):>6} {v.frames:>6} {v.size_bytes / 2**20:>6.1f}  {v.note}"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the tables to stdout.

    Parameters
    ----------
    argv
        Command line arguments; ``sys.argv[1:]`` when None.

    Returns
    -------
    int
        The exit status: 0, or 1 if a writer failed or wrote a SEG that does not match the
        mask.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("--slices", type=int, default=300, help="slices in the CT series")
    parser.add_argument("--size", type=int, default=512, help="rows and columns per slice")
    parser.add_argument("--repeat", type=int, default=3, help="runs after a warm-up; best counts")
    parser.add_argument(
        "--no-variants", action="store_true", help="skip the highdicom argument variants"
    )
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error(f"--repeat must be 1 or more. Found {args.repeat}.")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("workers").setLevel(logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)

    started = time.perf_counter()
    rows: list[Row] = []
    variants: list[Variant] = []
    with tempfile.TemporaryDirectory(prefix="seg-write-bench-") as tmp:
        workdir = Path(tmp)
        series_dir = workdir / "series"
        out_dir = workdir / "out"
        out_dir.mkdir()
        pixel_mm = FIELD_OF_VIEW_MM / args.size
        spacing_mm = (SLICE_SPACING_MM, pixel_mm, pixel_mm)
        shape = (args.slices, args.size, args.size)
        phantom = chest_phantom(shape, spacing_mm=spacing_mm)
        files = write_ct_series(phantom.hu, series_dir, spacing_mm=spacing_mm)
        del phantom
        series = load_series(files)
        volume = series.volume
        mask = make_mask(shape)
        presence = label_presence(mask)
        model = BenchModel(mask)
        nifti = workdir / "mask.nii"
        write_nifti(mask, volume, nifti)
        meta = workdir / "meta.json"
        dcmqi_metadata(meta)
        setup_seconds = time.perf_counter() - started
        logger.info(
            "Wrote and decoded %d slices, painted the mask in %.1f s; label slices: %s",
            len(files),
            setup_seconds,
            {label: int(held.sum()) for label, held in presence.items()},
        )

        # pacsnode.
        path = out_dir / "pacsnode.dcm"
        best, warm_up = best_of(
            lambda: pacsnode_write(series, mask, model, path), path, args.repeat, "pacsnode"
        )
        rows.append(Row("pacsnode", best, warm_up, check_seg(path, mask, volume, presence)))
        pacsnode_best = best
        result_step = result_step_seconds(series, mask, model, workdir / "step", args.repeat)

        # highdicom, default arguments.
        path = out_dir / "highdicom.dcm"
        best, warm_up = best_of(
            lambda: highdicom_write(series, mask, path)[0], path, args.repeat, "highdicom"
        )
        rows.append(
            Row("highdicom defaults", best, warm_up, check_seg(path, mask, volume, presence))
        )

        # dcmqi, the whole process.
        tool = dcmqi_binary("itkimage2segimage")
        if tool is None:
            rows.append(Row("dcmqi itkimage2segimage", None, None, None, "not installed"))
        else:
            path = out_dir / "dcmqi.dcm"
            try:
                best, warm_up = best_of(
                    lambda: dcmqi_write(tool, nifti, series_dir, meta, path),
                    path,
                    args.repeat,
                    "dcmqi",
                )
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                rows.append(Row("dcmqi itkimage2segimage", None, None, None, f"failed ({e})"))
            else:
                facts = check_seg(path, mask, volume, presence)
                reader = dcmqi_binary("segimage2itkimage")
                if reader is None:
                    note = "segimage2itkimage not found: no round trip"
                else:
                    trip = dcmqi_round_trip(
                        reader,
                        path,
                        workdir / "round-trip",
                        mask,
                        nifti_affine(volume),
                        facts.segment_labels,
                    )
                    note = "segimage2itkimage round trip: " + (
                        "every segment equals its label, same affine"
                        if not trip
                        else "FAILED: " + "; ".join(trip[:5])
                    )
                    if trip:
                        facts = replace(facts, problems=(*facts.problems, *trip))
                rows.append(Row("dcmqi itkimage2segimage", best, warm_up, facts, note))

        if not args.no_variants:
            path = out_dir / "variant.dcm"
            variants = [
                measure_variant(name, options, series, mask, path, args.repeat)
                for name, options in VARIANTS
            ]

    total_seconds = time.perf_counter() - started
    size = "x".join(str(n) for n in shape)
    frames_needed = sum(int(held.sum()) for held in presence.values())
    sys.stdout.write(machine_line())
    sys.stdout.write(
        format_table(
            rows,
            f"BINARY SEG of a {size} CT series (slices x rows x columns), {len(LABELS)} labels "
            f"in {frames_needed} (label, slice) pairs of {len(LABELS) * args.slices}; "
            f"best of {args.repeat} runs after 1 warm-up each",
        )
    )
    sys.stdout.write(format_split(pacsnode_best))
    if variants:
        sys.stdout.write(format_variants(variants, args.repeat))
    step_verdict = "met" if result_step < STEP_BAR_SECONDS else "NOT met"
    sys.stdout.write(
        f"Whole result step (workers.pipeline.write_segmentation_results: BINARY SEG written "
        f"and checked against its source slices, SR, {len(LABELS)} overlay images): "
        f"best {result_step:.3f} s; bar under {STEP_BAR_SECONDS} s: {step_verdict}.\n"
    )
    verdict = "met" if pacsnode_best.seconds <= BAR_SECONDS else "NOT met"
    if (args.slices, args.size) != (300, 512):
        verdict += f" (the bar is for 300x512x512; this run wrote {size})"
    highdicom_best = next(r.best for r in rows if r.tool == "highdicom defaults")
    ratio = highdicom_best.seconds / pacsnode_best.seconds if highdicom_best else 0.0
    ratio_verdict = "met" if ratio >= RATIO_BAR else "NOT met"
    sys.stdout.write(
        f"Issue bar: pacsnode writes this SEG in {BAR_SECONDS} s or less on this machine: "
        f"best {pacsnode_best.seconds:.3f} s, {verdict} "
        f"({pacsnode_best.seconds / BAR_SECONDS:.2f}x the bar).\n"
        f"Issue bar: at least {RATIO_BAR:.0f}x faster than highdicom's defaults: "
        f"{ratio:.2f}x, {ratio_verdict}.\n"
        f"Whole benchmark: {total_seconds:.1f} s (setup {setup_seconds:.1f} s).\n"
    )
    logger.info("Benchmark took %.1f s", total_seconds)
    failed = [r for r in rows if r.best is None or (r.facts is not None and r.facts.problems)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
