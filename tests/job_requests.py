"""Job requests for series on disk, as the node would dispatch them, for calling the
pipeline directly in tests and benchmarks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom import dcmread

from workers.contract import JobRequest, Manifest

__all__ = ["job_request"]


def job_request(
    folder: Path, model: str, output_dir: Path, *, job_id: int = 1, **fields: Any
) -> JobRequest:
    """A request to run ``model`` on every ``*.dcm`` file in ``folder`` (one series),
    writing into ``output_dir``; ``fields`` sets other :class:`JobRequest` fields."""
    paths = sorted(folder.glob("*.dcm"))
    if not paths:
        raise FileNotFoundError(f"no *.dcm files in {folder}")
    series_uid = str(dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)
    return JobRequest(
        job_id=job_id,
        model=model,
        manifest=Manifest.of_files(series_uid, paths),
        output_dir=str(output_dir),
        **fields,
    )
