"""HDL's admission to the next tier's pool (rule 4 of :mod:`ssl_pipeline.labeling.hdl`): within every group,
the top fraction of its unlabeled rows by score. Groups are the predicted classes, or, for
``admission="seed"``, each predicted class within the basin of its nearest labeled row of that class, so a
class's pool covers each of its labeled modes, not only its best-covered one."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ssl_pipeline.labeling.knn import as_unit_float32, exact_search
from ssl_pipeline.labeling.linear import _rank_within_class


def _nearest_labeled(X: NDArray, lab_rows: NDArray[np.int64], unl_rows: NDArray[np.int64], k: int = 10
                     ) -> NDArray[np.int64]:
    """Positions in ``lab_rows`` of the ``k`` labeled rows nearest to each unlabeled row: (len(unl_rows), k).

    One exact search of all rows (read in batches, float16 memory maps included) against the labeled rows.
    """
    _, nn = exact_search(as_unit_float32(X[lab_rows]), X, min(k, len(lab_rows)))
    return nn[unl_rows]


def _seed_groups(cls: NDArray[np.int64], lab_pos: NDArray[np.int64], seed_nn: NDArray[np.int64]
                 ) -> NDArray[np.int64]:
    """Admission group of each unlabeled row: its nearest labeled row of its predicted class ``cls`` (a
    position in the labeled rows), or ``n_labeled + cls`` when none of its ``seed_nn`` has that class."""
    hit = lab_pos[seed_nn] == cls[:, None]
    first = seed_nn[np.arange(len(cls)), hit.argmax(axis=1)]
    return np.where(hit.any(axis=1), first, len(lab_pos) + cls)


def admitted(cls: NDArray[np.int64], score: NDArray, rows: NDArray[np.int64], fraction: float,
             lab_pos: NDArray[np.int64] | None = None, seed_nn: NDArray[np.int64] | None = None
             ) -> NDArray[np.int64]:
    """The rows of ``rows`` (M,) admitted to the pool: in every group, the top ``ceil(fraction * size)`` by
    ``score`` (M,). Groups: the predicted class ``cls`` (M,), or, given ``seed_nn`` (M, k) (positions in the
    labeled rows, whose classes are ``lab_pos``), the class within the basin of its nearest labeled row."""
    groups = cls if seed_nn is None else _seed_groups(cls, lab_pos, seed_nn)
    rank = _rank_within_class(groups, score)
    quota = np.ceil(np.bincount(groups) * fraction).astype(np.int64)
    return rows[rank < quota[groups]]


def basin_seed_weights(X: NDArray, pool_rows: NDArray[np.int64], pool_pos: NDArray[np.int64], pool_w: NDArray,
                       n_lab: int, n_classes: int, batch: int = 65536) -> NDArray[np.float32]:
    """Seed weights (P,) of the propagation's pool: every labeled row's *basin* the same mass.

    ``pool_rows`` (P,) start with the ``n_lab`` labeled rows (classes ``pool_pos[:n_lab]``); every other pool
    row joins the basin of the labeled row of its class ``pool_pos`` nearest to it (cosine), and each basin gets
    the mass ``1 / n_c`` (``n_c``: labeled rows of class ``c``), shared in proportion to ``pool_w`` (P,). With
    only labeled rows in the pool this is the first tier's ``1 / n_c`` per labeled row: every labeled mode of a
    class keeps its first-tier share of the class's seed mass in every tier, instead of the share of the pool
    its region happened to win (a mode the confident rows of another mode outnumber fades tier by tier).
    """
    lab_pos = pool_pos[:n_lab]
    basin = np.arange(len(pool_rows))
    extra = np.arange(n_lab, len(pool_rows))
    L = as_unit_float32(X[pool_rows[:n_lab]])
    by_class = np.argsort(lab_pos, kind="stable")
    starts = np.searchsorted(lab_pos[by_class], np.arange(n_classes + 1))
    ext_cls = pool_pos[extra]
    order = np.argsort(ext_cls, kind="stable")
    ext_starts = np.searchsorted(ext_cls[order], np.arange(n_classes + 1))
    for c in range(n_classes):
        mine = by_class[starts[c]:starts[c + 1]]
        rows = extra[order[ext_starts[c]:ext_starts[c + 1]]]
        if len(rows) == 0:
            continue
        if len(mine) == 1:
            basin[rows] = mine[0]
            continue
        for s in range(0, len(rows), batch):
            r = rows[s:s + batch]
            basin[r] = mine[np.argmax(as_unit_float32(X[pool_rows[r]]) @ L[mine].T, axis=1)]
    counts = np.bincount(lab_pos, minlength=n_classes).astype(np.float64)
    w = np.asarray(pool_w, np.float64)
    mass = np.bincount(basin, weights=w, minlength=n_lab)
    return (w / np.maximum(mass[basin], 1e-30) / counts[lab_pos[basin]]).astype(np.float32)
