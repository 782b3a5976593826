"""Label contexts: groups of co-occurring labels by spectral clustering of the co-occurrence matrix (CSA).

Only labeled rows are used (no leakage from unlabeled or test truth). The
affinity between labels i and j is the symmetrised conditional probability::

    A_ij = (P(j | i) + P(i | j)) / 2 = (n_ij / n_i + n_ij / n_j) / 2,   A_ii = 0

The labels are embedded with the leading eigenvectors of the normalised
affinity ``D^-1/2 A D^-1/2`` (Ng, Jordan & Weiss), and k-means on the
row-normalised embedding gives the contexts. The number of contexts M is
picked by the eigengap of the normalised Laplacian, bounded to
``[min_contexts, max_contexts]`` (and to at most C - 1 so that a context is
coarser than a label whenever C > 2).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray


def cooccurrence(Y: NDArray, eps: float = 1e-12) -> NDArray[np.float64]:
    """Symmetric normalised co-occurrence (C, C) of a (N, C) 0/1 label matrix, zero diagonal."""
    Y = np.asarray(Y, np.float64)
    n = Y.T @ Y
    counts = np.diag(n).copy()
    P = n / np.maximum(counts[:, None], eps)  # P[i, j] = P(j | i)
    A = (P + P.T) / 2
    np.fill_diagonal(A, 0.0)
    return A


def _normalised(A: NDArray, floor: float = 1e-6) -> NDArray:
    d = np.maximum(A.sum(1), floor)
    s = 1.0 / np.sqrt(d)
    return A * s[:, None] * s[None, :]


def eigengap_contexts(A: NDArray, min_contexts: int = 2, max_contexts: int | None = None) -> tuple[int, NDArray]:
    """The number of contexts by the largest eigengap of ``I - D^-1/2 A D^-1/2``; also the sorted eigenvalues."""
    C = len(A)
    lam = np.sort(np.clip(1.0 - np.linalg.eigvalsh(_normalised(A)), 0.0, 2.0))
    hi = C - 1 if C > 2 else C
    hi = min(hi, max_contexts) if max_contexts else hi
    lo = min(max(1, min_contexts), hi)
    if hi <= lo:
        return lo, lam
    # gap after the m-th smallest eigenvalue: lam[m] - lam[m - 1], m = number of clusters
    gaps = {m: lam[m] - lam[m - 1] for m in range(lo, hi + 1) if m < C}
    if not gaps:
        return lo, lam
    return max(gaps, key=lambda m: (gaps[m], -m)), lam


def spectral_contexts(Y: NDArray, n_contexts: int | None = None, min_contexts: int = 2,
                      max_contexts: int | None = None, seed: int = 0) -> tuple[NDArray[np.int64], dict]:
    """Group the C labels of ``Y`` (N, C) 0/1 into contexts.

    Parameters
    ----------
    Y : (N, C) 0/1, labeled rows only
    n_contexts : int, optional
        Fixed number of contexts; None = eigengap.
    min_contexts, max_contexts : bounds of the automatic choice (max default: ceil(C / 2))

    Returns
    -------
    context_of : (C,) int64
        Context id of each label, ids 0..M-1 ordered by first appearance.
    info : dict
        ``n_contexts``, ``eigenvalues`` (C,), ``affinity`` (C, C).
    """
    from sklearn.cluster import KMeans

    Y = np.asarray(Y)
    C = Y.shape[1]
    A = cooccurrence(Y)
    if max_contexts is None:
        max_contexts = max(1, int(np.ceil(C / 2)))
    M, lam = eigengap_contexts(A, min_contexts, max_contexts)
    if n_contexts is not None:
        M = int(n_contexts)
    M = max(1, min(M, C))
    if M == 1:
        context_of = np.zeros(C, np.int64)
    elif M == C:
        context_of = np.arange(C, dtype=np.int64)
    else:
        w, V = np.linalg.eigh(_normalised(A))
        U = V[:, np.argsort(w)[::-1][:M]]
        U = U / np.maximum(np.linalg.norm(U, axis=1, keepdims=True), 1e-12)
        raw = KMeans(M, n_init=20, random_state=seed).fit_predict(U)
        _, first = np.unique(raw, return_index=True)
        order = {c: i for i, c in enumerate(raw[np.sort(first)])}
        context_of = np.array([order[c] for c in raw], np.int64)
    return context_of, {"n_contexts": int(context_of.max()) + 1, "eigenvalues": lam, "affinity": A}


def context_targets(Y: NDArray, context_of: NDArray) -> NDArray[np.float32]:
    """(N, M) multi-hot: context m is on when any label of context m is on in ``Y`` (N, C) (0/1 or soft)."""
    Y = np.asarray(Y, np.float32)
    M = int(context_of.max()) + 1
    out = np.zeros((len(Y), M), np.float32)
    for m in range(M):
        out[:, m] = Y[:, context_of == m].max(1)
    return out
