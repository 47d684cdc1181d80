"""What the radiologist sees: every SEG pacsnode writes, opened by the viewer's own code.

``tests/viewer`` bundles ``@cornerstonejs/adapters`` at two versions (5.6.8, which OHIF
3.13.2 pins, and the latest 5.x) and opens each SEG the way OHIF does
(``createFromDICOMSegBuffer`` over the source series' image ids) in Debian's headless
chromium. For each geometry and each encoding (BINARY, LABELMAP; with and without empty
frames) the segments the viewer lists must carry their own number, name and colour, and
the label values it paints on each source image must be the model's, pixel for pixel.
A flipped SEG and a label map with the names shifted by one are negative controls.
"""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pytest
from pydicom import dcmread

from models.base import SegmentationModel
from models.registry import get_segmentation_model
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.job_requests import job_request
from workers.outputs import OutputRequest, SegVariant
from workers.pipeline import run_job
from workers.series import LoadedSeries, load_series

pytestmark = pytest.mark.integration

VIEWER = Path(__file__).resolve().parents[1] / "viewer"
#: cornerstone3D versions: the one OHIF 3.13.2 pins, and the latest 5.x.
VERSIONS = ("5.6.8", "5.14.0")
VARIANTS = tuple(
    SegVariant(seg_type=kind, omit_empty_frames=omit)
    for kind in ("binary", "labelmap")
    for omit in (True, False)
)
GEOMETRIES: dict[str, dict[str, Any]] = {
    "axial head first": {},
    "axial feet first": {"feet_first": True},
    "sagittal": {"orientation": "sagittal"},
    "coronal": {"orientation": "coronal"},
    "oblique": {"orientation": "oblique"},
    "shuffled files": {"shuffle": True},
}


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The harness bundled once per cornerstone version (esbuild)."""
    out = tmp_path_factory.mktemp("viewer")
    built = {}
    for version in VERSIONS:
        path = out / f"harness-{version}.js"
        subprocess.run(
            ["node", "build.mjs", f"cs-{version}", str(path)],
            cwd=VIEWER, check=True, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        built[version] = path
    return built


def open_in_viewer(bundle: Path, sources: list[Path], segs: list[Path], work: Path) -> list[Any]:
    """Each SEG as the viewer loads it: its segment list and the label values it paints
    per source instance (SOP Instance UID -> base64 bytes)."""
    job = work / "viewer-job.json"
    job.write_text(json.dumps({"sources": [str(p) for p in sources],
                               "segs": [str(p) for p in segs]}))  # fmt: skip
    run = subprocess.run(
        ["node", "run.mjs", str(bundle), str(job)],
        cwd=VIEWER, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    results: list[Any] = json.loads(run.stdout)
    return results


def viewer_problems(
    shown: dict[str, Any],
    seg_path: Path,
    series: LoadedSeries,
    expected: npt.NDArray[np.uint8],
    model: SegmentationModel,
) -> list[str]:
    """What the viewer shows differently from the model's labels, one line each: a
    segment under another number, name or colour than the SEG gives it, or label values
    painted on other pixels than the model labelled."""
    problems = [f"viewer error: {e}" for e in shown["errors"]]
    items = {int(item.SegmentNumber): item for item in dcmread(seg_path).SegmentSequence}
    by_name = {label.name: label for label in model.labels}
    value_of_painted: dict[int, int] = {}
    for segment in shown["segments"]:
        label = by_name.get(segment["label"])
        if label is None:
            problems.append(f"segment {segment['value']} is listed as {segment['label']!r}")
            continue
        item = items.get(segment["value"])
        if item is None or str(item.SegmentLabel) != label.name:
            problems.append(f"{label.name} is listed for pixel value {segment['value']}")
        if segment["number"] != segment["value"]:
            problems.append(f"{label.name}: index {segment['value']}, number {segment['number']}")
        if (
            item is not None
            and [int(v) for v in item.RecommendedDisplayCIELabValue] != segment["lab"]
        ):
            problems.append(f"{label.name}: colour {segment['lab']}")
        value_of_painted[segment["value"]] = label.value
    lookup = np.zeros(256, dtype=np.uint8)
    for painted_value, model_value in value_of_painted.items():
        lookup[painted_value] = model_value
    for k, ds in enumerate(series.datasets):
        encoded = shown["painted"].get(str(ds.SOPInstanceUID))
        painted = (
            np.frombuffer(base64.b64decode(encoded), dtype=np.uint8).reshape(ds.Rows, ds.Columns)
            if encoded is not None
            else np.zeros((ds.Rows, ds.Columns), dtype=np.uint8)
        )
        wrong = int(np.count_nonzero(lookup[painted] != expected[k]))
        if wrong:
            problems.append(f"slice {k}: {wrong} pixels painted wrong")
    return problems


def _segs(folder: Path, work: Path) -> tuple[list[Path], LoadedSeries, npt.NDArray[np.uint8]]:
    """ct-tissue's SEGs in all four encodings for the series in ``folder``."""
    request = job_request(folder, "ct-tissue", work / "out",
                          outputs=OutputRequest(seg_variants=VARIANTS, sr_references=()))  # fmt: skip
    outcome = run_job(request)
    assert outcome.status == "ok", outcome.reason
    by_name = {f.name: Path(f.path) for f in outcome.files}
    series = load_series(sorted(folder.glob("*.dcm")))
    expected = get_segmentation_model("ct-tissue").predict(series.volume)
    return [by_name[v.file_name] for v in VARIANTS], series, expected


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_every_seg_is_shown_right_by_the_viewer(
    bundles: dict[str, Path], tmp_path: Path, geometry: str
) -> None:
    phantom = chest_phantom((12, 64, 64), (5.0, 4.0, 4.0))
    hu = phantom.hu.copy()
    if geometry == "axial head first":
        hu[:2] = -1000  # empty end slices: frames left out, yet the viewer must place the rest
    write_ct_series(hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm, **GEOMETRIES[geometry])
    segs, series, expected = _segs(tmp_path / "ct", tmp_path)
    assert len({int(v) for v in np.unique(expected)} - {0}) == 3  # every label is there
    sources = sorted((tmp_path / "ct").glob("*.dcm"))
    model = get_segmentation_model("ct-tissue")
    for version, bundle in bundles.items():
        shown = open_in_viewer(bundle, sources, segs, tmp_path)
        for seg, result in zip(segs, shown, strict=True):
            problems = viewer_problems(result, seg, series, expected, model)
            assert problems == [], f"cornerstone {version}, {seg.name}: {problems[:5]}"
            assert {s["label"] for s in result["segments"]} == {x.name for x in model.labels}


