"""A models folder outside the code: discovered once, listed, validated, reloaded, and
named in every result by the exact weights."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom import Dataset, dcmread

from models import registry
from models.network import BUNDLES_DIR
from node.config import ConfigError, bundle_build_problems, folder_problems, load_config
from tests import model_zoo as zoo
from tests.dicom_factory import chest_phantom, write_ct_series
from tests.job_requests import job_request
from workers.pipeline import run_job
from workers.render import read_seg
from workers.series import load_series

PACSNODE = Path(sys.executable).parent / "pacsnode"


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Each test points the registry at its own folder; the others see the defaults."""
    registry.available_models()  # built-ins register into the real registry first
    state = registry.checkpoint()
    yield
    registry.rollback(state)


def _config(tmp_path: Path, **data: Any) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"models_dir": "site-models", **data}))
    (tmp_path / "site-models").mkdir(exist_ok=True)
    return path


def _copy(name: str, target: Path) -> Path:
    shutil.copytree(BUNDLES_DIR / name, target, ignore=shutil.ignore_patterns("scripts"))
    return target


def test_a_folder_copied_into_models_dir_runs_by_name_with_its_weights_named(
    tmp_path: Path,
) -> None:
    config_path = _config(tmp_path, rules=[{"name": "bone", "models": ["site-bone"]}])
    folder = _copy("ct-bone-demo", tmp_path / "site-models" / "site-bone")
    config = load_config(config_path)
    assert config.models_dir == (tmp_path / "site-models").resolve()
    cls = registry.get_model_class("site-bone")
    weights = folder / "models" / "model.pt"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert cls.weights_sha256() == digest
    assert cls.algorithm_version() == f"0.1.0 sha256:{digest[:12]}"
    (entry,) = [e for e in registry.model_entries() if e.cls.name == "site-bone"]
    assert (entry.source, entry.problem) == (str(folder.resolve()), None)

    phantom = chest_phantom((8, 64, 64), (5.0, 3.0, 3.0))
    write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    outcome = run_job(job_request(tmp_path / "ct", "site-bone", tmp_path / "out"))
    assert outcome.status == "ok", outcome.reason
    seg = dcmread(next(f.path for f in outcome.files if f.name == "seg-binary.dcm"))
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == (
        "site-bone",
        f"0.1.0 sha256:{digest[:12]}",
    )
    sr = dcmread(next(f.path for f in outcome.files if f.name == "sr.dcm"))
    assert f"0.1.0 sha256:{digest[:12]}" in _text_values(sr)


def _text_values(ds: Dataset) -> set[str]:
    """Every TextValue in an SR content tree."""
    found = {str(ds.TextValue)} if "TextValue" in ds else set()
    for item in ds.get("ContentSequence", []):
        found |= _text_values(item)
    return found


def test_folders_are_read_once_and_again_on_reload(tmp_path: Path) -> None:
    load_config(_config(tmp_path))
    assert "late-bone" not in registry.available_models()
    _copy("ct-bone-demo", tmp_path / "site-models" / "late-bone")
    assert "late-bone" not in registry.available_models()  # no listing per lookup
    assert "late-bone" in registry.reload_models()
    shutil.rmtree(tmp_path / "site-models" / "late-bone")
    assert "late-bone" not in registry.reload_models()


