"""``standin``: a model that takes a set time, standing for a network on a GPU.

A demonstration and benchmark aid, not a clinical model (``model.py`` here): it labels voxels
by ct-tissue's HU thresholds alone (no connected components) and waits out the rest of
the seconds written in ``seconds.txt`` beside it, so the results are real SEGs and SRs
and the model stage takes a set time at little CPU cost. :func:`install_standin` puts it into a models folder, where the
registry finds it like any model folder; it shows what the pipeline around a fast
network costs (``benchmarks/e2e.py``, ``benchmarks/throughput.py``).
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["STANDIN_MODEL", "install_standin"]

STANDIN_MODEL = "standin"


def install_standin(models_dir: Path, seconds: float) -> Path:
    """Put the stand-in into ``models_dir`` as ``standin/model.py``, taking ``seconds``
    per study; returns its folder."""
    folder = models_dir / STANDIN_MODEL
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(__file__).with_name("model.py"), folder / "model.py")
    (folder / "seconds.txt").write_text(f"{seconds}\n")
    return folder
