"""HDL: Hierarchical Dynamic Labeling of unlabeled embeddings.

HDL labels a fixed pool of embeddings (transductively) from a few labeled rows,
using the embeddings only (no classifier logits). It follows the HDL reading of
Ma et al. (arXiv 2404.17173): points are labeled in *tiers*, starting with the
unlabeled points most strongly anchored to labeled ones; every tier's labels
join the labeled pool and the next tier is recomputed from the grown pool; the
neighbourhood size ``k`` is chosen adaptively from the labeled data under the
(k, delta_k) label-clusterability assumption; assignments that the
neighbourhood contradicts are flagged as noise. A naive tiered kNN vote lets
early mistakes become anchors; HDL avoids that with the rules below.

Rules (every constant is generic; nothing is chosen per data set)
-----------------------------------------------------------------
1. **Geometry.** Rows are L2-normalised; inner product = cosine. The kNN graph
   (faiss, self excluded; exact up to 50k rows, blocked IVF above) is built on these
   rows, or the given ``neighbors`` graph is reused when it has enough columns.
   The linear expert works on mean-centred, re-normalised rows projected on
   their top ``lr_dim`` principal axes (the "centre + L2" trick for few-shot
   features; the projection only saves time).
2. **Adaptive k and (k, delta_k) clusterability.** For every ``k`` in
   ``k_grid`` each labeled row (of a class with >= 2 labels; at most
   ``max_loo`` rows) is predicted by graph propagation from all *other* labeled
   rows, exactly (one sparse solve per evaluated row, batched). ``delta_k`` =
   this leave-one-out error, the estimated rate at which a row's
   k-neighbourhood leads to a wrong label. ``k_`` is the *smallest* k whose
   ``delta_k`` is within one standard error of the best (the one-SE rule;
   delta_k is non-decreasing in k in theory, and the estimate is noisy with few
   labels). With one label per class nothing can be left out: ``k_ =
   k_default`` (5, the smallest grid value; at most a quarter of the mean class
   size, at least 3) and ``delta_k_`` is estimated from the
   final labeling (share of rows whose ``k_`` neighbours do not all carry their
   label).
3. **Two experts, recomputed every tier.** (a) *Propagation*: kNN graph with
   weights ``max(cos, 0) ** gamma``, symmetrised and normalised
   (``D^-1/2 W D^-1/2``, Iscen et al. 2019); ``Z = (I - alpha S)^-1 Y`` by block
   conjugate gradient, warm-started from the previous tier, where ``Y`` holds
   the current pool with each class's seed mass normalised to 1. ``Z`` is
   column-normalised (every class the same mass: a tail class with one label
   is not outvoted by head classes), re-weighted by a class prior from
   ``n_prior_iter`` EM steps (head classes are not squeezed either), and
   row-normalised. Rows no labeled row reaches take the mean posterior of
   their k-means cluster (rule 6). (b) *Linear*: multinomial logistic
   regression (L2, ``C``; L-BFGS, warm-started) on the pool, each pseudo label
   weighted by its confidence, at most ``max_fit_per_class`` rows per class.
   Tier posterior = product of experts ``P ~ Pprop ** prop_weight * Plin``.
4. **Hierarchical, class-balanced tiers.** After tier ``t`` (of ``n_tiers``) the
   pool is rebuilt from the given labels plus, for every class, the top
   ``t / n_tiers`` fraction of the unlabeled rows now predicted as that class,
   by confidence. Every class admits the same *fraction* of its predicted
   members, so a tail class is never swallowed by a head class, and tier 1
   admits only the rows most strongly anchored to the labeled ones. The last
   tier labels every row.
5. **Dynamic revision.** Each tier refits both experts on the grown pool and
   re-predicts *every* pseudo label; a label from an earlier tier that the
   refitted experts (propagation is the neighbourhood's vote) now contradict
   is revised, or evicted from the pool, instead of staying an anchor.
   ``tier_`` is the tier from which a row stayed in the pool to the end.
   **Validated tiers.** Every tier's propagation is scored leave-one-out on the
   labeled rows of rule 2 (each row's own seed taken out through its
   self-influence ``((I - alpha S)^-1)_ii``, known from rule 2's solves). A tier
   that gets them wrong more often than the best earlier tier, by a paired sign
   test at two standard errors, is undone and the tiers stop (``n_tiers_``).
   This catches pools that cover the data unevenly: with multi-modal classes
   the most confident rows of a class can all sit in the modes its labels
   cover best, and propagating from such a pool lets neighbouring classes take
   over the other modes (seen on 200k synthetic rows: tier-1 accuracy 0.985,
   0.69 after five unchecked tiers).
6. **Second opinion.** k-means (faiss, on the top 64 principal axes) with the
   number of clusters chosen automatically among 1, 2 and 4 times the number
   of classes (at least 5 rows per cluster) by normalised mutual information
   with the tier-1 labels. It labels the rows the graph cannot reach and, if
   ``cluster_weight > 0``, also orders admission (off by default: it did not
   help on real CLIP sets).
7. **Noise.** ``agreement_`` = similarity-weighted share of a row's ``k_``
   neighbours carrying its final label; ``noise_`` flags rows (given ones
   included) whose neighbourhood majority is another class and whose
   agreement is below one half. Given labels are never changed.
8. **Confidence.** The final posterior of the row's label (1 for given labels):
   it ranks likely errors last.

Everything is O(N k) memory (sparse N x k graph, N x C dense posteriors; the
centred rows of the linear expert are made in batches, never as a second copy of
the embeddings); the only loops run over tiers, EM steps, CG iterations and
candidate k values. Above 50k rows the propagation runs with the rows sorted by a
coarse k-means, so the sparse products read neighbouring rows from the cache.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from scipy.optimize import minimize
from sklearn.utils.validation import check_is_fitted

from ssl_pipeline.labeling.base import BaseLabeler, check_labels
from ssl_pipeline.labeling.knn import KNNGraph, as_unit_float32, exact_search, knn_graph, nearest

log = logging.getLogger(__name__)

_EXACT_LIMIT = 50_000  # above this many rows an approximate faiss index is used


# ---------------------------------------------------------------- graph helpers
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
        _spmm_into(S, P, AP)
        AP *= -alpha
        AP += P
        step = (rs / np.maximum(np.einsum("ij,ij->j", P, AP), 1e-30)).astype(np.float32)
        Z += step * P
        AP *= step
        R -= AP
        rs_new = np.einsum("ij,ij->j", R, R)
        P *= (rs_new / np.maximum(rs, 1e-30)).astype(np.float32)
        P += R
        rs = rs_new
    return Z


def _spmm_into(S: sp.csr_matrix, P: NDArray[np.float32], out: NDArray[np.float32]) -> None:
    """``out[:] = S @ P`` without allocating the product (scipy's csr kernel accumulates into ``out``)."""
    try:
        from scipy.sparse._sparsetools import csr_matvecs
    except ImportError:  # private scipy API: fall back to the allocating product
        out[:] = S @ P
        return
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


# ---------------------------------------------------------------- linear expert
def _fit_softmax(X: NDArray[np.float32], y: NDArray[np.int64], w: NDArray, n_classes: int, C: float,
                 theta0: NDArray | None, max_iter: int) -> NDArray[np.float64]:
    """Weighted multinomial logistic regression ``C * sum w CE + ||W||^2 / 2``; returns [W.ravel(), b]."""
    n, d = X.shape
    Y = np.zeros((n, n_classes), np.float32)
    Y[np.arange(n), y] = 1.0
    w = (np.asarray(w, np.float32) * C)[:, None]

    def loss_grad(theta: NDArray) -> tuple[float, NDArray]:
        W = theta[: d * n_classes].reshape(d, n_classes).astype(np.float32)
        b = theta[d * n_classes:].astype(np.float32)
        S = X @ W + b
        S -= S.max(axis=1, keepdims=True)
        E = np.exp(S)
        Zs = E.sum(axis=1, keepdims=True)
        wt = theta[: d * n_classes]
        loss = -float((w * (S - np.log(Zs)) * Y).sum()) + 0.5 * float(np.dot(wt, wt))
        G = (E / Zs - Y) * w
        gW = X.T @ G + W
        return loss, np.concatenate([gW.ravel(), G.sum(axis=0)]).astype(np.float64)

    theta = np.zeros(d * n_classes + n_classes) if theta0 is None else theta0
    res = minimize(loss_grad, theta, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    return res.x


def _softmax_proba(theta: NDArray, X: NDArray[np.float32] | _LinearFeatures, n_classes: int, batch: int = 65536
                   ) -> NDArray[np.float32]:
    d = X.shape[1]
    W = theta[: d * n_classes].reshape(d, n_classes).astype(np.float32)
    b = theta[d * n_classes:].astype(np.float32)
    out = np.empty((len(X), n_classes), np.float32)
    if isinstance(X, _LinearFeatures):
        chunks = X.batches(batch)
    else:
        chunks = ((s, X[s:s + batch]) for s in range(0, len(X), batch))
    for s, xb in chunks:
        S = xb @ W + b
        S -= S.max(axis=1, keepdims=True)
        np.exp(S, out=S)
        S /= S.sum(axis=1, keepdims=True)
        out[s:s + len(S)] = S
    return out


def _centre(X: NDArray[np.float32], mean: NDArray[np.float32]) -> NDArray[np.float32]:
    Xc = X - mean
    Xc /= np.maximum(np.linalg.norm(Xc, axis=1, keepdims=True), 1e-12)
    return Xc


def _project(X: NDArray[np.float32], mean: NDArray[np.float32] | None, components: NDArray[np.float32] | None,
             rows: NDArray[np.int64] | None = None, batch: int = 65536) -> NDArray[np.float32]:
    """Rows of ``X`` (all, or ``rows``), centred on ``mean`` and re-normalised (if ``mean`` is given), then
    projected on ``components`` (if given); computed in batches, so only the result is allocated."""
    m = len(X) if rows is None else len(rows)
    r = X.shape[1] if components is None else components.shape[1]
    out = np.empty((m, r), np.float32)
    for s in range(0, m, batch):
        xb = X[s:s + batch] if rows is None else X[rows[s:s + batch]]
        if mean is not None:
            xb = _centre(xb, mean)
        out[s:s + batch] = xb if components is None else xb @ components
    return out


class _LinearFeatures:
    """The linear expert's rows: centred, re-normalised, projected on ``components``, made on demand.

    Stands in for the (N, r) feature matrix without materialising it, so the fit
    holds no second N x D copy of the embeddings.
    """

    def __init__(self, X: NDArray[np.float32], mean: NDArray[np.float32], components: NDArray[np.float32] | None):
        self.X, self.mean, self.components = X, mean, components
        self.shape = (len(X), X.shape[1] if components is None else components.shape[1])

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, rows: NDArray[np.int64]) -> NDArray[np.float32]:
        return _project(self.X, self.mean, self.components, rows=np.asarray(rows))

    def batches(self, batch: int):
        for s in range(0, len(self.X), batch):
            yield s, _project(self.X[s:s + batch], self.mean, self.components)


def _cluster_mean(P: NDArray[np.float32], assign: NDArray[np.int64], n_clusters: int,
                  rows: NDArray[np.bool_] | None = None) -> NDArray[np.float32]:
    """Every row's cluster-mean posterior (N, C), averaged over ``rows`` (all rows if None); uniform if empty."""
    keep = np.ones(len(P), bool) if rows is None else rows
    member = sp.csr_matrix((keep.astype(np.float32), (assign, np.arange(len(P)))), shape=(n_clusters, len(P)))
    Q = np.asarray(member @ P, dtype=np.float64)
    s = Q.sum(axis=1, keepdims=True)
    Q = np.where(s > 0, Q / np.maximum(s, 1e-30), 1.0 / P.shape[1])
    return Q[assign].astype(np.float32)


def _principal_axes(X: NDArray[np.float32], r: int | None, seed: int, max_rows: int = 50_000,
                    mean: NDArray[np.float32] | None = None) -> NDArray[np.float32] | None:
    """The top ``r`` principal axes (D, r) of the rows of ``X`` (a sample of them; centred on ``mean`` and
    re-normalised first when ``mean`` is given), or None if ``r >= D``."""
    if r is None or r >= X.shape[1]:
        return None
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(X), min(len(X), max_rows), replace=False))
    sample = _project(X, mean, None, rows=rows).astype(np.float64)
    sample -= sample.mean(axis=0)
    _, vecs = np.linalg.eigh(sample.T @ sample)
    return np.ascontiguousarray(vecs[:, ::-1][:, :r], dtype=np.float32)


