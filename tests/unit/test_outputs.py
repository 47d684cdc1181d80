"""Per-destination output profiles: which files a job writes and who receives which."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from pydicom import Dataset, dcmread

from models import registry
from models.base import Code, LabelSpec, SegmentationModel, Volume
from node.config import Config
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.job_requests import job_request
from tests.peers import dciodvfy_errors
from tests.sr_reading import read_absent
from workers.outputs import DEFAULT_SEG, OutputProfile, OutputRequest, SegVariant
from workers.pipeline import run_job

MODERN = OutputProfile(seg="labelmap")
OLD = OutputProfile(seg="none", overlays=True)
EVERYTHING = OutputProfile(seg="binary", omit_empty_frames=False, send_empty_seg=True)
ANATOMY = Code("123037004", "SCT", "Anatomical Structure")


def test_a_job_writes_the_union_of_its_destinations_profiles() -> None:
    request = OutputRequest.for_profiles([MODERN, OLD, EVERYTHING, MODERN], notice="DEMO")
    labelmap = SegVariant(seg_type="labelmap", omit_empty_frames=True)
    all_frames = SegVariant(seg_type="binary", omit_empty_frames=False)
    assert request.seg_variants == (labelmap, all_frames)
    # One SR per SEG sent, and the default SEG's for the destination without SEG.
    assert request.sr_references == (labelmap, DEFAULT_SEG, all_frames)
    assert request.overlays
    assert request.describe("ct-tissue", "SEG") == "ct-tissue SEG - DEMO"


WRITTEN = [
    "seg-binary.dcm",
    "seg-binary-all-frames.dcm",
    "seg-labelmap.dcm",
    "sr.dcm",
    "sr-binary-all-frames.dcm",
    "sr-labelmap.dcm",
    "overlay-001.dcm",
]


@pytest.mark.parametrize(
    ("profile", "written", "empty", "expected"),
    [
        (MODERN, WRITTEN, False, {"seg-labelmap.dcm", "sr-labelmap.dcm"}),
        (MODERN, WRITTEN, True, {"sr-labelmap.dcm"}),  # nothing found: no SEG unless asked
        (OLD, WRITTEN, False, {"sr.dcm", "overlay-001.dcm"}),
        (EVERYTHING, WRITTEN, True, {"seg-binary-all-frames.dcm", "sr-binary-all-frames.dcm"}),
        (OutputProfile(sr=False), WRITTEN, False, {"seg-binary.dcm"}),
        (MODERN, ["sr.dcm"], False, {"sr.dcm"}),  # a classification: one SR for all
    ],
)
def test_each_destination_receives_what_its_profile_says(
    profile: OutputProfile, written: list[str], empty: bool, expected: set[str]
) -> None:
    assert set(profile.select(written, empty_result=empty)) == expected


def test_config_destinations_carry_profiles() -> None:
    config = Config.model_validate(
        {
            "destinations": {
                "viewer": {"ae_title": "V", "host": "127.0.0.1", "port": 104, "seg": "labelmap"},
                "old": {
                    "ae_title": "O",
                    "host": "127.0.0.1",
                    "port": 105,
                    "seg": "none",
                    "overlays": True,
                },
            },
            "results": {"notice": "", "series_description": "AI {kind} ({model})"},
        }
    )
    assert config.destinations["viewer"].seg_variant == MODERN.seg_variant
    assert config.destinations["viewer"].profile == MODERN
    assert (config.destinations["old"].seg, config.destinations["old"].sr) == ("none", True)
    with pytest.raises(ValueError, match=r"series_description may use only \{model\} and \{kind\}"):
        Config.model_validate({"results": {"series_description": "{modality}"}})


class NothingFound(SegmentationModel):
    """Declares two labels and never finds them."""

    name = "nothing-found"
    version = "1.0"
    labels = (
        LabelSpec(1, "Liver", ANATOMY, Code("10200004", "SCT", "Liver")),
        LabelSpec(2, "Spleen", ANATOMY, Code("78961009", "SCT", "Spleen")),
    )

    def predict(self, volume: Volume) -> npt.NDArray[np.uint8]:
        return np.zeros(volume.voxels.shape, dtype=np.uint8)


def test_empty_result_is_delivered_as_absent_findings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model finds nothing: the job succeeds; the SR says each label is absent and
    the SEGs (for destinations that want them) hold empty segments."""
    registry.available_models()  # built-ins register on first import: not into the copy
    monkeypatch.setattr(registry, "_MODEL_CLASSES", dict(registry._MODEL_CLASSES))
    monkeypatch.setattr(registry, "_INSTANCES", dict(registry._INSTANCES))
    registry.register_model(NothingFound)
    phantom = chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    request = OutputRequest.for_profiles([MODERN, EVERYTHING], notice="")
    result = run_job(
        job_request(tmp_path / "ct", "nothing-found", tmp_path / "out", outputs=request)
    )
    assert result.status == "ok", result
    assert result.empty is True
    names = sorted(f.name for f in result.files)
    assert names == [
        "seg-binary-all-frames.dcm",
        "seg-labelmap.dcm",
        "sr-binary-all-frames.dcm",
        "sr-labelmap.dcm",
    ]
    sr = dcmread(tmp_path / "out" / "sr-binary-all-frames.dcm")
    assert read_absent(sr) == {"Liver", "Spleen"}
    assert sr.SeriesDescription == "nothing-found SR"
    seg = dcmread(tmp_path / "out" / "seg-binary-all-frames.dcm")
    assert int(seg.NumberOfFrames) == 2 * 8
    for written in result.files:
        if "labelmap" not in written.name:  # the label-map pair: dciodvfy predates its IOD
            assert dciodvfy_errors(written.path) == [], written


def test_the_request_carries_each_destinations_profile_through_json() -> None:
    """The worker echoes the request; the node delivers by it even if config.yaml changed."""
    request = OutputRequest.for_destinations({"viewer": MODERN, "old": OLD}, notice="X")
    echoed = OutputRequest.model_validate(json.loads(json.dumps(request.model_dump(mode="json"))))
    assert echoed == request
    assert echoed.destinations["viewer"].select(WRITTEN, empty_result=False) == [
        "seg-labelmap.dcm",
        "sr-labelmap.dcm",
    ]
    assert OutputRequest.for_destinations({}).seg_variants == (DEFAULT_SEG,)


def test_a_misplaced_seg_leaves_nothing_to_send(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The second SEG fails the placement check: the job fails and every file it wrote
    (the first SEG and its SR included) is gone."""
    from workers import pipeline
    from workers.seg_check import SegPlacementError

    def fail_labelmap(seg: Dataset, series: object) -> None:
        if seg.SegmentationType == "LABELMAP":
            raise SegPlacementError("frame 3 is 1.000 mm from its source slice")

    monkeypatch.setattr(pipeline, "check_seg_placement", fail_labelmap)
    phantom = chest_phantom(shape=(8, 64, 64), spacing_mm=(5.0, 3.0, 3.0))
    write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    outputs = OutputRequest.for_profiles([OutputProfile(), MODERN])
    result = run_job(job_request(tmp_path / "ct", "ct-tissue", tmp_path / "out", outputs=outputs))
    assert result.status == "failed"
    assert "seg-labelmap.dcm: frame 3 is 1.000 mm" in str(result.reason)
    assert list((tmp_path / "out").iterdir()) == []
