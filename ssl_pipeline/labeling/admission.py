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
