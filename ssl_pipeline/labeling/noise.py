"""HDL's neighbourhood checks of the final labels (rule 7 of :mod:`ssl_pipeline.labeling.hdl`): agreement and
noise flags."""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ssl_pipeline.labeling.knn import KNNGraph


def neighbourhood_checks(g: KNNGraph, k: int, classes: NDArray, labels: NDArray
                         ) -> tuple[NDArray[np.float32], NDArray[np.bool_], float]:
    """(agreement (N,) float32, noise (N,) bool, share of rows whose ``k`` neighbours all carry their label)
    for ``labels`` (N,) (values of ``classes``) on the first ``k`` neighbours of the graph ``g``.

    ``agreement`` = similarity-weighted share of a row's neighbours carrying its label; ``noise`` flags rows
    whose weighted neighbourhood majority is another class and whose agreement is below one half.
    """
    idx = g.idx[:, :k]
    valid = idx >= 0
    w = np.where(valid, np.maximum(np.nan_to_num(g.sim[:, :k], neginf=0.0), 0.0), 0.0)
    w = np.where(valid & (w <= 0), 1e-6, w)
    pos = np.searchsorted(classes, labels)
    nb = np.where(valid, pos[np.where(valid, idx, 0)], -1)
    same = nb == pos[:, None]
    tot = w.sum(axis=1)
    agreement = np.where(tot > 0, (w * same).sum(axis=1) / np.maximum(tot, 1e-30), 0.0).astype(np.float32)
    # weighted majority of the neighbours' labels: each neighbour's class scored by the weight of the
    # neighbours sharing it (O(N k^2), no N x C array); ties go to the class of the nearest neighbour
    wv = np.where(valid, w, 0.0).astype(np.float32)
    score = np.zeros(nb.shape, np.float32)
    for j in range(nb.shape[1]):
        score += wv[:, j:j + 1] * (nb == nb[:, j:j + 1])
    score[~valid] = -1.0
    majority = nb[np.arange(len(pos)), np.argmax(score, axis=1)]
    noise = (tot > 0) & (majority != pos) & (agreement < 0.5)
    return agreement, noise, float(np.mean((same | ~valid).all(axis=1)))
