"""Counting over a label map: voxels per label, per slice, and voxel sums per label.

Two ways, chosen by how many labels there are. For a few labels, one comparison per
label and slice (``plane == value``: its temporary stays in the CPU cache; comparing the
whole map at once allocates a map-sized temporary and is 3-4x slower). For many labels (a 100-structure model), that would be one pass per label,
so one ``bincount`` per slab or slice counts every label at once instead; its cost does
not grow with the number of labels. Both give the same numbers (tested).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

__all__ = ["FEW_LABELS", "label_counts", "label_sums", "slice_areas"]

#: Up to this many labels, one comparison per label; above, bincounts.
FEW_LABELS = 8
_SLAB_SLICES = 64


def _few(values: Sequence[int], few: bool | None) -> bool:
    return len(values) <= FEW_LABELS if few is None else few


def label_counts(
    label_map: npt.NDArray[np.integer], values: Sequence[int], *, few: bool | None = None
) -> dict[int, int]:
    """Voxels of each of ``values`` in ``label_map``.

    ``few`` forces the strategy (None: by the number of values).
    """
    if _few(values, few):
        areas = slice_areas(label_map, values, few=True)
        return {value: int(areas[value].sum()) for value in values}
    top = max(values, default=0) + 1
    counts = np.zeros(top, dtype=np.int64)
    for start in range(0, label_map.shape[0], _SLAB_SLICES):
        slab = label_map[start : start + _SLAB_SLICES].ravel()
        counts += np.bincount(slab[slab < top].astype(np.intp), minlength=top)
    return {value: int(counts[value]) for value in values}


def slice_areas(
    label_map: npt.NDArray[np.integer], values: Sequence[int], *, few: bool | None = None
) -> dict[int, npt.NDArray[np.int64]]:
    """For each of ``values``, its voxel count in each slice (axis 0)."""
    if _few(values, few):
        areas = {value: np.empty(label_map.shape[0], dtype=np.int64) for value in values}
        for k, plane in enumerate(label_map):
            for value in values:
                areas[value][k] = np.count_nonzero(plane == value)
        return areas
    top = max(values, default=0) + 1
    per_slice = np.zeros((label_map.shape[0], top), dtype=np.int64)
    for k in range(label_map.shape[0]):
        flat = label_map[k].ravel()
        per_slice[k] = np.bincount(flat[flat < top].astype(np.intp), minlength=top)
    return {value: per_slice[:, value] for value in values}


def label_sums(
    label_map: npt.NDArray[np.integer],
    voxels: npt.NDArray[np.floating],
    values: Sequence[int],
    *,
    few: bool | None = None,
) -> dict[int, tuple[int, float, float]]:
    """For each of ``values``: (voxel count, sum and sum of squares of ``voxels`` there),
    accumulated in float64, in slabs so the temporaries stay small."""
    result = dict.fromkeys(values, (0, 0.0, 0.0))
    top = max(values, default=0) + 1
    for start in range(0, label_map.shape[0], _SLAB_SLICES):
        labels = label_map[start : start + _SLAB_SLICES]
        slab = voxels[start : start + _SLAB_SLICES]
        if _few(values, few):
            for value in values:
                inside = slab[labels == value]
                n, s, q = result[value]
                # float64 accumulators over the float32 values, without a float64 copy
                result[value] = (
                    n + inside.size,
                    s + float(inside.sum(dtype=np.float64)),
                    q + float(np.einsum("i,i->", inside, inside, dtype=np.float64)),
                )
            continue
        flat = labels.ravel()
        keep = flat < top
        index = flat[keep].astype(np.intp)
        weights = slab.ravel()[keep].astype(np.float64)
        counts = np.bincount(index, minlength=top)
        sums = np.bincount(index, weights=weights, minlength=top)
        weights *= weights
        squares = np.bincount(index, weights=weights, minlength=top)
        for value in values:
            n, s, q = result[value]
            result[value] = (
                n + int(counts[value]),
                s + float(sums[value]),
                q + float(squares[value]),
            )
    return result
