"""HDL's graph expert: kNN graph, normalised affinity, label propagation by block conjugate gradient.

``Z = (I - alpha S)^-1 Y`` with ``S = D^-1/2 W D^-1/2`` of the symmetrised kNN graph whose weights are
``max(cos, 0) ** gamma`` (Iscen et al. 2019); above 50k rows the rows are sorted by a coarse k-means so
the sparse products read neighbouring rows from the cache, and the columns are solved by threads.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from ssl_pipeline.labeling.knn import KNNGraph, knn_graph
from ssl_pipeline.labeling.linear import _principal_axes, _project

log = logging.getLogger(__name__)

_EXACT_LIMIT = 50_000  # above this many rows an approximate faiss index is used


def _neighbour_graph(X: NDArray[np.float32], k: int, neighbors: KNNGraph | None) -> KNNGraph:
    """A kNN graph with at least ``k`` columns: the given one if it is large enough, else a new one."""
    if neighbors is not None:
        if neighbors.idx.shape[0] != len(X):
            raise ValueError(f"neighbors has {neighbors.idx.shape[0]} rows, X has {len(X)}")
        if neighbors.k >= k:
            return neighbors.truncate(k)
        log.info("neighbors has k=%d < %d needed: recomputing the kNN graph", neighbors.k, k)
    kind = "flat" if len(X) <= _EXACT_LIMIT else "ivf"
    return knn_graph(X, k, kind=kind)


def _affinity(g: KNNGraph, k: int, gamma: float, order: NDArray[np.int64] | None = None) -> sp.csr_matrix:
    """Symmetric normalised affinity ``D^-1/2 (W + W^T) D^-1/2`` of the first ``k`` neighbours.

    With ``order`` the rows and columns come in that order (row ``i`` is point ``order[i]``). Built
    straight in CSR form (every row has ``k`` slots), so no (N k) coordinate lists are materialised.
    """
    n = g.idx.shape[0]
    idx = g.idx[:, :k] if order is None else g.idx[order, :k]
    w = np.nan_to_num(g.sim[:, :k] if order is None else g.sim[order, :k], neginf=0.0).astype(np.float32)
    np.maximum(w, 0.0, out=w)
    w **= gamma
    valid = idx >= 0
    w[~valid] = 0.0
    if order is None:
        cols = np.where(valid, idx, 0).astype(np.int32)
    else:
        inverse = np.empty(n, np.int32)
        inverse[order] = np.arange(n, dtype=np.int32)
        cols = inverse[np.where(valid, idx, 0)]
    del idx, valid
    W = sp.csr_matrix((w.ravel(), cols.ravel(), np.arange(0, n * k + 1, k, dtype=np.int64)), shape=(n, n))
    del w, cols
    W.eliminate_zeros()
    W = (W + W.T).tocsr()
    d = np.asarray(W.sum(axis=1)).ravel()
    dinv = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-30)), 0.0).astype(np.float32)
    rows = np.repeat(np.arange(n, dtype=np.int32), np.diff(W.indptr))
    W.data *= dinv[rows]
    del rows
    W.data *= dinv[W.indices]
    W.sort_indices()
    return W


def _propagate(S: sp.csr_matrix, B: NDArray | list, alpha: float, X0: NDArray | list | None = None,
               n_iter: int = 20, tol: float = 1e-4) -> NDArray[np.float32]:
    """Solve ``(I - alpha S) Z = B`` column-wise by block conjugate gradient (SPD system).

    Four (N, C) float32 work arrays plus the product's, updated in place (no other
    per-iteration temporaries). ``B`` or ``X0`` given as a one-element list is
    consumed: its float32 array is popped and used as work space (the residual, the
    iterate), so the caller's copy is not held twice.
    """
    own_b = isinstance(B, list)
    B = np.asarray(B.pop() if own_b else B, np.float32)
    stop = (tol ** 2) * np.maximum(np.einsum("ij,ij->j", B, B), 1e-30)
    # -alpha S, so one accumulating product gives A P = P - alpha S P (no separate scale and add passes)
    S_neg = sp.csr_matrix((S.data * np.float32(-alpha), S.indices, S.indptr), shape=S.shape)
    if X0 is None:
        Z = np.zeros_like(B)
        R = B if own_b else B.copy()
    else:
        Z = np.asarray(X0.pop(), np.float32) if isinstance(X0, list) else np.array(X0, np.float32)
        R = B if own_b else B.copy()
        R -= Z
        R += alpha * (S @ Z)
    del B
    P = R.copy()
    rs = np.einsum("ij,ij->j", R, R)
    AP = np.empty_like(P)
    for _ in range(n_iter):
        if (rs <= stop).all():
            break
        np.copyto(AP, P)
        _spmm_into(S_neg, P, AP, accumulate=True)
        step = (rs / np.maximum(np.einsum("ij,ij->j", P, AP), 1e-30)).astype(np.float32)
        AP *= step
        R -= AP
        np.multiply(P, step, out=AP)  # AP is free again: work space for step * P
        Z += AP
        rs_new = np.einsum("ij,ij->j", R, R)
        P *= (rs_new / np.maximum(rs, 1e-30)).astype(np.float32)
        P += R
        rs = rs_new
    return Z


def _spmm_into(S: sp.csr_matrix, P: NDArray[np.float32], out: NDArray[np.float32], accumulate: bool = False
               ) -> None:
    """``out[:] = S @ P`` (``out += S @ P`` with ``accumulate``) without allocating the product (scipy's csr
    kernel accumulates into ``out``)."""
    try:
        from scipy.sparse._sparsetools import csr_matvecs
    except ImportError:  # private scipy API: fall back to the allocating product
        if accumulate:
            out += S @ P
        else:
            out[:] = S @ P
        return
    if not accumulate:
        out.fill(0.0)
    n_row, n_col = S.shape
    csr_matvecs(n_row, n_col, P.shape[1], S.indptr, S.indices, S.data, P.ravel(), out.ravel())


class _Graph:
    """The normalised affinity ``S`` with rows and columns in a cache-friendly order.

    Sparse products gather rows of the dense right-hand side at the column ids of
    each row; when neighbours lie near each other in memory those gathers hit the
    cache (3x faster products measured at N = 200k). ``order`` (N,) lists the rows
    in that order (None: keep the given order). ``solve`` takes and returns arrays
    in the original row order.
    """

    def __init__(self, S: sp.csr_matrix, order: NDArray[np.int64] | None, n_jobs: int = 2, permuted: bool = False):
        self.order = order
        self.n_jobs = n_jobs
        if order is None or permuted:  # S already in ``order`` (see :meth:`from_graph`)
            self.S = S
        else:
            self.S = S[order][:, order].tocsr()
            self.S.sort_indices()
        if order is not None:
            self.inverse = np.empty_like(order)
            self.inverse[order] = np.arange(len(order))

    @classmethod
    def from_graph(cls, g: KNNGraph, k: int, gamma: float, order: NDArray[np.int64] | None, n_jobs: int = 2
                   ) -> _Graph:
        """The affinity of ``g``'s first ``k`` neighbours, built directly in ``order``."""
        return cls(_affinity(g, k, gamma, order), order, n_jobs=n_jobs, permuted=True)

    def solve_seeds(self, rows: NDArray[np.int64], cols: NDArray[np.int64], values: NDArray, n_cols: int,
                    alpha: float, X0: list | None = None, n_iter: int = 20, tol: float = 1e-4
                    ) -> NDArray[np.float32]:
        """``(I - alpha S)^-1 B`` for the sparse right-hand side ``B[rows, cols] = values`` (N, n_cols).

        Builds ``B`` directly in the internal order; ``X0`` (a warm start) is a one-element list whose
        array is consumed, so a solve holds five (N, n_cols) arrays at most. On a graph with a locality
        order (large N) the columns are split into chunks solved by ``self.n_jobs`` threads (the columns
        are independent systems; the dense updates release the GIL); chunks of at most 2^25 / N columns
        keep the work arrays of a large N below those of one (N, n_cols) solve.
        """
        n = self.S.shape[0]
        r = rows if self.order is None else self.inverse[rows]
        if X0 is not None and self.order is not None:
            X0 = [X0.pop()[self.order]]
        jobs = min(self.n_jobs, n_cols // 16) if self.order is not None else 1
        if jobs <= 1:
            B = np.zeros((n, n_cols), np.float32)
            B[r, cols] = values
            Z = _propagate(self.S, [B], alpha, X0=X0, n_iter=n_iter, tol=tol)
            return Z if self.order is None else Z[self.inverse]
        from concurrent.futures import ThreadPoolExecutor

        # column chunks of at most 2^25 / N columns (>= 16; 128 MB per work array), ``jobs`` solved at a time
        n_chunks = max(jobs, -(-n_cols // max(16, 2 ** 25 // n)))
        parts = np.array_split(np.arange(n_cols), n_chunks)
        x0 = None if X0 is None else X0.pop()
        x0_parts = [None if x0 is None else [np.ascontiguousarray(x0[:, p])] for p in parts]
        del x0

        def one(i: int) -> NDArray[np.float32]:
            p = parts[i]
            sel = (cols >= p[0]) & (cols <= p[-1])
            B = np.zeros((n, len(p)), np.float32)
            B[r[sel], cols[sel] - p[0]] = values[sel]
            return _propagate(self.S, [B], alpha, X0=x0_parts[i], n_iter=n_iter, tol=tol)

        with ThreadPoolExecutor(jobs) as ex:
            zs = list(ex.map(one, range(n_chunks)))  # the work arrays are freed before the result is allocated
        Z = np.empty((n, n_cols), np.float32)
        for p in parts:
            Z[:, p[0]:p[-1] + 1] = zs.pop(0)[self.inverse]
        return Z

    def solve(self, B: NDArray, alpha: float, X0: NDArray | None = None, n_iter: int = 20,
              tol: float = 1e-4, rows: NDArray[np.int64] | None = None) -> NDArray[np.float32]:
        """``(I - alpha S)^-1 B`` (rows ``rows`` of it if given), by :func:`_propagate`."""
        if self.order is None:
            Z = _propagate(self.S, B, alpha, X0=X0, n_iter=n_iter, tol=tol)
            return Z if rows is None else Z[rows]
        Z = _propagate(self.S, B[self.order], alpha, X0=None if X0 is None else X0[self.order],
                       n_iter=n_iter, tol=tol)
        return Z[self.inverse] if rows is None else Z[self.inverse[rows]]


def _locality_order(X: NDArray[np.float32], seed: int, min_rows: int = 50_000) -> NDArray[np.int64] | None:
    """Rows sorted by a coarse spherical k-means (~sqrt(N) clusters, 64 principal axes), or None below
    ``min_rows`` rows (the dense propagation arrays then fit in the cache anyway)."""
    n = len(X)
    if n < min_rows:
        return None
    import faiss

    axes = _principal_axes(X, 64, seed)
    nc = int(round(np.sqrt(n)))
    Xp = _project(X, None, axes)
    rng = np.random.default_rng(seed)
    sample = Xp[np.sort(rng.choice(n, min(n, 32 * nc), replace=False))]
    km = faiss.Kmeans(Xp.shape[1], nc, niter=8, seed=int(seed) + 1, spherical=True, verbose=False,
                      max_points_per_centroid=32, min_points_per_centroid=1)
    km.train(sample)
    _, assign = km.index.search(Xp, 1)
    return np.argsort(assign.ravel(), kind="stable")


def _balanced_posterior(Z: NDArray, n_prior_iter: int) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Row posteriors from propagation scores: equal class mass, then an EM class prior.

    Rows that no class reaches get the uniform posterior. One (N, C) float32 array
    is allocated (the result); the EM steps are matrix-vector products.
    """
    P = np.maximum(np.asarray(Z, np.float32), 0.0)
    P /= np.maximum(P.sum(axis=0, keepdims=True), 1e-30)
    C = P.shape[1]
    prior = np.full(C, 1.0 / C, np.float32)
    reached = P.sum(axis=1) > 0
    n_reached = int(reached.sum())
    for _ in range(n_prior_iter):
        if n_reached == 0:
            break
        s = P @ prior
        v = np.where(reached, 1.0 / np.maximum(s, 1e-30), 0.0).astype(np.float32)
        prior = prior * (P.T @ v) / n_reached
        prior = np.maximum(prior, 1e-6)
        prior = (prior / prior.sum()).astype(np.float32)
    P *= prior
    s = P.sum(axis=1, keepdims=True)
    P /= np.maximum(s, 1e-30)
    P[s[:, 0] <= 0] = 1.0 / C
    return P, prior.astype(np.float64)


def _cluster_mean(P: NDArray[np.float32], assign: NDArray[np.int64], n_clusters: int,
                  rows: NDArray[np.bool_] | None = None) -> NDArray[np.float32]:
    """Every row's cluster-mean posterior (N, C), averaged over ``rows`` (all rows if None); uniform if empty."""
    keep = np.ones(len(P), bool) if rows is None else rows
    member = sp.csr_matrix((keep.astype(np.float32), (assign, np.arange(len(P)))), shape=(n_clusters, len(P)))
    Q = np.asarray(member @ P, dtype=np.float64)
    s = Q.sum(axis=1, keepdims=True)
    Q = np.where(s > 0, Q / np.maximum(s, 1e-30), 1.0 / P.shape[1])
    return Q[assign].astype(np.float32)


def _worse_than(ok_ref: NDArray[np.bool_], ok: NDArray[np.bool_]) -> bool:
    """Whether the paired correctness ``ok`` (n,) is worse than ``ok_ref`` (n,) by a sign test (McNemar) at two
    standard errors: rows lost minus rows won above twice the square root of the discordant pairs."""
    lost, won = int((ok_ref & ~ok).sum()), int((~ok_ref & ok).sum())
    return lost - won > 2.0 * np.sqrt(lost + won)


def _tier_loo_correct(Z: NDArray, rows: NDArray[np.int64], own: NDArray[np.int64], self_infl: NDArray,
                      seed_w: NDArray) -> NDArray[np.bool_]:
    """Whether the propagation scores ``Z`` (N, C) get labeled ``rows`` right once each row's own seed
    (weight ``seed_w`` in its class column, self-influence ``self_infl``) is taken out.

    HDL's validated tiers (rule 5 of :mod:`ssl_pipeline.labeling.hdl`):
    Every tier's propagation is scored leave-one-out on the labeled rows of rule 2 (each row's own seed taken
    out through its self-influence ``((I - alpha S)^-1)_ii``, known from rule 2's solves). A tier that gets
    them wrong more often than tier 1, by a paired sign test at two standard errors, is undone and the tiers
    stop (``n_tiers_``). Tier 1 is the reference because its pool holds the given labels only: from tier 2 on
    the score is biased upwards (the pseudo labels a labeled row's neighbours received because of that row
    stay in the pool when it is left out), by a leak that shrinks as the pool grows, so on real CLIP sets
    every later tier scores above tier 1 but below tier 2; judged against the best earlier tier they were
    undone where they helped (oxford_pets, 8 labels per class, seed 0: stopped at tier 3, 0.816 against 0.846
    with every tier). Falling below tier 1 despite that bias is what a collapse looks like: two noisy
    concentric rings (``tests/labeling/test_hdl.py``), leave-one-out 0.93 at tier 1, 0.70 at tier 3, where
    unchecked tiers end at 0.61 and the check keeps tier 2 (0.99). The same check catches pools that cover the
    data unevenly: with multi-modal classes the most confident rows of a class can all sit in the modes its
    labels cover best, and propagating from such a pool lets neighbouring classes take over the other modes.
    """
    Zl = np.asarray(Z[rows], np.float64)
    i = np.arange(len(rows))
    Zl[i, own] = (Zl[i, own] - self_infl * seed_w) / np.maximum(1.0 - seed_w, 1e-12)
    return np.argmax(Zl, axis=1) == own
