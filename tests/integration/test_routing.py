"""Routing decisions recorded with reasons: a series no rule matches, a model that
does not take the series it was routed."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest

from node.state import JobStateValues
from tests.dicom_factory import write_ct_series
from tests.node_process import NODE_AE_TITLE, NodeProcess, node_config
from tests.peers import run_storescu, wait_for

pytestmark = pytest.mark.integration


def test_ignored_and_skipped_series_are_recorded_with_reasons(tmp_path: Path) -> None:
    rules = [
        {"name": "anything-axial", "match": {"ImageType": {"contains": "AXIAL"}}, "models": ["ct-tissue"]},
    ]  # fmt: skip
    config = node_config(tmp_path / "data", port=0, rules=rules)
    del config["node"]["port"]
    volume = np.full((6, 16, 16), 40, dtype=np.int16)
    mr = write_ct_series(volume, tmp_path / "mr", spacing_mm=(3, 1, 1), modality="MR")
    localizer = write_ct_series(
        volume,
        tmp_path / "loc",
        spacing_mm=(3, 1, 1),
        image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"),
    )
    with NodeProcess(tmp_path, config) as node:
        for folder in (mr[0].parent, localizer[0].parent):
            sent = run_storescu("127.0.0.1", node.port, NODE_AE_TITLE, "SCANNER", folder)
            assert sent.returncode == 0, sent.stderr
        (job,) = node.wait_for_jobs(1, {JobStateValues.SKIPPED})
        assert job.reason == "modality MR, the model takes CT"

        def ignored() -> list[tuple[str, str]] | None:
            with sqlite3.connect(node.data_dir / "state.db") as conn:
                rows = conn.execute(
                    "SELECT state, reason FROM series WHERE state = 'ignored'"
                ).fetchall()
            return rows or None

        assert wait_for(ignored, 30, "the localizer series to be ignored") == [
            ("ignored", "no rule matches")
        ]
        assert len(node.jobs()) == 1
