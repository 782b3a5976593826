"""The contract every pseudo-labeler follows (scikit-learn style).

A labeler is fitted transductively on every training embedding at once::

    lab = Labeler(...).fit(X, y)          # X (N, D) float, y (N,) int, -1 = unlabeled
    lab.labels_        # (N,) int   a label for every row (labeled rows keep theirs)
    lab.confidence_    # (N,) float in [0, 1]; 1.0 on labeled rows
    lab.predict(X_new) / lab.predict_proba(X_new)   # inductive use on new points

Optional diagnostics a labeler may set: ``tier_`` (N,) int, ``noise_`` (N,) bool,
``agreement_`` (N,) float (share of neighbours that agree with the label),
``k_`` (the neighbourhood size it used), ``n_clusters_``.

``fit`` also accepts ``neighbors=KNNGraph`` so the pipeline's cached faiss graph
(built by the cluster stage over the same rows) is reused instead of rebuilt.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.utils.validation import check_is_fitted

from ssl_pipeline.labeling.knn import as_unit_float32, as_unit_rows


def check_labels(X: NDArray, y: NDArray, keep_rows: bool = False
                 ) -> tuple[NDArray[np.float32], NDArray[np.int64], NDArray[np.int64]]:
    """Validate a transductive fit input; return (unit-norm X, y, sorted classes).

    With ``keep_rows`` unit-norm float16 / float32 rows (a memory map included) are
    returned as they are, for labelers that read them in batches; otherwise X is a
    float32 array. Raises ``ValueError`` for shape mismatches, labels below -1, or
    no labeled row.
    """
    X = as_unit_rows(X) if keep_rows else as_unit_float32(X)
    y = np.asarray(y)
    if y.ndim != 1 or len(y) != len(X):
        raise ValueError(f"y must be a 1-D array with one entry per row of X ({len(X)}), got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        if not np.all(np.mod(y, 1) == 0):
            raise ValueError("y must hold integer class ids (-1 = unlabeled)")
    y = y.astype(np.int64)
    if (y < -1).any():
        raise ValueError(f"labels must be >= -1 (-1 = unlabeled), found {int(y.min())}")
    classes = np.unique(y[y >= 0])
    if len(classes) == 0:
        raise ValueError("y holds no labeled row (every entry is -1)")
    return X, y, classes


class BaseLabeler(ClassifierMixin, BaseEstimator):
    """Shared inductive half: ``predict_proba`` from class prototypes of the fitted labels.

    Subclasses implement ``fit`` and set ``labels_``, ``confidence_``,
    ``classes_``; they may override ``predict_proba``.
    """

    temperature: float = 0.05

    def _set_prototypes(self, X: NDArray[np.float32]) -> None:
        """Class means of the fitted labels, weighted by confidence: (C, D) unit rows."""
        P = np.zeros((len(self.classes_), X.shape[1]), np.float64)
        lab_pos = np.searchsorted(self.classes_, self.labels_)
        np.add.at(P, lab_pos, X * self.confidence_[:, None])
        P /= np.maximum(np.linalg.norm(P, axis=1, keepdims=True), 1e-12)
        self.prototypes_ = P.astype(np.float32)

    def predict_proba(self, X: NDArray) -> NDArray[np.float32]:
        """Class probabilities (M, C) for new points, softmax of cosine to prototypes / T."""
        check_is_fitted(self, "prototypes_")
        S = as_unit_float32(X) @ self.prototypes_.T / self.temperature
        S -= S.max(axis=1, keepdims=True)
        P = np.exp(S)
        return (P / P.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, X: NDArray) -> NDArray[np.int64]:
        """Most probable class (M,) for new points."""
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]
