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
   (faiss, self excluded; exact up to 50k rows, IVF above) is built on these
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

Everything is O(N k) memory (sparse N x k graph, N x C dense posteriors); the
only loops run over tiers, EM steps, CG iterations and candidate k values.
"""

from __future__ import annotations

import logging

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray
from scipy.optimize import minimize
from sklearn.utils.validation import check_is_fitted

from ssl_pipeline.labeling.base import BaseLabeler, check_labels
from ssl_pipeline.labeling.knn import KNNGraph, as_unit_float32, knn_graph, nearest

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


def _affinity(g: KNNGraph, k: int, gamma: float) -> sp.csr_matrix:
    """Symmetric normalised affinity ``D^-1/2 (W + W^T) D^-1/2`` of the first ``k`` neighbours."""
    n = g.idx.shape[0]
    idx = g.idx[:, :k]
    w = np.where(idx >= 0, np.maximum(np.nan_to_num(g.sim[:, :k], neginf=0.0), 0.0), 0.0) ** gamma
    rows = np.repeat(np.arange(n), idx.shape[1])
    keep = (idx.ravel() >= 0) & (w.ravel() > 0)
    W = sp.csr_matrix((w.ravel()[keep].astype(np.float32), (rows[keep], idx.ravel()[keep])), shape=(n, n))
    W = (W + W.T).tocsr()
    d = np.asarray(W.sum(axis=1)).ravel()
    dinv = np.where(d > 0, 1.0 / np.sqrt(np.maximum(d, 1e-30)), 0.0).astype(np.float32)
    return (sp.diags(dinv) @ W @ sp.diags(dinv)).tocsr().astype(np.float32)


def _propagate(S: sp.csr_matrix, B: NDArray, alpha: float, X0: NDArray | None = None,
               n_iter: int = 20, tol: float = 1e-4) -> NDArray[np.float32]:
    """Solve ``(I - alpha S) Z = B`` column-wise by block conjugate gradient (SPD system)."""
    B = np.asarray(B, np.float32)
    Z = np.zeros_like(B) if X0 is None else np.array(X0, np.float32)
    R = B - (Z - alpha * (S @ Z)) if X0 is not None else B.copy()
    P = R.copy()
    rs = np.einsum("ij,ij->j", R, R)
    stop = (tol ** 2) * np.maximum(np.einsum("ij,ij->j", B, B), 1e-30)
    for _ in range(n_iter):
        if (rs <= stop).all():
            break
        AP = P - alpha * (S @ P)
        step = rs / np.maximum(np.einsum("ij,ij->j", P, AP), 1e-30)
        Z += step * P
        R -= step * AP
        rs_new = np.einsum("ij,ij->j", R, R)
        P = R + (rs_new / np.maximum(rs, 1e-30)) * P
        rs = rs_new
    return Z


def _balanced_posterior(Z: NDArray, n_prior_iter: int) -> tuple[NDArray[np.float32], NDArray[np.float64]]:
    """Row posteriors from propagation scores: equal class mass, then an EM class prior.

    Rows that no class reaches get the uniform posterior.
    """
    Z = np.maximum(Z, 0.0)
    Z /= np.maximum(Z.sum(axis=0, keepdims=True), 1e-30)
    C = Z.shape[1]
    prior = np.full(C, 1.0 / C)
    row = Z.sum(axis=1, keepdims=True)
    reached = row[:, 0] > 0
    for _ in range(n_prior_iter):
        Zp = Z * prior
        P = Zp / np.maximum(Zp.sum(axis=1, keepdims=True), 1e-30)
        prior = P[reached].mean(axis=0) if reached.any() else prior
        prior = np.maximum(prior, 1e-6)
        prior /= prior.sum()
    Zp = Z * prior
    s = Zp.sum(axis=1, keepdims=True)
    P = np.where(s > 0, Zp / np.maximum(s, 1e-30), 1.0 / C).astype(np.float32)
    return P, prior


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


def _softmax_proba(theta: NDArray, X: NDArray[np.float32], n_classes: int, batch: int = 65536) -> NDArray[np.float32]:
    d = X.shape[1]
    W = theta[: d * n_classes].reshape(d, n_classes).astype(np.float32)
    b = theta[d * n_classes:].astype(np.float32)
    out = np.empty((len(X), n_classes), np.float32)
    for s in range(0, len(X), batch):
        S = X[s:s + batch] @ W + b
        S -= S.max(axis=1, keepdims=True)
        E = np.exp(S)
        out[s:s + batch] = E / E.sum(axis=1, keepdims=True)
    return out


def _centre(X: NDArray[np.float32], mean: NDArray[np.float32]) -> NDArray[np.float32]:
    Xc = X - mean
    Xc /= np.maximum(np.linalg.norm(Xc, axis=1, keepdims=True), 1e-12)
    return Xc


def _cluster_mean(P: NDArray[np.float32], assign: NDArray[np.int64], n_clusters: int,
                  rows: NDArray[np.bool_] | None = None) -> NDArray[np.float32]:
    """Every row's cluster-mean posterior (N, C), averaged over ``rows`` (all rows if None); uniform if empty."""
    keep = np.ones(len(P), bool) if rows is None else rows
    member = sp.csr_matrix((keep.astype(np.float32), (assign, np.arange(len(P)))), shape=(n_clusters, len(P)))
    Q = np.asarray(member @ P, dtype=np.float64)
    s = Q.sum(axis=1, keepdims=True)
    Q = np.where(s > 0, Q / np.maximum(s, 1e-30), 1.0 / P.shape[1])
    return Q[assign].astype(np.float32)


