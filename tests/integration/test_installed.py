"""pacsnode installed from its wheel (not editable), with a models folder outside the
source tree: the packaged code and shipped files are enough to run a study through a
model that is only in that folder."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import yaml
from pydicom import dcmread

from models.network import BUNDLES_DIR
from node.state import JobStateValues
from tests.integration.conftest import CT_RULE, ct_node_config, make_phantom_series
from tests.node_process import NODE_AE_TITLE, NodeProcess
from tests.peers import StoreSCP, run_storescu

pytestmark = pytest.mark.integration

REPOSITORY = Path(__file__).resolve().parents[2]


def _installed_python(tmp_path: Path) -> Path:
    """A fresh virtual environment holding pacsnode from its wheel; its other packages
    come from this environment's site-packages by a .pth line (which does not run this
    environment's own .pth files, so the editable install of the source tree is not
    seen)."""
    source = tmp_path / "source"  # setuptools builds in place: not in the working tree
    shutil.copytree(
        REPOSITORY, source,
        ignore=shutil.ignore_patterns(".git", ".venv", "*.egg-info", "build", "__pycache__",
                                      ".mypy_cache", ".ruff_cache", ".pytest_cache", "data"),
    )  # fmt: skip
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "-w", str(wheels), str(source)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    (wheel,) = wheels.glob("pacsnode-*.whl")
    env = tmp_path / "env"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(env)], check=True, timeout=120
    )
    python = env / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--quiet",
         "--no-deps", str(wheel)],
        check=True, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.strip()  # fmt: skip
    Path(site, "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python


def test_installed_wheel_runs_a_model_from_an_outside_folder(
    tmp_path: Path, destination: StoreSCP
) -> None:
    python = _installed_python(tmp_path)
    probe = "import node, models.network as n; print(node.__file__); print(n.BUNDLES_DIR)"
    where = subprocess.run(
        [str(python), "-P", "-c", probe],
        check=True, capture_output=True, text=True, timeout=60,
    ).stdout.split()  # fmt: skip
    assert not where[0].startswith(str(REPOSITORY)), where  # the wheel's copy, not the tree
    assert Path(where[1], "ct-bone-demo", "models", "model.pt").is_file()  # shipped files

    outside = tmp_path / "hospital-models"
    shutil.copytree(
        BUNDLES_DIR / "ct-bone-demo",
        outside / "site-bone",
        ignore=shutil.ignore_patterns("scripts"),
    )
    config = ct_node_config(tmp_path / "data", destination, models_dir=str(outside))
    config["rules"] = [{**CT_RULE, "models": ["site-bone"]}]
    node = NodeProcess(tmp_path / "node", config, executable=python.parent / "pacsnode")
    with node:
        series = make_phantom_series(tmp_path / "ct", "INSTALLED")
        sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", series)
        assert sent.returncode == 0, sent.stderr
        (job,) = node.wait_for_jobs(1, {JobStateValues.DELIVERED, JobStateValues.FAILED})
        assert (job.model, job.state, job.reason) == ("site-bone", JobStateValues.DELIVERED, None)
    seg = next(dcmread(p) for p in destination.wait_for_files(2) if dcmread(p).Modality == "SEG")
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "site-bone"
    assert yaml.safe_load(node.config_path.read_text())["models_dir"] == str(outside)