def _tier_loo_correct(Z: NDArray, rows: NDArray[np.int64], own: NDArray[np.int64], self_infl: NDArray,
                      seed_w: NDArray) -> NDArray[np.bool_]:
    """Whether the propagation scores ``Z`` (N, C) get labeled ``rows`` right once each row's own seed
    (weight ``seed_w`` in its class column, self-influence ``self_infl``) is taken out."""
    Zl = np.asarray(Z[rows], np.float64)
    i = np.arange(len(rows))
    Zl[i, own] = (Zl[i, own] - self_infl * seed_w) / np.maximum(1.0 - seed_w, 1e-12)
    return np.argmax(Zl, axis=1) == own


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


def _rank_within_class(cls: NDArray[np.int64], score: NDArray) -> NDArray[np.int64]:
    """Rank (0 = best) of every entry among the entries of its class, by descending score."""
    order = np.lexsort((-score, cls))
    sorted_cls = cls[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_cls)) + 1]
    first = np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    rank = np.empty(len(cls), np.int64)
    rank[order] = np.arange(len(order)) - first
    return rank


# ---------------------------------------------------------------- the estimator
class HDL(BaseLabeler):
    """Hierarchical Dynamic Labeling: tiered, class-balanced, self-correcting pseudo-labeling.

    See the module docstring for the rules. Fit transductively on every row::

        hdl = HDL().fit(X, y)            # X (N, D), y (N,) with -1 = unlabeled
        hdl.labels_, hdl.confidence_, hdl.tier_, hdl.noise_

    Parameters
    ----------
    n_tiers : int
        Number of tiers; tier ``t`` admits the top ``t / n_tiers`` of each class.
    k : int or None
        Neighbourhood size; ``None`` chooses it from the labeled data among ``k_grid``.
    k_grid : tuple of int
        Candidate neighbourhood sizes for the adaptive choice.
    k_default : int
        Neighbourhood size when the labeled data cannot rank ``k_grid`` (one label per class).
    alpha : float
        Propagation strength in ``(I - alpha S)^-1``.
    gamma : float
        Exponent on cosine similarities for the graph weights.
    prop_weight : float
        Exponent of the propagation expert in the product of experts (linear expert: 1).
    C : float
        Inverse L2 regularisation of the linear expert (as in scikit-learn).
    n_prior_iter : int
        EM steps that estimate the class prior of the propagation expert.
    n_clusters : int or None
        k-means clusters for the second opinion; ``None`` picks it automatically, 0 disables it.
    max_loo : int
        At most this many labeled rows are scored leave-one-out when choosing ``k``.
    max_fit_per_class : int
        At most this many (most confident) rows per class fit the linear expert.
    lr_max_iter : int
        L-BFGS iterations of the linear expert per tier (warm-started).
    cg_iter : int
        Conjugate-gradient iterations per propagation.
    cluster_weight : float
        Exponent of the cluster agreement in the admission ranking (0: clusters only label unreached rows).
    lr_dim : int or None
        Principal axes kept for the linear expert (None: all).
    blas_threads : int or None
        BLAS threads during ``fit``; 1 avoids OpenBLAS stalls (10x slower fits were measured on a busy
        2-core machine with 2 threads); None keeps the library default.
    admission : {"class", "seed"}
        Groups within which a tier admits its top ``t / n_tiers``: each predicted class (default), or each
        predicted class within the basin of its nearest labeled rows (``seed``: the first of the 10 nearest
        labeled rows with that class). ``seed`` keeps every labeled mode of a multi-modal class in the pool;
        measured on ``benchmarks/scale.py`` data it fixes labeled modes that later tiers lose, and on the real
        CLIP embeddings of the acceptance check it is on a par overall but 2.8 points lower on CIFAR-10 at
        4 labels per class, hence not the default.
    random_state : int
        Seed of k-means and of the subsampling.

    Attributes
    ----------
    classes_ : (C,) int64
    labels_ : (N,) int64
    confidence_ : (N,) float32 in [0, 1], 1 on labeled rows
    proba_ : (N, C) float32, the last tier's posterior
    tier_ : (N,) int, 0 for given labels, else the tier from which the row stayed in the pool
        (``n_tiers_`` for rows labeled only by the last tier)
    n_tiers_ : int, tiers kept (``n_tiers`` unless a tier failed the validation of rule 5)
    tier_loo_accuracy_ : list of float, each tier's leave-one-out accuracy on the labeled rows
        (empty when no class has two labels)
    noise_ : (N,) bool
    agreement_ : (N,) float32
    k_ : int, delta_k_ : float, k_scores_ : dict {k: delta_k}
    n_clusters_ : int
    class_prior_ : (C,) float, the propagation expert's EM class prior
    coef_ : (r, C) float32, intercept_ : (C,) float32, center_ : (D,) float32,
    components_ : (D, r) float32 or None (linear expert, used by ``predict_proba``)
    """

    def __init__(self, n_tiers: int = 5, k: int | None = None, k_grid: tuple[int, ...] = (5, 10, 20),
                 k_default: int = 5, alpha: float = 0.99, gamma: float = 3.0, prop_weight: float = 0.5,
                 lin_weight: float = 1.0,
                 C: float = 10.0, n_prior_iter: int = 3, n_clusters: int | None = None, max_loo: int = 128,
                 max_fit_per_class: int = 1000, lr_max_iter: int = 60, cg_iter: int = 20,
                 cluster_weight: float = 0.0, lr_dim: int | None = 256, blas_threads: int | None = 1,
                 admission: str = "class", random_state: int = 0):
        self.n_tiers = n_tiers
        self.k = k
        self.k_grid = k_grid
        self.k_default = k_default
        self.alpha = alpha
        self.gamma = gamma
        self.prop_weight = prop_weight
        self.lin_weight = lin_weight
        self.C = C
        self.n_prior_iter = n_prior_iter
        self.n_clusters = n_clusters
        self.max_loo = max_loo
        self.max_fit_per_class = max_fit_per_class
        self.lr_max_iter = lr_max_iter
        self.cg_iter = cg_iter
        self.cluster_weight = cluster_weight
        self.lr_dim = lr_dim
        self.blas_threads = blas_threads
        self.admission = admission
        self.random_state = random_state

    # ------------------------------------------------------------ adaptive k
    def _choose_k(self, g: KNNGraph, lab_rows: NDArray[np.int64], lab_pos: NDArray[np.int64],
                  n_classes: int, n: int, order: NDArray[np.int64] | None = None):
        """Leave-one-out propagation on the labeled rows.

        Returns (k, {k: delta_k}, evaluated labeled rows (positions in ``lab_rows``), their LOO
        propagation posteriors at the chosen k (|ev|, C), the propagation graph at the chosen k,
        the evaluated rows' self-influence ``((I - alpha S)^-1)_ii`` at the chosen k); all but the
        first two are None when no class has two labels.
        """
        counts = np.bincount(lab_pos, minlength=n_classes)
        evaluable = np.flatnonzero(counts[lab_pos] >= 2)
        if self.k is not None:
            grid = [int(min(self.k, n - 1))]
        else:
            grid = sorted({int(k) for k in self.k_grid if 1 <= k < n})
        fallback = grid[0] if self.k is not None else int(min(self.k_default, max(3, round(n / n_classes / 4))))
        fallback = min(fallback, n - 1)
        if len(evaluable) == 0 or not grid:
            return fallback, {}, None, None, None, None
        rng = np.random.default_rng(self.random_state)
        if len(evaluable) > self.max_loo:
            evaluable = np.sort(rng.choice(evaluable, self.max_loo, replace=False))
        own = lab_pos[evaluable]
        scores: dict[int, float] = {}
        posts: dict[int, NDArray] = {}
        graphs: dict[int, _Graph] = {}
        diags: dict[int, NDArray] = {}  # self-influence ((I - alpha S)^-1)_ii of the evaluated rows
        batch = int(np.clip(2 ** 25 // n, 16, 128))  # columns solved at a time: (N, batch) arrays of <= 128 MB
        member = sp.csr_matrix((np.ones(len(lab_pos)), (lab_pos, np.arange(len(lab_pos)))),
                               shape=(n_classes, len(lab_pos)))  # class x labeled row indicator
        for k in grid:
            graphs[k] = G_k = _Graph.from_graph(g, k, self.gamma, order)
            post = np.zeros((len(evaluable), n_classes), np.float64)
            diags[k] = np.zeros(len(evaluable), np.float64)
            for s in range(0, len(evaluable), batch):
                ev = evaluable[s:s + batch]
                G = G_k.solve_seeds(lab_rows[ev], np.arange(len(ev)), np.ones(len(ev), np.float32), len(ev),
                                    self.alpha, n_iter=self.cg_iter)[lab_rows]  # (n_L, |ev|): G[j, i]
                diags[k][s:s + len(ev)] = G[ev, np.arange(len(ev))]
                G[ev, np.arange(len(ev))] = 0.0  # leave the row itself out
                votes = np.asarray(member @ np.maximum(G, 0.0).astype(np.float64))
                # mean seed influence per class, the left-out row no longer counting for its own class
                left = counts[:, None] - (np.arange(n_classes)[:, None] == lab_pos[ev][None, :])
                post[s:s + len(ev)] = (votes / np.maximum(left, 1)).T
            post /= np.maximum(post.sum(axis=1, keepdims=True), 1e-30)
            posts[k] = post
            scores[k] = float((np.argmax(post, axis=1) != own).mean())
        # one-standard-error rule: the smallest k whose LOO error is within one SE of the best
        best = min(scores.values())
        se = float(np.sqrt(best * (1.0 - best) / len(evaluable)))
        k_best = min(k for k, v in scores.items() if v <= best + se + 1e-12)
        return k_best, scores, evaluable, posts[k_best], graphs[k_best], diags[k_best]

    def _choose_lin_weight(self, Xl: _LinearFeatures, lab_rows: NDArray[np.int64], lab_pos: NDArray[np.int64],
                           n_classes: int, evaluated: NDArray[np.int64] | None, prop_post: NDArray | None
                           ) -> tuple[float, dict[float, float]]:
        """Weight of the linear expert, from held-out labeled rows (default unless clearly worse).

        The linear expert is scored by 4-fold cross-validation on the labeled rows, the propagation
        expert by its leave-one-out posteriors; the combination ``prop_weight * log Pprop + w * log Plin``
        is scored on the same rows for w in ``lin_weight * (0, 1/4, 1/2, 1)``. The default ``w = lin_weight``
        is kept unless another w is better by more than one standard error.
        """
        if evaluated is None or len(evaluated) < 2:
            return float(self.lin_weight), {}
        rng = np.random.default_rng(self.random_state)
        fold = _rank_within_class(lab_pos, rng.random(len(lab_pos))) % 4  # classes spread over the folds
        lin_post = np.zeros((len(evaluated), n_classes), np.float32)
        XL = Xl.take(lab_rows)
        for f in range(4):
            held = evaluated[fold[evaluated] == f]
            if len(held) == 0:
                continue
            train = np.flatnonzero(fold != f)
            theta = _fit_softmax(XL[train], lab_pos[train], np.ones(len(train), np.float32), n_classes,
                                 self.C, None, self.lr_max_iter)
            lin_post[np.searchsorted(evaluated, held)] = _softmax_proba(theta, XL[held], n_classes)
        own = lab_pos[evaluated]
        acc: dict[float, float] = {}
        for frac in (0.0, 0.25, 0.5, 1.0):
            w = float(self.lin_weight) * frac
            logp = self.prop_weight * np.log(prop_post + 1e-12) + w * np.log(lin_post + 1e-12)
            acc[w] = float((np.argmax(logp, axis=1) == own).mean())
        default = float(self.lin_weight)
        best_w = max(acc, key=lambda w: (acc[w], w))
        se = float(np.sqrt(acc[default] * (1.0 - acc[default]) / len(evaluated)))
        return (best_w if acc[best_w] > acc[default] + se else default), acc

    # ------------------------------------------------------------ second opinion
    def _cluster_opinion(self, X: NDArray[np.float32], pred: NDArray[np.int64], n_classes: int
                         ) -> tuple[int, NDArray[np.int64] | None]:
        """k-means on a PCA projection of the centred rows; return (n_clusters, cluster id of every row)."""
        if self.n_clusters == 0 or len(X) < 4:
            return 0, None
        import faiss
        from sklearn.metrics import normalized_mutual_info_score

        n = len(X)
        if self.components_ is not None and self.components_.shape[1] >= 64:
            proj = self.components_[:, :64]  # the same sample's top axes: _principal_axes(X, 64, ...) again
        else:
            proj = _principal_axes(X, 64, self.random_state, mean=self.center_)
        Xp = _project(X, self.center_, proj)
        if self.n_clusters is not None:
            candidates = [int(self.n_clusters)]
        else:
            candidates = [m * n_classes for m in (1, 2, 4) if m * n_classes * 5 <= n] or [max(2, n // 5)]
        best = (-np.inf, 0, None)
        # k-means trains on at most 256 rows per cluster, fewer above 20k rows (64 at 80k and above)
        per_centroid = int(np.clip(256 * 20_000 // n, 64, 256))
        for nc in candidates:
            nc = int(min(max(nc, 2), n))
            km = faiss.Kmeans(Xp.shape[1], nc, niter=10, seed=self.random_state, verbose=False,
                              max_points_per_centroid=per_centroid, min_points_per_centroid=1)
            km.train(Xp)
            _, assign = km.index.search(Xp, 1)
            assign = assign.ravel()
            score = normalized_mutual_info_score(pred, assign) if len(candidates) > 1 else 0.0
            if score > best[0]:
                best = (score, nc, assign)
        return best[1], best[2]

    # ------------------------------------------------------------ fit
    def fit(self, X: NDArray, y: NDArray, neighbors: KNNGraph | None = None) -> HDL:
        """Label every row of ``X`` (N, D) from the labeled rows of ``y`` (N,), -1 = unlabeled."""
        from threadpoolctl import threadpool_limits

        if self.blas_threads is None:
            return self._fit(X, y, neighbors)
        with threadpool_limits(limits=self.blas_threads, user_api="blas"):
            return self._fit(X, y, neighbors)

    def _fit(self, X: NDArray, y: NDArray, neighbors: KNNGraph | None) -> HDL:
        if self.admission not in ("class", "seed"):
            raise ValueError(f"HDL admission must be 'class' or 'seed', got {self.admission!r}")
        X, y, classes = check_labels(X, y, keep_rows=True)  # float16 memory maps are read in batches
        n, n_classes = len(X), len(classes)
        if n < 2:
            raise ValueError("HDL needs at least 2 rows")
        if self.n_tiers < 1:
            raise ValueError(f"n_tiers must be >= 1, got {self.n_tiers}")
        self.classes_ = classes
        labeled = y >= 0
        lab_rows = np.flatnonzero(labeled)
        unl_rows = np.flatnonzero(~labeled)
        lab_pos = np.searchsorted(classes, y[lab_rows])

        # geometry: kNN graph on unit rows, centred rows (made on demand) for the linear expert
        self.center_ = X.mean(axis=0, dtype=np.float64).astype(np.float32)
        self.components_ = _principal_axes(X, self.lr_dim, self.random_state, mean=self.center_)
        Xl = _LinearFeatures(X, self.center_, self.components_)
        k_need = self.k if self.k is not None else max(max(self.k_grid), self.k_default)
        g = _neighbour_graph(X, int(min(k_need, n - 1)), neighbors)
        order = _locality_order(X, self.random_state)
        self.k_, self.k_scores_, evaluated, loo_post, S, self_infl = self._choose_k(g, lab_rows, lab_pos, n_classes,
                                                                                   n, order)
        self.lin_weight_, self.lin_weight_scores_ = self._choose_lin_weight(Xl, lab_rows, lab_pos, n_classes,
                                                                            evaluated, loo_post)
        if S is None:
            S = _Graph.from_graph(g, self.k_, self.gamma, order)

        pool_rows, pool_pos, pool_w = lab_rows, lab_pos, np.ones(len(lab_rows), np.float32)
        since = np.zeros(n, np.int64)          # tier from which a row has stayed in the pool
        in_pool = np.zeros(n, bool)
        Z = theta = assign = None
        prev = None                            # (P, pred, conf) of the previous tier
        seed_nn = None                         # nearest labeled rows of the unlabeled rows (admission="seed")
        ok_best = None                         # LOO correctness of the best tier so far
        self.n_clusters_ = 0
        self.tier_loo_accuracy_ = []
        self.n_tiers_ = self.n_tiers
        for t in range(1, self.n_tiers + 1):
            # (a) propagation expert from the current pool, each class's seed mass normalised to 1
            mass = np.bincount(pool_pos, weights=pool_w, minlength=n_classes)
            seed_w = (pool_w / np.maximum(mass[pool_pos], 1e-30)).astype(np.float32)
            x0, Z = (None if Z is None else [Z]), None  # the warm start is handed over (and consumed)
            Z = S.solve_seeds(pool_rows, pool_pos, seed_w, n_classes, self.alpha, n_iter=self.cg_iter, X0=x0)
            del x0
            if evaluated is not None:
                # validation by the given labels: leave-one-out correctness of this tier's propagation on the
                # evaluated labeled rows (their own seed's influence removed); a tier that is worse than the
                # best earlier tier by a paired sign test (McNemar, two standard errors) is undone, tiers stop
                ok_t = _tier_loo_correct(Z, lab_rows[evaluated], lab_pos[evaluated], self_infl, seed_w[evaluated])
                self.tier_loo_accuracy_.append(float(ok_t.mean()))
                if ok_best is not None:
                    lost, won = int((ok_best & ~ok_t).sum()), int((~ok_best & ok_t).sum())
                    worse = lost - won > 2.0 * np.sqrt(lost + won)
                else:
                    worse = False
                if ok_best is None or ok_t.mean() > ok_best.mean():
                    ok_best = ok_t
                if prev is not None and worse:
                    log.info("HDL: tier %d lowers the leave-one-out accuracy on the labeled rows (%.3f < %.3f): "
                             "keeping tier %d", t, ok_t.mean(), ok_best.mean(), t - 1)
                    P, pred, conf = prev[0].astype(np.float32), prev[1], prev[2]
                    P /= P.sum(axis=1, keepdims=True)
                    self.n_tiers_ = t - 1
                    if theta is None:
                        fit_rows = np.flatnonzero(_rank_within_class(pool_pos, pool_w) < self.max_fit_per_class)
                        theta = _fit_softmax(Xl.take(pool_rows[fit_rows]), pool_pos[fit_rows], pool_w[fit_rows],
                                             n_classes, self.C, None, self.lr_max_iter)
                    break
            prev = None
            P_prop, self.class_prior_ = _balanced_posterior(Z, self.n_prior_iter)
            unreached = Z.max(axis=1) <= 0
            if assign is not None and unreached.any():
                # rows no labeled row reaches through the graph take their k-means cluster's opinion
                P_prop[unreached] = _cluster_mean(P_prop, assign, self.n_clusters_, ~unreached)[unreached]
            # (b) linear expert from the current pool (capped per class, most confident first)
            # (skipped but for the last tier, which serves predict_proba, when its weight is 0)
            if self.lin_weight_ > 0 or t == self.n_tiers:
                fit_rows = np.flatnonzero(_rank_within_class(pool_pos, pool_w) < self.max_fit_per_class)
                theta = _fit_softmax(Xl.take(pool_rows[fit_rows]), pool_pos[fit_rows], pool_w[fit_rows], n_classes,
                                     self.C, theta, self.lr_max_iter)
            # product of experts, in place: P ~ Pprop ** prop_weight * Plin ** lin_weight
            P = P_prop
            P += 1e-12
            np.log(P, out=P)
            P *= self.prop_weight
            if self.lin_weight_ > 0:
                P_lin = _softmax_proba(theta, Xl, n_classes)
                P_lin += 1e-12
                np.log(P_lin, out=P_lin)
                P_lin *= self.lin_weight_
                P += P_lin
                del P_lin
            P -= P.max(axis=1, keepdims=True)
            np.exp(P, out=P)
            P /= P.sum(axis=1, keepdims=True)
            pred = np.argmax(P, axis=1)
            pred[lab_rows] = lab_pos
            conf = P[np.arange(n), pred]
            if t == 1:
                self.n_clusters_, assign = self._cluster_opinion(X, pred, n_classes)
            score = conf
            if assign is not None and self.cluster_weight > 0:
                score = conf * _cluster_mean(P, assign, self.n_clusters_)[np.arange(n), pred] ** self.cluster_weight
            log.debug("tier %d: pool %d rows", t, len(pool_rows))
            if t == self.n_tiers:
                break
            prev = (P.astype(np.float16), pred, conf)  # kept in case the next tier is undone (half the memory)
            P = P_prop = None
            # (c) next pool: given labels + the top t/T of every class's predicted members
            # admission groups: the predicted class, or (admission="seed") the class within the basin of its
            # nearest labeled row, so a class's pool covers each of its labeled modes, not only its best-covered
            cls_u = pred[unl_rows]
            if self.admission == "seed":
                if seed_nn is None:
                    seed_nn = _nearest_labeled(X, lab_rows, unl_rows)
                cls_u = _seed_groups(cls_u, lab_pos, seed_nn)
            rank = _rank_within_class(cls_u, score[unl_rows])
            count = np.bincount(cls_u)
            quota = np.ceil(count * t / self.n_tiers).astype(np.int64)
            adm = unl_rows[rank < quota[cls_u]]
            newly = np.zeros(n, bool)
            newly[adm] = True
            since = np.where(newly & ~in_pool, t, np.where(newly, since, 0))
            in_pool = newly
            pool_rows = np.concatenate([lab_rows, adm])
            pool_pos = np.concatenate([lab_pos, pred[adm]])
            pool_w = np.concatenate([np.ones(len(lab_rows), np.float32), conf[adm].astype(np.float32)])

        self.proba_ = P
        self.labels_ = np.where(labeled, y, classes[pred]).astype(np.int64)
        self.confidence_ = np.where(labeled, 1.0, np.clip(conf, 0.0, 1.0)).astype(np.float32)
        tier = np.where(in_pool, since, self.n_tiers_)
        self.tier_ = np.where(labeled, 0, tier).astype(np.int64)
        d = Xl.shape[1]
        del Z
        self.coef_ = theta[: d * n_classes].reshape(d, n_classes).astype(np.float32)
        self.intercept_ = theta[d * n_classes:].astype(np.float32)
        self._neighbourhood_checks(g)
        return self

    def _neighbourhood_checks(self, g: KNNGraph) -> None:
        """agreement_, noise_ and delta_k_ from the final labels and the ``k_``-neighbourhoods."""
        idx = g.idx[:, : self.k_]
        valid = idx >= 0
        w = np.where(valid, np.maximum(np.nan_to_num(g.sim[:, : self.k_], neginf=0.0), 0.0), 0.0)
        w = np.where(valid & (w <= 0), 1e-6, w)
        pos = np.searchsorted(self.classes_, self.labels_)
        nb = np.where(valid, pos[np.where(valid, idx, 0)], -1)
        same = nb == pos[:, None]
        tot = w.sum(axis=1)
        self.agreement_ = np.where(tot > 0, (w * same).sum(axis=1) / np.maximum(tot, 1e-30), 0.0).astype(np.float32)
        r = np.repeat(np.arange(len(pos)), idx.shape[1])
        keep = valid.ravel()
        votes = sp.csr_matrix((w.ravel()[keep], (r[keep], nb.ravel()[keep])), shape=(len(pos), len(self.classes_)))
        majority = np.asarray(votes.argmax(axis=1)).ravel()
        self.noise_ = (tot > 0) & (majority != pos) & (self.agreement_ < 0.5)
        if not self.k_scores_:
            self.delta_k_ = float(np.mean(~(same | ~valid).all(axis=1)))
        else:
            self.delta_k_ = float(self.k_scores_[self.k_])

    # ------------------------------------------------------------ inductive use
    def predict_proba(self, X: NDArray) -> NDArray[np.float32]:
        """Class probabilities (M, C) for new points from the final linear expert."""
        check_is_fitted(self, "coef_")
        Xc = _centre(as_unit_float32(X), self.center_)
        if self.components_ is not None:
            Xc = np.ascontiguousarray(Xc @ self.components_)
        theta = np.concatenate([self.coef_.ravel(), self.intercept_]).astype(np.float64)
        return _softmax_proba(theta, Xc, len(self.classes_))


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
