"""Overlay key images (Secondary Capture) and ``pacsnode render``'s PNG files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from scipy import ndimage

from models.base import LabelSpec
from models.registry import get_segmentation_model
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.job_requests import job_request
from tests.peers import dciodvfy_errors
from workers.contract import JobOutcome
from workers.outputs import OutputProfile, OutputRequest
from workers.overlays import key_images
from workers.pipeline import run_job
from workers.render import RenderError, render_job
from workers.seg import SegmentInfo
from workers.series import load_series

SPACING = (5.0, 1.5, 1.5)


def _segment(spec: LabelSpec) -> SegmentInfo:
    return SegmentInfo(spec.value, spec, "")


@pytest.fixture(scope="module")
def job(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, JobOutcome]:
    """ct-tissue on the phantom with overlays and a LABELMAP SEG requested."""
    folder = tmp_path_factory.mktemp("overlay")
    phantom = chest_phantom(shape=(8, 160, 160), spacing_mm=SPACING)
    # Make one slice's bone bigger, so the key slice is a known one.
    hu = phantom.hu.copy()
    hu[5, 100:140, 60:100] = 700
    write_ct_series(hu, folder / "ct", spacing_mm=SPACING)
    request = OutputRequest.for_profiles(
        [OutputProfile(seg="labelmap", overlays=True)], notice="DEMO ONLY"
    )
    result = run_job(
        job_request(folder / "ct", "ct-tissue", folder / "out", job_id=7, outputs=request)
    )
    assert result.status == "ok", result
    return folder / "ct", folder / "out", result


def test_one_valid_overlay_per_segment_on_its_largest_slice(
    job: tuple[Path, Path, JobOutcome],
) -> None:
    series_dir, out, _ = job
    series = load_series(sorted(series_dir.glob("*.dcm")))
    model = get_segmentation_model("ct-tissue")
    labels = model.predict(series.volume)
    overlays = sorted(out.glob("overlay-*.dcm"))
    assert len(overlays) == 3  # soft tissue, lung, bone
    for path, spec in zip(overlays, model.labels, strict=True):
        assert dciodvfy_errors(path) == [], path
        sc = dcmread(path)
        mask = labels == spec.value
        k = int(np.argmax(mask.reshape(mask.shape[0], -1).sum(axis=1)))
        assert (
            sc.SourceImageSequence[0].ReferencedSOPInstanceUID == series.datasets[k].SOPInstanceUID
        )
        assert sc.StudyInstanceUID == series.datasets[k].StudyInstanceUID
        assert sc.PatientID == series.datasets[k].PatientID
        assert (sc.SeriesNumber, sc.ImageComments) == (903, "DEMO ONLY")
        assert sc.SeriesDescription == "ct-tissue Overlay - DEMO ONLY"
        assert list(sc.PatientOrientation) == ["L", "P"]
        pixels = sc.pixel_array
        assert pixels.shape == (*mask.shape[1:], 3)
        # The outline is drawn in the segment's colour on the mask's boundary outside the
        # legend box (top left): every boundary pixel there, and no pixel outside the mask.
        (key,) = key_images(series, labels, [_segment(spec)], notice="DEMO ONLY")
        outside_legend = np.ones(mask.shape[1:], dtype=bool)
        outside_legend[: key.legend_size[0]] = False  # its width depends on the volume text
        boundary = mask[k] & ~ndimage.binary_erosion(mask[k], border_value=0)
        coloured = np.all(pixels == spec.color_rgb, axis=2)
        assert boundary[outside_legend].any()
        assert coloured[boundary & outside_legend].all()
        assert not (coloured & ~mask[k] & outside_legend).any()
    bone = dcmread(overlays[2])
    assert bone.SourceImageSequence[0].ReferencedSOPInstanceUID == series.datasets[5].SOPInstanceUID


def test_render_writes_the_same_pictures_from_the_seg(
    job: tuple[Path, Path, JobOutcome], tmp_path: Path
) -> None:
    """render reads the label map back from the LABELMAP SEG and draws what was sent."""
    series_dir, out, _ = job
    pngs = render_job(sorted(series_dir.glob("*.dcm")), out, tmp_path / "png", notice="DEMO ONLY")
    assert [p.name.split("-slice")[0] for p in pngs] == ["001-soft-tissue", "002-lung", "003-bone"]
    for png, overlay in zip(pngs, sorted(out.glob("overlay-*.dcm")), strict=True):
        np.testing.assert_array_equal(np.asarray(Image.open(png)), dcmread(overlay).pixel_array)


def test_render_explains_a_job_without_images(tmp_path: Path) -> None:
    (tmp_path / "results").mkdir()
    with pytest.raises(RenderError, match="holds no SEG and no overlay images"):
        render_job([], tmp_path / "results", tmp_path / "png")