def test_negative_controls_fail_the_check(bundles: dict[str, Path], tmp_path: Path) -> None:
    """A SEG whose frames are flipped, and a label map that lists a "Background" item
    first (as highdicom writes it and pacsnode no longer sends), are shown wrong."""
    phantom = chest_phantom((12, 64, 64), (5.0, 4.0, 4.0))
    write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    segs, series, expected = _segs(tmp_path / "ct", tmp_path)
    binary, labelmap = segs[0], segs[2]

    flipped = dcmread(binary)
    frames = np.ascontiguousarray(flipped.pixel_array[:, ::-1, :])  # rows upside down
    flipped.PixelData = np.packbits(frames.reshape(-1), bitorder="little").tobytes()
    flipped.save_as(tmp_path / "flipped.dcm")

    shifted = dcmread(labelmap)
    background = hd.seg.SegmentDescription(
        segment_number=1, segment_label="Background",
        segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )  # fmt: skip
    background.SegmentNumber = 0
    shifted.SegmentSequence = [background, *shifted.SegmentSequence]
    shifted.save_as(tmp_path / "shifted.dcm")

    model = get_segmentation_model("ct-tissue")
    sources = sorted((tmp_path / "ct").glob("*.dcm"))
    pinned = open_in_viewer(bundles["5.6.8"], sources,
                            [tmp_path / "flipped.dcm", tmp_path / "shifted.dcm"], tmp_path)  # fmt: skip
    flipped_problems = viewer_problems(pinned[0], tmp_path / "flipped.dcm", series, expected, model)
    assert any("pixels painted wrong" in p for p in flipped_problems), flipped_problems
    shifted_problems = viewer_problems(pinned[1], tmp_path / "shifted.dcm", series, expected, model)
    assert "segment 1 is listed as 'Background'" in shifted_problems, shifted_problems