def _principal_axes(X: NDArray[np.float32], r: int | None, seed: int, max_rows: int = 50_000
                    ) -> NDArray[np.float32] | None:
    """The top ``r`` principal axes (D, r) of the rows of ``X`` (a sample of them), or None if ``r >= D``."""
    if r is None or r >= X.shape[1]:
        return None
    rng = np.random.default_rng(seed)
    sample = X[np.sort(rng.choice(len(X), min(len(X), max_rows), replace=False))].astype(np.float64)
    sample -= sample.mean(axis=0)
    _, vecs = np.linalg.eigh(sample.T @ sample)
    return np.ascontiguousarray(vecs[:, ::-1][:, :r], dtype=np.float32)


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
    random_state : int
        Seed of k-means and of the subsampling.

    Attributes
    ----------
    classes_ : (C,) int64
    labels_ : (N,) int64
    confidence_ : (N,) float32 in [0, 1], 1 on labeled rows
    proba_ : (N, C) float32, the last tier's posterior
    tier_ : (N,) int, 0 for given labels, else the tier from which the row stayed in the pool
        (``n_tiers`` for rows labeled only by the last tier)
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
                 random_state: int = 0):
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
        self.random_state = random_state

    # ------------------------------------------------------------ adaptive k
    def _choose_k(self, g: KNNGraph, lab_rows: NDArray[np.int64], lab_pos: NDArray[np.int64],
                  n_classes: int, n: int):
        """Leave-one-out propagation on the labeled rows.

        Returns (k, {k: delta_k}, evaluated labeled rows (positions in ``lab_rows``), their LOO
        propagation posteriors at the chosen k (|ev|, C)); the last two are None when no class has
        two labels.
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
            return fallback, {}, None, None
        rng = np.random.default_rng(self.random_state)
        if len(evaluable) > self.max_loo:
            evaluable = np.sort(rng.choice(evaluable, self.max_loo, replace=False))
        own = lab_pos[evaluable]
        scores: dict[int, float] = {}
        posts: dict[int, NDArray] = {}
        for k in grid:
            S = _affinity(g, k, self.gamma)
            post = np.zeros((len(evaluable), n_classes), np.float64)
            for s in range(0, len(evaluable), 128):
                ev = evaluable[s:s + 128]
                E = np.zeros((n, len(ev)), np.float32)
                E[lab_rows[ev], np.arange(len(ev))] = 1.0
                G = _propagate(S, E, self.alpha, n_iter=self.cg_iter)[lab_rows]  # (n_L, |ev|): G[j, i]
                G[ev, np.arange(len(ev))] = 0.0  # leave the row itself out
                votes = np.zeros((n_classes, len(ev)), np.float64)
                np.add.at(votes, lab_pos, np.maximum(G, 0.0))
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
        return k_best, scores, evaluable, posts[k_best]

    def _choose_lin_weight(self, Xl: NDArray[np.float32], lab_rows: NDArray[np.int64], lab_pos: NDArray[np.int64],
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
        for f in range(4):
            held = evaluated[fold[evaluated] == f]
            if len(held) == 0:
                continue
            train = np.flatnonzero(fold != f)
            theta = _fit_softmax(Xl[lab_rows[train]], lab_pos[train], np.ones(len(train), np.float32), n_classes,
                                 self.C, None, self.lr_max_iter)
            lin_post[np.searchsorted(evaluated, held)] = _softmax_proba(theta, Xl[lab_rows[held]], n_classes)
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
    def _cluster_opinion(self, Xc: NDArray[np.float32], pred: NDArray[np.int64], n_classes: int
                         ) -> tuple[int, NDArray[np.int64] | None]:
        """k-means on a PCA projection; return (n_clusters, cluster id of every row)."""
        if self.n_clusters == 0 or len(Xc) < 4:
            return 0, None
        import faiss
        from sklearn.metrics import normalized_mutual_info_score

        n = len(Xc)
        proj = _principal_axes(Xc, 64, self.random_state)
        Xp = Xc if proj is None else np.ascontiguousarray(Xc @ proj)
        if self.n_clusters is not None:
            candidates = [int(self.n_clusters)]
        else:
            candidates = [m * n_classes for m in (1, 2, 4) if m * n_classes * 5 <= n] or [max(2, n // 5)]
        best = (-np.inf, 0, None)
        for nc in candidates:
            nc = int(min(max(nc, 2), n))
            km = faiss.Kmeans(Xp.shape[1], nc, niter=10, seed=self.random_state, verbose=False,
                              max_points_per_centroid=256, min_points_per_centroid=1)
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
        X, y, classes = check_labels(X, y)
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

        # geometry: kNN graph on unit rows, centred rows for the linear expert
        self.center_ = X.mean(axis=0).astype(np.float32)
        Xc = _centre(X, self.center_)
        self.components_ = _principal_axes(Xc, self.lr_dim, self.random_state)
        Xl = Xc if self.components_ is None else np.ascontiguousarray(Xc @ self.components_)
        k_need = self.k if self.k is not None else max(max(self.k_grid), self.k_default)
        g = _neighbour_graph(X, int(min(k_need, n - 1)), neighbors)
        self.k_, self.k_scores_, evaluated, loo_post = self._choose_k(g, lab_rows, lab_pos, n_classes, n)
        self.lin_weight_, self.lin_weight_scores_ = self._choose_lin_weight(Xl, lab_rows, lab_pos, n_classes,
                                                                            evaluated, loo_post)
        S = _affinity(g, self.k_, self.gamma)

        pool_rows, pool_pos, pool_w = lab_rows, lab_pos, np.ones(len(lab_rows), np.float32)
        since = np.zeros(n, np.int64)          # tier from which a row has stayed in the pool
        in_pool = np.zeros(n, bool)
        Z = theta = assign = None
        self.n_clusters_ = 0
        for t in range(1, self.n_tiers + 1):
            # (a) propagation expert from the current pool
            Y = np.zeros((n, n_classes), np.float32)
            Y[pool_rows, pool_pos] = pool_w  # pool rows are distinct
            Y /= np.maximum(Y.sum(axis=0, keepdims=True), 1e-30)
            Z = _propagate(S, Y, self.alpha, X0=Z, n_iter=self.cg_iter)
            P_prop, self.class_prior_ = _balanced_posterior(Z, self.n_prior_iter)
            unreached = Z.max(axis=1) <= 0
            if assign is not None and unreached.any():
                # rows no labeled row reaches through the graph take their k-means cluster's opinion
                P_prop[unreached] = _cluster_mean(P_prop, assign, self.n_clusters_, ~unreached)[unreached]
            # (b) linear expert from the current pool (capped per class, most confident first)
            # (skipped but for the last tier, which serves predict_proba, when its weight is 0)
            if self.lin_weight_ > 0 or t == self.n_tiers:
                fit_rows = np.flatnonzero(_rank_within_class(pool_pos, pool_w) < self.max_fit_per_class)
                theta = _fit_softmax(Xl[pool_rows[fit_rows]], pool_pos[fit_rows], pool_w[fit_rows], n_classes,
                                     self.C, theta, self.lr_max_iter)
            P_lin = _softmax_proba(theta, Xl, n_classes) if self.lin_weight_ > 0 else np.ones_like(P_prop)
            # product of experts
            logP = self.prop_weight * np.log(P_prop + 1e-12) + self.lin_weight_ * np.log(P_lin + 1e-12)
            logP -= logP.max(axis=1, keepdims=True)
            P = np.exp(logP)
            P /= P.sum(axis=1, keepdims=True)
            pred = np.argmax(P, axis=1)
            pred[lab_rows] = lab_pos
            conf = P[np.arange(n), pred]
            if t == 1:
                self.n_clusters_, assign = self._cluster_opinion(Xc, pred, n_classes)
            score = conf
            if assign is not None and self.cluster_weight > 0:
                score = conf * _cluster_mean(P, assign, self.n_clusters_)[np.arange(n), pred] ** self.cluster_weight
            log.debug("tier %d: pool %d rows", t, len(pool_rows))
            if t == self.n_tiers:
                break
            # (c) next pool: given labels + the top t/T of every class's predicted members
            cls_u = pred[unl_rows]
            rank = _rank_within_class(cls_u, score[unl_rows])
            count = np.bincount(cls_u, minlength=n_classes)
            quota = np.ceil(count * t / self.n_tiers).astype(np.int64)
            adm = unl_rows[rank < quota[cls_u]]
            newly = np.zeros(n, bool)
            newly[adm] = True
            since = np.where(newly & ~in_pool, t, np.where(newly, since, 0))
            in_pool = newly
            pool_rows = np.concatenate([lab_rows, adm])
            pool_pos = np.concatenate([lab_pos, pred[adm]])
            pool_w = np.concatenate([np.ones(len(lab_rows), np.float32), conf[adm].astype(np.float32)])

        self.proba_ = P.astype(np.float32)
        self.labels_ = np.where(labeled, y, classes[pred]).astype(np.int64)
        self.confidence_ = np.where(labeled, 1.0, np.clip(conf, 0.0, 1.0)).astype(np.float32)
        tier = np.where(in_pool, since, self.n_tiers)
        self.tier_ = np.where(labeled, 0, tier).astype(np.int64)
        d = Xl.shape[1]
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