def test_broken_folders_and_taken_names_fail_check_config_by_file_and_field(
    tmp_path: Path,
) -> None:
    """check-config fails on them; the node itself only warns, so the other models run."""
    config_path = _config(tmp_path, rules=[{"name": "r", "models": ["ct-tissue"]}])
    broken = _copy("xr-nodule-demo", tmp_path / "site-models" / "broken-xr")
    spec = broken / "pacsnode.yaml"
    spec.write_text(spec.read_text().replace("threshold: 0.5", "threshold: 7"))
    _copy("xr-nodule-demo", tmp_path / "site-models" / "ct-tissue")  # a built-in's name
    config = load_config(config_path)  # the rules' models are fine
    errors = folder_problems(config)
    assert len(errors) == 2, errors
    assert errors[0].startswith(f"models_dir: model 'broken-xr': {spec.resolve()}: threshold")
    taken = (tmp_path / "site-models" / "ct-tissue").resolve()
    assert errors[1] == f"models_dir: {taken}: the name 'ct-tissue' is taken by a built-in model"

    check = subprocess.run(
        [str(PACSNODE), "check-config", str(config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert check.returncode == 2
    listed = [line.strip() for line in check.stderr.splitlines() if line.startswith("  ")]
    assert listed == errors
    listing = subprocess.run(
        [str(PACSNODE), "models", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert listing.returncode == 1  # listed, with its problems
    assert f"problem: {errors[1].removeprefix('models_dir: ')}" in listing.stdout.splitlines()

    # A rule naming the broken model: the configuration itself is refused.
    rules = yaml.safe_dump(
        {"models_dir": "site-models", "rules": [{"name": "r", "models": ["broken-xr"]}]}
    )
    config_path.write_text(rules)
    with pytest.raises(ConfigError, match=r"rules\[0\]\.models: model 'broken-xr' cannot run here"):
        load_config(config_path)


def test_pacsnode_models_lists_every_model(tmp_path: Path) -> None:
    config_path = _config(tmp_path)
    folder = _copy("xr-nodule-demo", tmp_path / "site-models" / "site-xr")
    digest = hashlib.sha256((folder / "model.ts").read_bytes()).hexdigest()
    listing = subprocess.run(
        [str(PACSNODE), "models", "--config", str(config_path)],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout.splitlines()  # fmt: skip
    assert listing[0] == f"models folder: {(tmp_path / 'site-models').resolve()}"
    assert listing[1].split() == [
        "NAME", "VERSION", "FORMAT", "TASK", "QUEUE", "INPUT", "WEIGHTS", "SHA-256", "FROM",
    ]  # fmt: skip
    rows = {line.split()[0]: line.split() for line in listing[2:]}
    assert rows["site-xr"] == [
        "site-xr", "0.1.0", "torchscript", "classification", "cpu", "CR/DX", "(image)",
        digest[:12], str(folder.resolve()),
    ]  # fmt: skip
    assert rows["ct-tissue"][:5] == ["ct-tissue", "1.0.0", "python", "segmentation", "cpu"]
    assert rows["ct-tissue"][-4:] == ["-", "built", "in", "(models.ct_tissue)"]
    assert set(rows) == {"ct-tissue", "mr-brain-mask", "ct-bone-demo", "xr-nodule-demo", "site-xr"}


def test_check_config_builds_each_bundles_own_chain(tmp_path: Path) -> None:
    """A transform MONAI cannot make (a typo in ``_target_``) fails check-config by name,
    before a worker would fail every job of that model."""
    config_path = _config(tmp_path)
    for name in ("pediatric", "pediatric-typo"):
        folder = zoo.make_bundle(
            "pediatric_abdominal_ct_segmentation",
            tmp_path / "site-models" / name,
            zoo.small_network(3, 1, 4),
            spec=zoo.segmentation_spec(4),
        )
        zoo.save_seeded(folder)
    inference_path = tmp_path / "site-models" / "pediatric-typo" / "configs" / "inference.json"
    inference = json.loads(inference_path.read_text())
    inference["preprocessing"]["transforms"][5]["_target_"] = "CropForegroundz"
    inference_path.write_text(json.dumps(inference))
    config = load_config(config_path)
    assert folder_problems(config) == []  # what can be seen without MONAI is fine
    problems = bundle_build_problems(config)
    assert len(problems) == 1, problems
    assert problems[0].startswith("models_dir: model 'pediatric-typo': ")
    assert "CropForegroundz" in problems[0]
    check = subprocess.run(
        [str(PACSNODE), "check-config", str(config_path)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert check.returncode == 2
    assert "CropForegroundz" in check.stderr

    # The sound one runs as a worker runs it: its SEG holds the chain's labels.
    phantom = chest_phantom((16, 64, 64), (5.0, 3.0, 3.0))
    write_ct_series(phantom.hu, tmp_path / "ct", spacing_mm=phantom.spacing_mm)
    outcome = run_job(job_request(tmp_path / "ct", "pediatric", tmp_path / "out"))
    assert outcome.status == "ok", outcome.reason
    model = registry.get_segmentation_model("pediatric")
    series = load_series(sorted((tmp_path / "ct").glob("*.dcm")))
    expected = model.predict(series.volume)
    seg_path = next(f.path for f in outcome.files if f.name == "seg-binary.dcm")
    written, segments = read_seg(Path(seg_path), series)
    value_of = {spec.name: spec.value for spec in model.labels}
    assert {info.label.name for info in segments} <= set(value_of)
    for info in segments:
        assert ((written == info.segment_number) == (expected == value_of[info.label.name])).all()
    assert sum(int((written == i.segment_number).sum()) for i in segments) == int(
        (expected > 0).sum()
    )


def test_a_python_model_folder_registers_its_classes_and_a_broken_one_is_named(
    tmp_path: Path,
) -> None:
    from tests.standin import STANDIN_MODEL, install_standin

    config_path = _config(tmp_path, rules=[{"name": "fast", "models": [STANDIN_MODEL]}])
    folder = install_standin(tmp_path / "site-models", 0.0)
    config = load_config(config_path)
    cls = registry.get_model_class(STANDIN_MODEL)
    assert cls.__module__ == f"pacsnode_models.{STANDIN_MODEL}"
    entry = next(e for e in registry.model_entries() if e.cls is cls)
    assert entry.source == str((folder / "model.py").resolve())
    first = registry.model_fingerprints()[STANDIN_MODEL]

    # A changed file is a changed model (SIGHUP restarts the worker); a broken file is
    # refused by name, and the models of the other files stay.
    (folder / "model.py").write_text((folder / "model.py").read_text() + "\n# changed\n")
    broken = tmp_path / "site-models" / "broken" / "model.py"
    broken.parent.mkdir()
    broken.write_text("from models.base import Nothing\n")
    registry.reload_models()
    assert registry.model_fingerprints()[STANDIN_MODEL] != first
    problems = folder_problems(config)
    assert problems == [
        f"models_dir: {broken.resolve()}: cannot be imported: ImportError: cannot import name "
        "'Nothing' from 'models.base' (" + str(Path(registry.__file__).parent / "base.py") + ")"
    ]

    # A later file (folders are read in name order) registering a name already taken is
    # refused, not silently swapped in.
    clash = tmp_path / "site-models" / "twin" / "model.py"
    clash.parent.mkdir()
    clash.write_text((folder / "model.py").read_text())
    broken.unlink()
    registry.reload_models()
    (problem,) = folder_problems(config)
    assert problem.startswith(f"models_dir: {clash.resolve()}: cannot be imported: ValueError")
    assert f"model name {STANDIN_MODEL!r} is already registered" in problem
    assert registry.get_model_class(STANDIN_MODEL).__module__ == f"pacsnode_models.{STANDIN_MODEL}"
