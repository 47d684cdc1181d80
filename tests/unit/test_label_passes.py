"""Both ways of counting over a label map give the same numbers."""

from __future__ import annotations

import numpy as np
import pytest

from workers.label_passes import FEW_LABELS, label_counts, label_sums, slice_areas

SHAPE = (70, 24, 20)  # more slices than one slab, so slabs are added up


@pytest.fixture(scope="module")
def label_map() -> np.ndarray:
    """Labels 0..19 (19 absent), plus 200, a value nobody asks about."""
    labels = np.random.default_rng(5).integers(0, 19, SHAPE).astype(np.uint8)
    labels[3, :4, :4] = 200
    return labels


@pytest.mark.parametrize("values", [[1, 2, 5], list(range(1, 20))])
def test_strategies_agree(label_map: np.ndarray, values: list[int]) -> None:
    voxels = np.random.default_rng(6).normal(40, 300, SHAPE).astype(np.float32)
    assert (len(values) <= FEW_LABELS) == (len(values) == 3)
    counts = {v: int((label_map == v).sum()) for v in values}
    assert label_counts(label_map, values, few=True) == counts
    assert label_counts(label_map, values, few=False) == counts
    if 19 in values:
        assert counts[19] == 0  # an absent label is counted as 0, not left out
    for few in (True, False):
        areas = slice_areas(label_map, values, few=few)
        sums = label_sums(label_map, voxels, values, few=few)
        for v in values:
            np.testing.assert_array_equal(areas[v], (label_map == v).sum(axis=(1, 2)))
            inside = voxels[label_map == v].astype(np.float64)
            n, total, squares = sums[v]
            assert n == inside.size
            assert total == pytest.approx(inside.sum(), rel=1e-9, abs=1e-6)
            assert squares == pytest.approx(float(inside @ inside), rel=1e-9)
