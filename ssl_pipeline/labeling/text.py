"""HDL's text expert: a zero-shot prior from class-name text embeddings, its temperature fit to the data.

``P_text = softmax(beta * X @ T.T)`` for unit image rows ``X`` (N, D) and unit class-name embeddings
``T`` (C, D) of the same CLIP (rows in class order). Raw similarity scales differ between text sources
(one prompt vs an 80-template average), so ``beta`` is never a constant: it is the maximum-likelihood
inverse temperature of the labeled rows (their given class under ``P_text``, targets smoothed by the rule
of succession), which makes the prior's confidence match its accuracy on them; with no labeled row it is
chosen so that the mean entropy of ``P_text`` over the pool is half the log of the number of classes.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray
from scipy.optimize import minimize_scalar

_LOG_BETA = (0.0, np.log(1000.0))  # search range of the inverse temperature


def check_text(text: NDArray, n_dims: int, classes: NDArray[np.int64]) -> NDArray[np.float32]:
    """The rows of ``text`` (C_text, D) for ``classes`` (label values index the rows), unit-normalised."""
    T = np.asarray(text, np.float32)
    if T.ndim != 2 or T.shape[1] != n_dims:
        raise ValueError(f"text must be (n_classes, {n_dims}) class-name embeddings, got shape {T.shape}")
    if len(classes) and (classes.min() < 0 or classes.max() >= len(T)):
        raise ValueError(f"text has {len(T)} rows but the labels reach class {int(classes.max())}: "
                         "text rows must be in class order, one per class")
    T = T[classes]
    if not np.isfinite(T).all():
        raise ValueError("text holds NaN or infinite values")
    return T / np.maximum(np.linalg.norm(T, axis=1, keepdims=True), 1e-12)


def text_similarity(X: NDArray, T: NDArray[np.float32], batch: int = 65536) -> NDArray[np.float32]:
    """Cosine similarities (N, C) of the rows of ``X`` (read in batches, normalised) to the text rows."""
    out = np.empty((len(X), len(T)), np.float32)
    for s in range(0, len(X), batch):
        xb = np.asarray(X[s:s + batch], np.float32)
        xb = xb / np.maximum(np.linalg.norm(xb, axis=1, keepdims=True), 1e-12)
        out[s:s + len(xb)] = xb @ T.T
    return out


def _softmax_rows(S: NDArray, beta: float, out: NDArray | None = None) -> NDArray[np.float32]:
    P = np.multiply(S, np.float32(beta), out=out)
    P -= P.max(axis=1, keepdims=True)
    np.exp(P, out=P)
    P /= P.sum(axis=1, keepdims=True)
    return P


def fit_temperature(S: NDArray[np.float32], lab_rows: NDArray[np.int64], lab_pos: NDArray[np.int64],
                    sample: int = 4096, seed: int = 0) -> float:
    """Inverse temperature ``beta`` of ``softmax(beta * S)``: the labeled rows' maximum likelihood, or (no
    labeled row) the one whose mean entropy over a sample of the rows is half of ``log C``."""
    if len(lab_rows):
        Sl = np.asarray(S[lab_rows], np.float64)
        # targets smoothed by the rule of succession: with every labeled row right the likelihood alone would
        # push beta to infinity; (1 - eps) on the given class, eps = 1 / (n_labeled + 2), spread over the rest
        eps = 1.0 / (len(lab_rows) + 2)
        Y = np.full(Sl.shape, eps / max(Sl.shape[1] - 1, 1))
        Y[np.arange(len(lab_rows)), lab_pos] = 1.0 - eps

        def nll(log_beta: float) -> float:
            Z = np.exp(log_beta) * Sl
            Z -= Z.max(axis=1, keepdims=True)
            return float(np.mean(np.log(np.exp(Z).sum(axis=1)) - (Y * Z).sum(axis=1)))
    else:
        rng = np.random.default_rng(seed)
        Ss = np.asarray(S[rng.choice(len(S), min(len(S), sample), replace=False)], np.float64)
        target = 0.5 * np.log(S.shape[1])

        def nll(log_beta: float) -> float:
            P = _softmax_rows(Ss, np.exp(log_beta))
            return float((-(P * np.log(P + 1e-300)).sum(axis=1).mean() - target) ** 2)
    res = minimize_scalar(nll, bounds=_LOG_BETA, method="bounded", options={"xatol": 1e-3})
    return float(np.exp(res.x))


def text_posterior(X: NDArray, T: NDArray[np.float32], lab_rows: NDArray[np.int64], lab_pos: NDArray[np.int64],
                   seed: int = 0) -> tuple[NDArray[np.float32], float]:
    """The zero-shot posterior (N, C) float32 and its fitted inverse temperature."""
    S = text_similarity(X, T)
    beta = fit_temperature(S, lab_rows, lab_pos, seed=seed)
    return _softmax_rows(S, beta, out=S), beta
