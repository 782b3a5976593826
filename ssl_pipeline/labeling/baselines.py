"""Baseline pseudo-labelers: kNN vote, nearest class mean, sklearn LabelSpreading.

Each is a scikit-learn-style estimator (see :mod:`ssl_pipeline.labeling.base`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ssl_pipeline.labeling.base import BaseLabeler, check_labels
from ssl_pipeline.labeling.knn import KNNGraph, nearest
from ssl_pipeline.labeling.propagation import _neighbour_graph


def _softmax(S: NDArray, T: float) -> NDArray:
    S = S / T
    S = S - S.max(axis=1, keepdims=True)
    P = np.exp(S)
    return P / P.sum(axis=1, keepdims=True)


class KNNVote(BaseLabeler):
    """Each unlabeled point takes the similarity-weighted vote of its ``k`` nearest labeled points.

    Parameters
    ----------
    k : int
        Number of labeled neighbours that vote.
    weighted : bool
        Weight votes by cosine similarity (else one vote each).
    """

    def __init__(self, k: int = 10, weighted: bool = True):
        self.k = k
        self.weighted = weighted

    def fit(self, X: NDArray, y: NDArray, neighbors: KNNGraph | None = None) -> KNNVote:
        X, y, classes = check_labels(X, y)
        self.classes_ = classes
        lab = np.flatnonzero(y >= 0)
        sim, idx = nearest(X[lab], X, self.k + 1)
        # a labeled point must not vote for itself
        self_hit = lab[idx] == np.arange(len(X))[:, None]
        w = np.where(self_hit, 0.0, np.maximum(sim, 0) if self.weighted else 1.0)
        votes = np.zeros((len(X), len(classes)))
        cls_pos = np.searchsorted(classes, y[lab][idx])
        np.add.at(votes, (np.repeat(np.arange(len(X)), idx.shape[1]), cls_pos.ravel()), w.ravel())
        total = votes.sum(axis=1)
        labels = classes[np.argmax(votes, axis=1)]
        conf = np.where(total > 0, votes.max(axis=1) / np.maximum(total, 1e-12), 0.0)
        self.labels_ = np.where(y >= 0, y, labels)
        self.confidence_ = np.where(y >= 0, 1.0, conf).astype(np.float32)
        self.k_ = self.k
        self._set_prototypes(X)
        return self


class Prototype(BaseLabeler):
    """Nearest class mean: each point takes the class whose labeled mean is most similar.

    Parameters
    ----------
    temperature : float
        Softmax temperature on cosine similarities for the confidence.
    """

    def __init__(self, temperature: float = 0.05):
        self.temperature = temperature

    def fit(self, X: NDArray, y: NDArray, neighbors: KNNGraph | None = None) -> Prototype:
        X, y, classes = check_labels(X, y)
        self.classes_ = classes
        P = np.stack([X[y == c].mean(axis=0) for c in classes])
        self.prototypes_ = (P / np.linalg.norm(P, axis=1, keepdims=True)).astype(np.float32)
        proba = _softmax(X @ self.prototypes_.T, self.temperature)
        self.labels_ = np.where(y >= 0, y, classes[np.argmax(proba, axis=1)])
        self.confidence_ = np.where(y >= 0, 1.0, proba.max(axis=1)).astype(np.float32)
        return self


class LabelSpreadingLabeler(BaseLabeler):
    """sklearn ``LabelSpreading`` with a kNN kernel (Zhou et al. 2004), as a pipeline labeler.

    Parameters
    ----------
    n_neighbors, alpha, max_iter : see :class:`sklearn.semi_supervised.LabelSpreading`.
    """

    def __init__(self, n_neighbors: int = 10, alpha: float = 0.2, max_iter: int = 100):
        self.n_neighbors = n_neighbors
        self.alpha = alpha
        self.max_iter = max_iter

    def fit(self, X: NDArray, y: NDArray, neighbors: KNNGraph | None = None) -> LabelSpreadingLabeler:
        from sklearn.semi_supervised import LabelSpreading

        X, y, classes = check_labels(X, y)
        self.classes_ = classes
        ls = LabelSpreading(kernel="knn", n_neighbors=self.n_neighbors, alpha=self.alpha, max_iter=self.max_iter)
        ls.fit(X, y)
        dist = np.nan_to_num(ls.label_distributions_, nan=0.0)
        self.labels_ = np.where(y >= 0, y, ls.transduction_).astype(np.int64)
        self.confidence_ = np.where(y >= 0, 1.0, dist.max(axis=1)).astype(np.float32)
        self.k_ = self.n_neighbors
        self._set_prototypes(X)
        return self


class NaiveTieredVote(BaseLabeler):
    """The literal tier rule: label first the unlabeled rows with the most labeled neighbours.

    In each tier the unlabeled rows whose ``k``-neighbourhood holds the most
    labeled (or already pseudo-labeled) rows take the similarity-weighted vote of
    those rows, then join the labeled pool. Rows that no tier reaches take the
    label of their nearest labeled row. A baseline: early mistakes become anchors.

    Parameters
    ----------
    k : int
        Neighbourhood size.
    """

    def __init__(self, k: int = 10):
        self.k = k

    def fit(self, X: NDArray, y: NDArray, neighbors: KNNGraph | None = None) -> NaiveTieredVote:
        X, y, classes = check_labels(X, y)
        self.classes_ = classes
        n, n_classes = len(X), len(classes)
        g = _neighbour_graph(X, int(min(self.k, n - 1)), neighbors)
        idx, valid = g.idx, g.idx >= 0
        w = np.where(valid, np.maximum(np.nan_to_num(g.sim, neginf=0.0), 0.0), 0.0) + 1e-6
        pos = np.full(n, -1, np.int64)
        pos[y >= 0] = np.searchsorted(classes, y[y >= 0])
        conf = np.where(y >= 0, 1.0, 0.0)
        tier = np.zeros(n, np.int64)
        safe = np.where(valid, idx, 0)
        r = np.repeat(np.arange(n), idx.shape[1])
        t = 0
        while (pos < 0).any():
            nb = np.where(valid, pos[safe], -1)
            cnt = (nb >= 0).sum(axis=1)
            cnt[pos >= 0] = -1
            m = cnt.max()
            if m <= 0:
                break
            t += 1
            sel = np.flatnonzero(cnt == m)
            votes = np.zeros((n, n_classes))
            ok = (nb >= 0).ravel()
            np.add.at(votes, (r[ok], nb.ravel()[ok]), w.ravel()[ok])
            v = votes[sel]
            pos[sel] = np.argmax(v, axis=1)
            conf[sel] = v.max(axis=1) / np.maximum(v.sum(axis=1), 1e-12)
            tier[sel] = t
        rest = np.flatnonzero(pos < 0)
        if len(rest):
            lab = np.flatnonzero(y >= 0)
            _, nn = nearest(X[lab], X[rest], 1)
            pos[rest] = np.searchsorted(classes, y[lab[nn[:, 0]]])
            conf[rest] = 0.0
            tier[rest] = t + 1
        self.labels_ = np.where(y >= 0, y, classes[pos]).astype(np.int64)
        self.confidence_ = conf.astype(np.float32)
        self.tier_ = tier
        self.k_ = self.k
        self._set_prototypes(X)
        return self
