"""Baseline pseudo-labelers: kNN vote, nearest class mean, sklearn LabelSpreading.

Each is a scikit-learn-style estimator (see :mod:`ssl_pipeline.labeling.base`).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from ssl_pipeline.labeling.base import BaseLabeler, check_labels
from ssl_pipeline.labeling.knn import KNNGraph, nearest


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
